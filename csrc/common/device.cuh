// Device primitives the kernels are written against: PTX wrappers (cp.async, ldmatrix, mma, lop3,
// L2 cache policies), counted plain loads and stores, dynamic shared memory, and the launch. Kernels call
// only these names for anything that is not plain C++, which is what lets one kernel source compile twice:
//   * by nvcc, for the GPU (this file);
//   * by a host C++ compiler with GRACE_SIMT defined, against tests/simt/simt.h (the test machinery, on the
//     include path as "simt/simt.h"), which gives the same names a CPU emulation (threads of a block as host
//     threads, warp-collective ldmatrix/mma, cp.async as copies that land late), so the kernel's own index
//     arithmetic and synchronisation run on CPU under AddressSanitizer and ThreadSanitizer
//     (tests/test_w4a16_simt.py).
//
// Every memory access the executor accounts for (cp.async, mem::load, mem::store) names its site: a string
// literal, unique within its kernel, under which the executor reports what the accesses from there cost.
// Tests refer to the site by that name, not by where it sits in the source. On the GPU the name is unused.
#pragma once

#if defined(GRACE_SIMT)
#include "simt/simt.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace grace_kernels::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// An L2 policy for data read exactly once (streamed weights): evict it first.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// 16 bytes global -> shared, asynchronously, with an L2 cache policy.
__device__ __forceinline__ void cp_async_policy(void* smem, const void* gmem, uint64_t policy, const char* /*site*/) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(smem)), "l"(gmem), "l"(policy));
}

// 16 bytes global -> shared, asynchronously, default caching. valid = false reads nothing and fills the
// 16 bytes with zeros (src-size 0).
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid, const char* /*site*/) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(kPending) : "memory");
}

// Four 8x8 b16 matrices: lane l addresses row l % 8 of matrix l / 8 and receives elements 2 (l % 4), +1
// of row l / 4 of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}

// d = a b + c for a 16x16 (row-major) times 16x8 (column-major) tile, float32 accumulators; T is __half or
// __nv_bfloat16. Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16".
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Any three-input bitwise function in one instruction; kLut is the function applied to 0xF0, 0xCC, 0xAA.
template <int kLut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
}

}  // namespace grace_kernels::ptx

namespace grace_kernels::mem {

// Plain loads and stores, global or shared. On the GPU they are ordinary accesses; the SIMT executor
// counts what each warp-wide one costs (32-byte sectors, shared-memory bank wavefronts), which is why a
// kernel whose coalescing or bank layout is a design claim goes through these names.
template <typename T>
__device__ __forceinline__ T load(const T* p, const char* /*site*/) {
  return *p;
}

template <typename T>
__device__ __forceinline__ void store(T* p, const T& v, const char* /*site*/) {
  *p = v;
}

}  // namespace grace_kernels::mem

namespace grace_kernels::rt {

// The block's dynamic shared memory (sized at launch).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ int4 grace_dynamic_smem[];
  return reinterpret_cast<T*>(grace_dynamic_smem);
}

// Above 48 KB, dynamic shared memory has to be asked for explicitly (per device, so on every launch).
template <typename... KArgs>
cudaError_t set_max_dynamic_smem(void (*kernel)(KArgs...), int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, int smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace grace_kernels::rt

#endif  // GRACE_SIMT
