// W4A16 kernels for the CUDA extension: the GEMM's block tiling, shared by the kernel (w4a16_gemm.cu) and
// its host side (w4a16_ops.cpp), and the launchers between them (the GEMM, and the dequantize kernel of
// w4a16_dequant.cu). This header needs no torch, so the .cu files that nvcc compiles once per
// architecture stay free of the ATen headers (a large part of the build time).
//
// These constants are their one definition: tests/test_w4a16_layout.py, which emulates the kernel on CPU,
// reads them through tests/simt/w4a16_constants.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace grace_kernels::w4a16 {

inline constexpr int kThreads = 256;          // 8 warps
inline constexpr int kWarpsN = 2;             // warps across N, each owning a 64-column slab
inline constexpr int kWarpsK = 4;             // warps sharing a slab, each taking 2 of the 8 k16 rows of a stage
inline constexpr int kBlockN = 64 * kWarpsN;  // 128 output columns per block
inline constexpr int kBlockK = 128;           // K per pipeline stage: exactly one scale group
inline constexpr int kStages = 4;             // cp.async pipeline depth
inline constexpr int kGroupSize = 128;

// How a GEMM is cut into blocks: grid (n_blocks, splits, m_tiles), each block covering 16 * m_blocks rows,
// kBlockN columns and iters_per_split stages of K.
struct Plan {
  int m_blocks;
  int m_tiles;
  int n_blocks;
  int splits;
  int iters_per_split;
};

// The block plan for an M x N x K GEMM on a GPU with sm_count SMs (shared by the host op and the CPU
// emulation, so the emulation runs the plans the GPU gets).
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Plan make_plan(int64_t M, int64_t N, int64_t K, int sm_count) {
  Plan p{};
  // Taller row tiles reuse each dequantized weight fragment for more rows; 16 rows suit decode.
  p.m_blocks = M <= 16 ? 1 : (M <= 32 ? 2 : 4);
  p.m_tiles = static_cast<int>(cdiv(M, 16 * p.m_blocks));
  p.n_blocks = static_cast<int>(cdiv(N, kBlockN));
  const int64_t k_iters = K / kBlockK;
  // Split K until about two blocks per SM exist: a decode GEMM has only N / 128 tiles (32 for N = 4096,
  // against 108-132 SMs), and a weight stream from too few SMs cannot reach the HBM bandwidth. Each split
  // adds an M x N float32 partial write and read, small next to the weights for small M.
  const int64_t tiles = static_cast<int64_t>(p.n_blocks) * p.m_tiles;
  const int64_t want = std::clamp<int64_t>(cdiv(2 * sm_count, tiles), 1, k_iters);
  p.iters_per_split = static_cast<int>(cdiv(k_iters, want));
  p.splits = static_cast<int>(cdiv(k_iters, p.iters_per_split));  // no empty split
  return p;
}

enum class Dtype { kHalf, kBFloat16 };

// Dynamic shared memory one block of the given m_blocks needs.
int shared_bytes(int m_blocks);

// Launches the GEMM on `stream`. x [M, K], w the kernel layout [K / 16, 2 N] int32, scales [K / 128, N]
// (x's dtype), bias float32 [N] or null, out [M, N] (x's dtype). With plan.splits > 1 the blocks write
// float32 partials to workspace [splits, M, N] and a second kernel sums them in a fixed order.
cudaError_t launch(const Plan& plan, Dtype dtype, const void* x, const int32_t* w, const void* scales,
                   const float* bias, float* workspace, void* out, int M, int N, int K, cudaStream_t stream);

// Dynamic shared memory of one dequantize block.
int dequantize_shared_bytes();

// Writes the dense weight out [N, K] (dtype, row-major) = scale * q from the kernel layout w [K / 16, 2 N]
// and scales [K / 128, N] (dtype), rounded once per element exactly as the GEMM rounds it. Needs N % 64 == 0
// and K % 128 == 0.
cudaError_t launch_dequantize(Dtype dtype, const int32_t* w, const void* scales, void* out, int N, int K,
                              cudaStream_t stream);

}  // namespace grace_kernels::w4a16
