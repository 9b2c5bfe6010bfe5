// W4A16 GEMM: y[M, N] = x[M, K] @ W^T with W[n, k] = scale[n, k / 128] * q[n, k], q in [-8, 7] stored as
// 4-bit u = q + 8, x and scales float16 or bfloat16, float32 accumulation.
//
// Verification (what ran where is in the README): python -m grace_kernels.aot reports its registers, shared
// memory and spills for sm_80 and sm_90; tests/test_w4a16_simt.py runs this very source on CPU against the
// executor of tests/simt/ under AddressSanitizer and ThreadSanitizer and counts its accesses per named site;
// tests/test_w4a16_layout.py re-derives the data layout lane by lane; tests/test_w4a16_gpu.py is the GPU parity.
//
// Design (the ideas of Marlin, Frantar et al. 2024, written anew):
//   * Decode (M = 1..16) is bound by reading the weights once from HBM; everything here serves that.
//     Weights are in the kernel layout made offline by grace_kernels.repack_for_kernel: tiles of 16 k x
//     64 n, 512 bytes each, in which lane l's 16 bytes are exactly its mma.m16n8k16 B fragments for the
//     tile's eight n8 sub-tiles. A warp reads a tile as one contiguous, fully coalesced 512-byte run and
//     each lane gets its operands from one 16-byte shared-memory load, with no shuffles.
//   * Weight tiles go global -> shared memory with cp.async in a kStages-deep pipeline, so the loads of
//     the next stages are in flight while the current one is multiplied (memory-level parallelism
//     without spending registers on it). They carry an L2 evict-first policy: each weight byte is read
//     once per M tile, so keeping it in L2 would only push out what is reused (the activations, the
//     partial sums).
//   * int4 -> half without per-nibble shifts and converts: a lop3 (a & mask | exponent) drops two
//     nibbles, 16 bits apart, into the mantissas of a half2 whose exponent makes it 1024 + u (float16)
//     or 128 + u (bfloat16, which has only 7 mantissa bits); one subtraction (or, for the nibble at bits
//     4..7, one fma by 1/16) removes the magic number and the +8 offset together. repack_for_kernel
//     interleaved the nibbles so that these pairs are consecutive k of one fragment register.
//   * Scales are applied to the dequantized fragment (one __hmul2: one rounding per weight, as with any
//     half-precision weight); one 16-byte load gives a lane the scales of all its eight sub-tiles.
//   * A (activations, reused by every column block) is copied with ordinary caching into an XOR-swizzled
//     shared tile and read with ldmatrix.x4, conflict-free.
//   * K is partitioned across blocks (grid.y) so that a decode GEMM, which has only N / 128 column
//     blocks, still puts about two blocks on every SM; each split writes float32 partials and a second
//     kernel sums them in a fixed order (deterministic, unlike atomics).
//   * Inside a block the 8 warps are 2 (N) x 4 (K): a stage of 128 k is shared by four warps, whose
//     float32 accumulators are summed through shared memory at the end.
#include <algorithm>
#include <type_traits>

#include "common/device.cuh"
#include "w4a16/convert.cuh"
#include "w4a16/w4a16.h"

namespace grace_kernels::w4a16 {
namespace {

using namespace detail;

constexpr int kK16PerStage = kBlockK / 16;            // 8 k16 rows of weight tiles per stage
constexpr int kK16PerWarp = kK16PerStage / kWarpsK;   // 2
constexpr int kBRowChunks = kBlockN * 2 / 4;          // 16-byte chunks of one k16 row of a block's weights
constexpr int kBChunks = kK16PerStage * kBRowChunks;  // 512 chunks = 8 KB of weights per stage
constexpr int kAChunksPerRow = kBlockK / 8;           // 16 chunks = one row of 128 activations
constexpr int kSChunks = kBlockN / 8;                 // 16 chunks = 128 scales per stage
static_assert(kBChunks % kThreads == 0, "every thread copies the same number of weight chunks");
static_assert(kK16PerWarp * kWarpsK == kK16PerStage && kWarpsN * kWarpsK * 32 == kThreads, "warp grid");

template <int kMBlocks>
constexpr int a_chunks() { return 16 * kMBlocks * kAChunksPerRow; }

template <int kMBlocks>
constexpr int pipeline_bytes() { return kStages * (a_chunks<kMBlocks>() + kBChunks + kSChunks) * 16; }

template <int kMBlocks>
constexpr int reduction_bytes() { return (kWarpsK - 1) * kWarpsN * kMBlocks * 8 * 4 * 32 * 4; }

template <int kMBlocks>
constexpr int smem_bytes() { return std::max(pipeline_bytes<kMBlocks>(), reduction_bytes<kMBlocks>()); }

// ---------------------------------------------------------------------------------------------------
// The GEMM. Block (n_block, split, m_tile) computes rows [16 kMBlocks m_tile, +16 kMBlocks) x columns
// [128 n_block, +128) over stages [split * iters_per_split, +iters_per_split) of K.

template <typename T, int kMBlocks>
__global__ void __launch_bounds__(kThreads) w4a16_gemm_kernel(
    const T* __restrict__ x, const int4* __restrict__ w, const T* __restrict__ scales,
    const float* __restrict__ bias, float* __restrict__ partial, T* __restrict__ out,
    int M, int N, int K, int iters_per_split) {
  constexpr int kRows = 16 * kMBlocks;
  constexpr int kAChunks = a_chunks<kMBlocks>();
  static_assert(kAChunks % kThreads == 0, "every thread copies the same number of activation chunks");

  int4* smem = rt::dynamic_smem<int4>();
  int4* sh_a = smem;                       // [kStages][kRows][16 chunks], swizzled
  int4* sh_b = sh_a + kStages * kAChunks;  // [kStages][8 k16 rows][64 chunks], as in global memory
  int4* sh_s = sh_b + kStages * kBChunks;  // [kStages][16 chunks]

  const int n_block = blockIdx.x, split = blockIdx.y, m0 = blockIdx.z * kRows;
  const int it_begin = split * iters_per_split;
  const int it_end = min(it_begin + iters_per_split, K / kBlockK);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp / kWarpsK, wk = warp % kWarpsK;
  // N % 64 == 0 but not necessarily % 128: the last block may have only its first 64-column slab.
  const int block_cols = min(kBlockN, N - n_block * kBlockN);
  const bool slab_valid = wn * 64 < block_cols;

  const int64_t w_row_chunks = N / 2;  // one k16 row of the whole weight: 2 N words = N / 2 chunks
  const int4* w_block = w + n_block * kBRowChunks;
  const uint64_t policy = ptx::evict_first_policy();

  auto load_stage = [&](int it, int slot) {
    int4* a_dst = sh_a + slot * kAChunks;
#pragma unroll
    for (int i = 0; i < kAChunks / kThreads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int row = c / kAChunksPerRow, chunk = c % kAChunksPerRow;
      const bool valid = m0 + row < M;
      const T* src = x + static_cast<int64_t>(valid ? m0 + row : 0) * K + it * kBlockK + chunk * 8;
      // Swizzle: chunk c of row r goes to c ^ (r % 8), so that the eight rows one ldmatrix phase reads
      // (same logical chunk) fall in eight different 16-byte bank groups. Rows past M come in as zeros
      // (valid = false): their products are never stored, but must not be NaN garbage either.
      ptx::cp_async(a_dst + row * kAChunksPerRow + (chunk ^ (row % 8)), src, valid, "activations");
    }
    int4* b_dst = sh_b + slot * kBChunks;
#pragma unroll
    for (int i = 0; i < kBChunks / kThreads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int row = c / kBRowChunks, col = c % kBRowChunks;
      if (col * 2 < block_cols) {  // a chunk is 4 words = 2 columns of a k16 row
        // Evict-first: each weight byte is read once (see the header comment).
        ptx::cp_async_policy(b_dst + c, w_block + (static_cast<int64_t>(it) * kK16PerStage + row) * w_row_chunks + col,
                             policy, "weights");
      }
    }
    if (threadIdx.x < kSChunks && threadIdx.x * 8 < block_cols) {
      ptx::cp_async(sh_s + slot * kSChunks + threadIdx.x,
                    scales + static_cast<int64_t>(it) * N + n_block * kBlockN + threadIdx.x * 8, true, "scales");
    }
  };

  float acc[kMBlocks][8][4];
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][j][e] = 0.f;

  auto compute_stage = [&](int slot) {
    const int4* a_st = sh_a + slot * kAChunks;
    const int4* b_st = sh_b + slot * kBChunks;
    // Position 8 g + j of a 64-column block of scales is sub-tile j's column for lanes of group g.
    const int4 s_raw = sh_s[slot * kSChunks + wn * 8 + lane / 4];
    const T* s8 = reinterpret_cast<const T*>(&s_raw);
#pragma unroll
    for (int kk = 0; kk < kK16PerWarp; ++kk) {
      const int r = wk * kK16PerWarp + kk;  // k16 row within the stage
      uint32_t a[kMBlocks][4];
#pragma unroll
      for (int mb = 0; mb < kMBlocks; ++mb) {
        const int row = mb * 16 + lane % 16, chunk = 2 * r + lane / 16;
        ptx::ldmatrix_x4(a[mb], a_st + row * kAChunksPerRow + (chunk ^ (row % 8)));
      }
      // The lane's 16 bytes of tile (r, wn): B fragments of the eight n8 sub-tiles, two per word.
      const int4 bq = b_st[r * kBRowChunks + wn * 32 + lane];
      for_each_fragment<T>(bq, s8, [&](int j, uint32_t b0, uint32_t b1) {
#pragma unroll
        for (int mb = 0; mb < kMBlocks; ++mb) ptx::mma_m16n8k16<T>(acc[mb][j], a[mb], b0, b1);
      });
    }
  };

  // Pipeline: kStages - 1 stages in flight before the first multiply. A commit per step even when
  // nothing was issued keeps the group count, and with it wait_group's meaning, uniform.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (it_begin + s < it_end) load_stage(it_begin + s, s);
    ptx::cp_async_commit();
  }
  for (int it = it_begin; it < it_end; ++it) {
    ptx::cp_async_wait<kStages - 2>();  // this thread's copies of stage `it` have landed ...
    __syncthreads();               // ... everyone's have, and everyone is done with the slot refilled next
    const int next = it + kStages - 1;
    if (next < it_end) load_stage(next, (next - it_begin) % kStages);
    ptx::cp_async_commit();
    if (slab_valid) compute_stage((it - it_begin) % kStages);
  }

  // The four K-warps of a slab sum their accumulators through the (now idle) pipeline memory, in a fixed
  // order. Lane-minor layout: consecutive lanes write consecutive words, no bank conflicts.
  ptx::cp_async_wait<0>();
  __syncthreads();
  constexpr int kAcc = kMBlocks * 8 * 4;
  float* red = reinterpret_cast<float*>(smem);
  if (wk > 0 && slab_valid) {
    float* dst = red + ((wk - 1) * kWarpsN + wn) * kAcc * 32 + lane;
#pragma unroll
    for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) mem::store(dst + ((mb * 8 + j) * 4 + e) * 32, acc[mb][j][e], "reduction_store");
  }
  __syncthreads();
  if (wk > 0 || !slab_valid) return;
#pragma unroll
  for (int src_wk = 1; src_wk < kWarpsK; ++src_wk) {
    const float* src = red + ((src_wk - 1) * kWarpsN + wn) * kAcc * 32 + lane;
#pragma unroll
    for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mb][j][e] += mem::load(src + ((mb * 8 + j) * 4 + e) * 32, "reduction_load");
  }

  // Epilogue: accumulator c0 c1 (c2 c3) of sub-tile j is row g (g + 8), columns 2t, 2t + 1. Without a K
  // split the result is final: bias added in float32, rounded once. Otherwise float32 partials.
  const int g = lane / 4, t = lane % 4;
  const bool final_result = gridDim.y == 1;
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = n_block * kBlockN + wn * 64 + 8 * j + 2 * t;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + mb * 16 + g + 8 * half;
        if (row >= M) continue;
        float v0 = acc[mb][j][2 * half], v1 = acc[mb][j][2 * half + 1];
        if (final_result) {
          if (bias != nullptr) {
            v0 += bias[col];
            v1 += bias[col + 1];
          }
          mem::store(reinterpret_cast<Pair<T>*>(out + static_cast<int64_t>(row) * N + col), to_pair<T>(v0, v1),
                     "output");
        } else {
          mem::store(reinterpret_cast<float2*>(partial + (static_cast<int64_t>(split) * M + row) * N + col),
                     make_float2(v0, v1), "partials");
        }
      }
    }
  }
}

// out = sum over splits of the float32 partials (+ bias), in split order, rounded once.
template <typename T>
__global__ void reduce_partials_kernel(const float* __restrict__ partial, const float* __restrict__ bias,
                                       T* __restrict__ out, int splits, int64_t mn, int N) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += partial[k * mn + i];
    if (bias != nullptr) s += bias[i % N];
    out[i] = to_scalar<T>(s);
  }
}

template <typename T, int kMBlocks>
cudaError_t launch_typed(const Plan& p, const void* x, const int32_t* w, const void* scales, const float* bias,
                         float* workspace, void* out, int M, int N, int K, cudaStream_t stream) {
  auto* kernel = w4a16_gemm_kernel<T, kMBlocks>;
  constexpr int smem = smem_bytes<kMBlocks>();
  cudaError_t err = rt::set_max_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  err = rt::launch(kernel, dim3(p.n_blocks, p.splits, p.m_tiles), dim3(kThreads), smem, stream,
                   static_cast<const T*>(x), reinterpret_cast<const int4*>(w), static_cast<const T*>(scales), bias,
                   workspace, static_cast<T*>(out), M, N, K, p.iters_per_split);
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t mn = static_cast<int64_t>(M) * N;
  const int blocks = static_cast<int>(std::min<int64_t>((mn + 255) / 256, 4096));
  return rt::launch(reduce_partials_kernel<T>, dim3(blocks), dim3(256), 0, stream, workspace, bias,
                    static_cast<T*>(out), p.splits, mn, N);
}

template <typename T>
cudaError_t launch_dtype(const Plan& p, const void* x, const int32_t* w, const void* scales, const float* bias,
                         float* workspace, void* out, int M, int N, int K, cudaStream_t stream) {
  // Three row-tile heights (16, 32, 64) keep the build at 6 kernel instantiations per architecture.
  switch (p.m_blocks) {
    case 1: return launch_typed<T, 1>(p, x, w, scales, bias, workspace, out, M, N, K, stream);
    case 2: return launch_typed<T, 2>(p, x, w, scales, bias, workspace, out, M, N, K, stream);
    case 4: return launch_typed<T, 4>(p, x, w, scales, bias, workspace, out, M, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int shared_bytes(int m_blocks) {
  return m_blocks == 1 ? smem_bytes<1>() : m_blocks == 2 ? smem_bytes<2>() : smem_bytes<4>();
}

cudaError_t launch(const Plan& plan, Dtype dtype, const void* x, const int32_t* w, const void* scales,
                   const float* bias, float* workspace, void* out, int M, int N, int K, cudaStream_t stream) {
  if (dtype == Dtype::kHalf) return launch_dtype<__half>(plan, x, w, scales, bias, workspace, out, M, N, K, stream);
  return launch_dtype<__nv_bfloat16>(plan, x, w, scales, bias, workspace, out, M, N, K, stream);
}

}  // namespace grace_kernels::w4a16
