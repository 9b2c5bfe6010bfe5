// Host side of the W4A16 CUDA kernels: argument checks, the block plan, the split-K workspace, the launches.
// Registered as the CUDA implementations of grace_kernels::w4a16_matmul_repacked and
// grace_kernels::w4a16_dequantize_repacked, whose schemas, fakes and CPU implementations live in
// grace_kernels/ops/w4a16.py (csrc/torch_bindings.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <optional>

#include "w4a16/w4a16.h"

namespace grace_kernels::w4a16 {
namespace {

// Queried once per device (ATen's device-properties cache lives in a header that needs the full toolkit,
// cuSPARSE included, which build machines may lack).
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> counts{};
  const int i = device;
  int n = i < 64 ? counts[i].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, i));
    if (i < 64) counts[i].store(n, std::memory_order_relaxed);
  }
  return n;
}

void check_aligned(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                    " must be 16-byte aligned (the kernels read it 16 bytes at a time)");
}

}  // namespace

at::Tensor w4a16_matmul_repacked_cuda(const at::Tensor& x, const at::Tensor& kernel_packed,
                                      const at::Tensor& kernel_scales, int64_t group_size,
                                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.is_cuda() && kernel_packed.is_cuda() && kernel_scales.is_cuda(),
                    "w4a16_matmul_repacked: x, kernel_packed and kernel_scales must be CUDA tensors");
  TORCH_CHECK_VALUE(x.dim() == 2, "w4a16_matmul_repacked: x must be [M, K], got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                    "w4a16_matmul_repacked: x must be float16 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(K % kBlockK == 0 && K > 0, "w4a16_matmul_repacked: the CUDA kernel needs K % 128 == 0, got K = ",
                    K);
  TORCH_CHECK_VALUE(group_size == kGroupSize, "w4a16_matmul_repacked: the CUDA kernel needs group_size 128, got ",
                    group_size);
  TORCH_CHECK_VALUE(kernel_packed.scalar_type() == at::kInt && kernel_packed.dim() == 2 &&
                        kernel_packed.size(0) * 16 == K && kernel_packed.size(1) % 2 == 0,
                    "w4a16_matmul_repacked: kernel_packed must be int32 [K / 16, 2 N] with K = ", K, ", got ",
                    kernel_packed.scalar_type(), " ", kernel_packed.sizes());
  const int64_t N = kernel_packed.size(1) / 2;
  TORCH_CHECK_VALUE(N % 64 == 0 && N > 0, "w4a16_matmul_repacked: the CUDA kernel needs N % 64 == 0, got N = ", N);
  TORCH_CHECK_VALUE(kernel_scales.scalar_type() == x.scalar_type() && kernel_scales.dim() == 2 &&
                        kernel_scales.size(0) == K / kGroupSize && kernel_scales.size(1) == N,
                    "w4a16_matmul_repacked: kernel_scales must be ", x.scalar_type(), " [", K / kGroupSize, ", ", N,
                    "], got ", kernel_scales.scalar_type(), " ", kernel_scales.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous() && kernel_packed.is_contiguous() && kernel_scales.is_contiguous(),
                    "w4a16_matmul_repacked: x, kernel_packed and kernel_scales must be contiguous");
  TORCH_CHECK_VALUE(x.device() == kernel_packed.device() && x.device() == kernel_scales.device(),
                    "w4a16_matmul_repacked: all tensors must be on one device");
  TORCH_CHECK_VALUE(M < (int64_t{1} << 31) / 64 && N * K < (int64_t{1} << 34),
                    "w4a16_matmul_repacked: problem too large for 32-bit tile indices");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                          bias->is_contiguous() && bias->device() == x.device(),
                      "w4a16_matmul_repacked: bias must be a contiguous float32 [", N, "] on x's device");
    bias_ptr = bias->data_ptr<float>();
  }
  check_aligned("w4a16_matmul_repacked", x, "x");
  check_aligned("w4a16_matmul_repacked", kernel_packed, "kernel_packed");
  check_aligned("w4a16_matmul_repacked", kernel_scales, "kernel_scales");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const Plan plan = make_plan(M, N, K, sm_count(x.get_device()));
  TORCH_CHECK_VALUE(plan.m_tiles <= 65535, "w4a16_matmul_repacked: M = ", M, " exceeds the grid's limit");
  at::Tensor workspace;
  if (plan.splits > 1) workspace = at::empty({plan.splits, M, N}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch(plan, x.scalar_type() == at::kHalf ? Dtype::kHalf : Dtype::kBFloat16, x.data_ptr(),
                        kernel_packed.data_ptr<int32_t>(), kernel_scales.data_ptr(), bias_ptr,
                        plan.splits > 1 ? workspace.data_ptr<float>() : nullptr, out.data_ptr(),
                        static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                        c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor w4a16_dequantize_repacked_cuda(const at::Tensor& kernel_packed, const at::Tensor& kernel_scales,
                                          int64_t group_size) {
  TORCH_CHECK_VALUE(kernel_packed.is_cuda() && kernel_scales.is_cuda() && kernel_packed.device() == kernel_scales.device(),
                    "w4a16_dequantize_repacked: kernel_packed and kernel_scales must be CUDA tensors on one device");
  TORCH_CHECK_VALUE(group_size == kGroupSize, "w4a16_dequantize_repacked: the CUDA kernel needs group_size 128, got ",
                    group_size);
  TORCH_CHECK_VALUE(kernel_packed.scalar_type() == at::kInt && kernel_packed.dim() == 2 && kernel_packed.size(1) % 2 == 0,
                    "w4a16_dequantize_repacked: kernel_packed must be int32 [K / 16, 2 N], got ",
                    kernel_packed.scalar_type(), " ", kernel_packed.sizes());
  const int64_t K = kernel_packed.size(0) * 16, N = kernel_packed.size(1) / 2;
  TORCH_CHECK_VALUE(K % kGroupSize == 0 && N % 64 == 0 && K > 0 && N > 0,
                    "w4a16_dequantize_repacked: the CUDA kernel needs K % 128 == 0 and N % 64 == 0, got K = ", K,
                    ", N = ", N);
  TORCH_CHECK_VALUE((kernel_scales.scalar_type() == at::kHalf || kernel_scales.scalar_type() == at::kBFloat16) &&
                        kernel_scales.dim() == 2 && kernel_scales.size(0) == K / kGroupSize && kernel_scales.size(1) == N,
                    "w4a16_dequantize_repacked: kernel_scales must be float16/bfloat16 [", K / kGroupSize, ", ", N,
                    "], got ", kernel_scales.scalar_type(), " ", kernel_scales.sizes());
  TORCH_CHECK_VALUE(kernel_packed.is_contiguous() && kernel_scales.is_contiguous(),
                    "w4a16_dequantize_repacked: kernel_packed and kernel_scales must be contiguous");
  TORCH_CHECK_VALUE(N * K < (int64_t{1} << 34) && K / kGroupSize <= 65535,
                    "w4a16_dequantize_repacked: weight too large for the kernel's grid");
  check_aligned("w4a16_dequantize_repacked", kernel_packed, "kernel_packed");
  check_aligned("w4a16_dequantize_repacked", kernel_scales, "kernel_scales");

  const c10::cuda::CUDAGuard guard(kernel_packed.device());
  at::Tensor out = at::empty({N, K}, kernel_scales.options());
  C10_CUDA_CHECK(launch_dequantize(kernel_scales.scalar_type() == at::kHalf ? Dtype::kHalf : Dtype::kBFloat16,
                                   kernel_packed.data_ptr<int32_t>(), kernel_scales.data_ptr(), out.data_ptr(),
                                   static_cast<int>(N), static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace grace_kernels::w4a16
