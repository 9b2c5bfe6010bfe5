// W4A16 device helpers shared by the GEMM (w4a16_gemm.cu) and the dequantize kernel (w4a16_dequant.cu):
// the int4 -> float16/bfloat16 conversion of one word of the kernel layout and the per-group scaling, so
// that the dense weight the dequantize kernel writes is, bit for bit, what the GEMM feeds its mma.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/device.cuh"

namespace grace_kernels::w4a16::detail {

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  return ptx::lop3<(0xF0 & 0xCC) | 0xAA>(a, b, c);
}

// ---------------------------------------------------------------------------------------------------
// Half-precision helpers: T2 is the packed pair type; registers travel as uint32_t to feed the mma.

template <typename T>
using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;

template <typename T>
__device__ __forceinline__ Pair<T> as_pair(uint32_t bits) { return *reinterpret_cast<Pair<T>*>(&bits); }

template <typename T>
__device__ __forceinline__ uint32_t as_bits(Pair<T> v) { return *reinterpret_cast<uint32_t*>(&v); }

// One word of the kernel layout holds nibbles p = 0..7; pairs (p, p + 4) are the two consecutive k of
// one fragment register. Returns the four registers for pairs (0, 4), (1, 5), (2, 6), (3, 7) as codes
// q = u - 8, exactly.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t q, uint32_t (&out)[4]);

template <>
__device__ __forceinline__ void dequant_word<__half>(uint32_t q, uint32_t (&out)[4]) {
  // 0x6400 is 1024.0, whose ulp is 1: OR-ing u into the low mantissa bits gives 1024 + u, and u at bits
  // 4..7 gives 1024 + 16 u. Subtracting 1032 (0x6408), or one fma by 1/16 (0x2C00) with -72 (0xD480),
  // leaves u - 8, so pairs (1, 5) and (3, 7) need no shift at all.
  constexpr uint32_t kLo = 0x000F000F, kHi = 0x00F000F0, kMagic = 0x64006400;
  const Pair<__half> sub = as_pair<__half>(0x64086408), mul = as_pair<__half>(0x2C002C00),
                     add = as_pair<__half>(0xD480D480);
  const uint32_t lo0 = lop3_and_or(q, kLo, kMagic), hi0 = lop3_and_or(q, kHi, kMagic);
  q >>= 8;
  const uint32_t lo1 = lop3_and_or(q, kLo, kMagic), hi1 = lop3_and_or(q, kHi, kMagic);
  out[0] = as_bits<__half>(__hsub2(as_pair<__half>(lo0), sub));
  out[1] = as_bits<__half>(__hfma2(as_pair<__half>(hi0), mul, add));
  out[2] = as_bits<__half>(__hsub2(as_pair<__half>(lo1), sub));
  out[3] = as_bits<__half>(__hfma2(as_pair<__half>(hi1), mul, add));
}

template <>
__device__ __forceinline__ void dequant_word<__nv_bfloat16>(uint32_t q, uint32_t (&out)[4]) {
  // bfloat16 keeps 7 mantissa bits: 0x4300 (128.0, ulp 1) can take u in bits 0..3 but 16 u would carry
  // into the exponent, so every pair is shifted down to bits 0..3 and 136 (0x4308) subtracted.
  constexpr uint32_t kLo = 0x000F000F, kMagic = 0x43004300;
  const Pair<__nv_bfloat16> sub = as_pair<__nv_bfloat16>(0x43084308);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    out[r] = as_bits<__nv_bfloat16>(__hsub2(as_pair<__nv_bfloat16>(lop3_and_or(q >> (4 * r), kLo, kMagic)), sub));
  }
}

template <typename T>
__device__ __forceinline__ Pair<T> broadcast(T s) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2half2(s);
  } else {
    return __bfloat162bfloat162(s);
  }
}

template <typename T>
__device__ __forceinline__ Pair<T> to_pair(float a, float b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __floats2half2_rn(a, b);
  } else {
    return __floats2bfloat162_rn(a, b);
  }
}

template <typename T>
__device__ __forceinline__ T to_scalar(float a) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(a);
  } else {
    return __float2bfloat16_rn(a);
  }
}

// The lane's scaled B fragments of sub-tiles j = 2 wi and 2 wi + 1 from word wi of its 16 bytes of a
// kernel-layout tile: frag[h] = {b0, b1} of sub-tile 2 wi + h, i.e. column 8 j + lane / 4 of the tile and
// k = 2 (lane % 4) + {0, 1} (b0) and the same + 8 (b1). s8[j] is sub-tile j's scale (position 8 g + j of a
// 64-column block of kernel_scales). One __hmul2: every weight is rounded once, q * s.
template <typename T>
__device__ __forceinline__ void scaled_fragments(uint32_t word, const T* s8, int wi, uint32_t (&frag)[2][2]) {
  uint32_t q[4];
  dequant_word<T>(word, q);
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // registers b0 b1 of sub-tile 2 wi + h are pairs 2 h and 2 h + 1
    const Pair<T> s2 = broadcast<T>(s8[2 * wi + h]);
    frag[h][0] = as_bits<T>(__hmul2(as_pair<T>(q[2 * h]), s2));
    frag[h][1] = as_bits<T>(__hmul2(as_pair<T>(q[2 * h + 1]), s2));
  }
}

// Calls f(j, b0, b1) for each of the eight sub-tiles j of a lane's 16-byte chunk of a kernel-layout tile,
// with its scaled B fragments (see scaled_fragments). Fully unrolled: j is a constant in each call.
template <typename T, typename F>
__device__ __forceinline__ void for_each_fragment(const int4& chunk, const T* s8, F&& f) {
  const uint32_t words[4] = {static_cast<uint32_t>(chunk.x), static_cast<uint32_t>(chunk.y),
                             static_cast<uint32_t>(chunk.z), static_cast<uint32_t>(chunk.w)};
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    uint32_t frag[2][2];
    scaled_fragments<T>(words[wi], s8, wi, frag);
#pragma unroll
    for (int h = 0; h < 2; ++h) f(2 * wi + h, frag[h][0], frag[h][1]);
  }
}

}  // namespace grace_kernels::w4a16::detail
