// W4A16 GEMM for the CUDA extension: the block tiling shared by the kernel (w4a16_gemm.cu) and its host
// side (w4a16_ops.cpp), and the launcher between them. This header needs no torch, so the .cu file that
// nvcc compiles once per architecture stays free of the ATen headers (a large part of the build time).
//
// The tiling is mirrored by tests/test_w4a16_layout.py, which emulates the kernel on CPU.
#pragma once

#include <cuda_runtime_api.h>

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

enum class Dtype { kHalf, kBFloat16 };

// Dynamic shared memory one block of the given m_blocks needs.
int shared_bytes(int m_blocks);

// Launches the GEMM on `stream`. x [M, K], w the kernel layout [K / 16, 2 N] int32, scales [K / 128, N]
// (x's dtype), bias float32 [N] or null, out [M, N] (x's dtype). With plan.splits > 1 the blocks write
// float32 partials to workspace [splits, M, N] and a second kernel sums them in a fixed order.
cudaError_t launch(const Plan& plan, Dtype dtype, const void* x, const int32_t* w, const void* scales,
                   const float* bias, float* workspace, void* out, int M, int N, int K, cudaStream_t stream);

}  // namespace grace_kernels::w4a16
