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

namespace {

struct WeightShape {
  int64_t N, K;
};

// What both kernels need of a weight in the kernel layout: kernel_packed int32 [K / 16, 2 N] and
// kernel_scales float16/bfloat16 [K / 128, N], CUDA tensors on one device, contiguous and 16-byte aligned,
// K % 128 == 0, N % 64 == 0, group size 128.
WeightShape check_weight(const char* op, const at::Tensor& kernel_packed, const at::Tensor& kernel_scales,
                         int64_t group_size) {
  TORCH_CHECK_VALUE(kernel_packed.is_cuda() && kernel_scales.is_cuda() && kernel_packed.device() == kernel_scales.device(),
                    op, ": kernel_packed and kernel_scales must be CUDA tensors on one device");
  TORCH_CHECK_VALUE(group_size == kGroupSize, op, ": the CUDA kernel needs group_size 128, got ", group_size);
  TORCH_CHECK_VALUE(kernel_packed.scalar_type() == at::kInt && kernel_packed.dim() == 2 && kernel_packed.size(1) % 2 == 0,
                    op, ": kernel_packed must be int32 [K / 16, 2 N], got ", kernel_packed.scalar_type(), " ",
                    kernel_packed.sizes());
  const WeightShape w{kernel_packed.size(1) / 2, kernel_packed.size(0) * 16};
  TORCH_CHECK_VALUE(w.K % kBlockK == 0 && w.N % 64 == 0 && w.K > 0 && w.N > 0, op,
                    ": the CUDA kernel needs K % 128 == 0 and N % 64 == 0, got K = ", w.K, ", N = ", w.N);
  TORCH_CHECK_VALUE((kernel_scales.scalar_type() == at::kHalf || kernel_scales.scalar_type() == at::kBFloat16) &&
                        kernel_scales.dim() == 2 && kernel_scales.size(0) == w.K / kGroupSize &&
                        kernel_scales.size(1) == w.N,
                    op, ": kernel_scales must be float16/bfloat16 [", w.K / kGroupSize, ", ", w.N, "], got ",
                    kernel_scales.scalar_type(), " ", kernel_scales.sizes());
  TORCH_CHECK_VALUE(kernel_packed.is_contiguous() && kernel_scales.is_contiguous(), op,
                    ": kernel_packed and kernel_scales must be contiguous");
  TORCH_CHECK_VALUE(w.N * w.K < (int64_t{1} << 34), op, ": weight too large for 32-bit tile indices");
  check_aligned(op, kernel_packed, "kernel_packed");
  check_aligned(op, kernel_scales, "kernel_scales");
  return w;
}

}  // namespace

at::Tensor w4a16_matmul_repacked_cuda(const at::Tensor& x, const at::Tensor& kernel_packed,
                                      const at::Tensor& kernel_scales, int64_t group_size,
                                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "w4a16_matmul_repacked";
  const auto [N, K] = check_weight(op, kernel_packed, kernel_scales, group_size);
  TORCH_CHECK_VALUE(x.is_cuda() && x.device() == kernel_packed.device(), op, ": x must be on the weight's device");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K, op, ": x must be [M, K] with K = ", K, ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
                    ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(kernel_scales.scalar_type() == x.scalar_type(), op, ": kernel_scales must be ", x.scalar_type(),
                    " (x's dtype), got ", kernel_scales.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t M = x.size(0);
  TORCH_CHECK_VALUE(M < (int64_t{1} << 31) / 64, op, ": M = ", M, " too large for 32-bit tile indices");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                          bias->is_contiguous() && bias->device() == x.device(),
                      op, ": bias must be a contiguous float32 [", N, "] on x's device");
    bias_ptr = bias->data_ptr<float>();
  }
  check_aligned(op, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const Plan plan = make_plan(M, N, K, sm_count(x.get_device()));
  TORCH_CHECK_VALUE(plan.m_tiles <= 65535, op, ": M = ", M, " exceeds the grid's limit");
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
  constexpr const char* op = "w4a16_dequantize_repacked";
  const auto [N, K] = check_weight(op, kernel_packed, kernel_scales, group_size);
  TORCH_CHECK_VALUE(K / kGroupSize <= 65535, op, ": K = ", K, " exceeds the grid's limit");

  const c10::cuda::CUDAGuard guard(kernel_packed.device());
  at::Tensor out = at::empty({N, K}, kernel_scales.options());
  C10_CUDA_CHECK(launch_dequantize(kernel_scales.scalar_type() == at::kHalf ? Dtype::kHalf : Dtype::kBFloat16,
                                   kernel_packed.data_ptr<int32_t>(), kernel_scales.data_ptr(), out.data_ptr(),
                                   static_cast<int>(N), static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace grace_kernels::w4a16
