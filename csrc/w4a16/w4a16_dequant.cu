// W4A16 dequantize: the dense weight W[N, K] = scale[n, k / 128] * q[n, k] (float16 or bfloat16,
// row-major, the nn.Linear layout) from the GEMM's kernel layout, for the large-M path that hands the
// product to cuBLAS: from a few hundred rows on, a W4A16 GEMM is bound by math rather than by the weight
// stream, and dequantizing once (2.5 bytes of traffic per weight) then running a dense GEMM can beat
// dequantizing inside every row tile. grace_kernels.dense_crossover measures which wins per shape.
//
// Every element is what the GEMM feeds its mma: the same conversion and the same one rounding of q * s
// (detail::scaled_fragments), so W equals dequantize(packed, scales) rounded to the dtype, bit for bit.
//
// Verified as the GEMM is (see w4a16_gemm.cu and the README): bit for bit against the reference on CPU by
// tests/test_w4a16_simt.py, and on GPUs by tests/test_w4a16_gpu.py.
//
// Block (n_tile, group) turns one 64-column x 128-k tile (one scale group) of the kernel layout into
// 64 rows x 256 bytes of W; warp r takes k16 row r. A lane's fragments are 2 k-adjacent values at 16
// (column, k) places, scattered over eight rows: written straight to global memory they would use 16 of
// every 32-byte sector. They go through shared memory instead, rows padded by 16 bytes so that the eight
// rows a fragment store touches fall in different banks, and leave as whole 256-byte rows.
#include "common/device.cuh"
#include "w4a16/convert.cuh"
#include "w4a16/w4a16.h"

namespace grace_kernels::w4a16 {
namespace {

using namespace detail;

constexpr int kDequantThreads = 256;            // 8 warps: one per k16 row of a scale group
constexpr int kTileCols = 64;                   // columns (rows of W) per block: one kernel-layout tile
constexpr int kRowWords = kGroupSize / 2 + 4;   // one row of W in shared memory: 64 words of k pairs + 4 pad
constexpr int kDequantSmem = kTileCols * kRowWords * 4;
constexpr int kRowChunks = kGroupSize / 8;      // 16-byte chunks of one row of the tile
static_assert((kRowWords * 4) % 16 == 0, "padded rows keep 16-byte alignment for the read-back");
static_assert(kTileCols * kRowChunks % kDequantThreads == 0, "every thread writes the same number of chunks");

template <typename T>
__global__ void __launch_bounds__(kDequantThreads) w4a16_dequant_kernel(
    const int4* __restrict__ w, const T* __restrict__ scales, T* __restrict__ out, int N, int K) {
  uint32_t* tile = rt::dynamic_smem<uint32_t>();  // [64 columns][kRowWords], k pairs of one column per row
  const int n_tile = blockIdx.x, group = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // The lane's 16 bytes of tile (k16 row 8 group + warp, n_tile), and the 8 scales of its columns.
  const int4 bq = mem::load(w + (static_cast<int64_t>(group) * 8 + warp) * (N / 2) + n_tile * 32 + lane, "weights");
  const int4 s_raw = mem::load(
      reinterpret_cast<const int4*>(scales + static_cast<int64_t>(group) * N + n_tile * kTileCols + 8 * g), "scales");
  const T* s8 = reinterpret_cast<const T*>(&s_raw);
  for_each_fragment<T>(bq, s8, [&](int j, uint32_t b0, uint32_t b1) {
    // Column 8 j + g; b0 holds k = 16 warp + 2 t, +1 and b1 the same + 8. Word (8 j + g) * 68 + 8 warp + t:
    // 68 = 4 mod 32, so the warp's 32 lanes hit banks 4 g + t, all distinct.
    uint32_t* row = tile + (8 * j + g) * kRowWords + 8 * warp + t;
    mem::store(row, b0, "tile_store_k0");
    mem::store(row + 4, b1, "tile_store_k8");
  });
  __syncthreads();
  // Eight consecutive lanes read one row's 128 contiguous bytes (conflict-free) and a warp writes two
  // whole 256-byte rows of W.
#pragma unroll
  for (int i = 0; i < kTileCols * kRowChunks / kDequantThreads; ++i) {
    const int c = threadIdx.x + i * kDequantThreads;
    const int col = c / kRowChunks, chunk = c % kRowChunks;
    const int4 v = mem::load(reinterpret_cast<const int4*>(tile + col * kRowWords + chunk * 4), "tile_load");
    mem::store(reinterpret_cast<int4*>(out + static_cast<int64_t>(n_tile * kTileCols + col) * K + group * kGroupSize +
                                       chunk * 8),
               v, "output");
  }
}

}  // namespace

int dequantize_shared_bytes() { return kDequantSmem; }

cudaError_t launch_dequantize(Dtype dtype, const int32_t* w, const void* scales, void* out, int N, int K,
                              cudaStream_t stream) {
  const dim3 grid(N / kTileCols, K / kGroupSize);
  const auto* wq = reinterpret_cast<const int4*>(w);
  if (dtype == Dtype::kHalf) {
    return rt::launch(w4a16_dequant_kernel<__half>, grid, dim3(kDequantThreads), kDequantSmem, stream, wq,
                      static_cast<const __half*>(scales), static_cast<__half*>(out), N, K);
  }
  return rt::launch(w4a16_dequant_kernel<__nv_bfloat16>, grid, dim3(kDequantThreads), kDequantSmem, stream, wq,
                    static_cast<const __nv_bfloat16*>(scales), static_cast<__nv_bfloat16*>(out), N, K);
}

}  // namespace grace_kernels::w4a16
