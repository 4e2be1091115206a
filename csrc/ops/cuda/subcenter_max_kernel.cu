// CUDA sub-center max over the K columns of each identity, and its backward: one thread per (b, s) pair,
// in the order of the input's memory (row-major [B, S*K], or the transpose of a class-major buffer) so that
// neighbouring threads read neighbouring addresses.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kSubcenterThreads = 256;

template <typename scalar_t>
__global__ void subcenter_max_kernel(const scalar_t* __restrict__ cosines, scalar_t* __restrict__ values,
                                     int64_t* __restrict__ argmax, int64_t batch, int64_t num_id, int64_t k,
                                     int64_t cs0, int64_t cs1, bool class_major) {
  const int64_t pairs = batch * num_id;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = class_major ? p % batch : p / num_id, s = class_major ? p / batch : p % num_id;
    const scalar_t* src = cosines + b * cs0 + s * k * cs1;
    // Compared in the op-math type (exact: every value converts back unchanged).
    using acc_t = at::opmath_type<scalar_t>;
    acc_t best = static_cast<acc_t>(src[0]);
    int64_t arg = 0;
    // As the CPU kernel: strictly greater keeps the lowest k on a tie; the first NaN wins and stays.
    for (int64_t j = 1; j < k && !isnan(best); ++j) {
      const acc_t x = static_cast<acc_t>(src[j * cs1]);
      if (x > best || isnan(x)) {
        best = x;
        arg = j;
      }
    }
    values[b * num_id + s] = static_cast<scalar_t>(best);
    argmax[b * num_id + s] = arg;
  }
}

// Writes all K columns of each pair (grad at the argmax, zero elsewhere), so `out` needs no zeroing first.
template <typename scalar_t>
__global__ void subcenter_scatter_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ argmax,
                                         scalar_t* __restrict__ out, int64_t batch, int64_t num_id, int64_t k,
                                         int64_t gs0, int64_t gs1) {
  const int64_t pairs = batch * num_id;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = p / num_id, s = p % num_id, arg = argmax[p];
    const scalar_t g = grad[b * gs0 + s * gs1];
    scalar_t* dst = out + p * k;
    for (int64_t j = 0; j < k; ++j) dst[j] = j == arg ? g : scalar_t(0);
  }
}

int subcenter_blocks(int64_t pairs) {
  return static_cast<int>(std::min<int64_t>(cuda::ceil_div(pairs, kSubcenterThreads), 65535 * 8));
}

std::tuple<at::Tensor, at::Tensor> subcenter_max_cuda(const at::Tensor& cosines, int64_t k) {
  const char* op = "subcenter_max";
  TORCH_CHECK(cosines.is_cuda(), op, ": cosines must be a CUDA tensor");
  check_subcenter_input(cosines, k, op);
  const int64_t batch = cosines.size(0), num_id = cosines.size(1) / k;
  at::Tensor values = at::empty({batch, num_id}, cosines.options());
  at::Tensor argmax = at::empty({batch, num_id}, cosines.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, argmax};
  c10::cuda::CUDAGuard guard(cosines.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pairs = batch * num_id;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cosines.scalar_type(), "subcenter_max", [&] {
    subcenter_max_kernel<scalar_t><<<subcenter_blocks(pairs), kSubcenterThreads, 0, stream>>>(
        cosines.const_data_ptr<scalar_t>(), values.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<int64_t>(),
        batch, num_id, k, cosines.stride(0), cosines.stride(1), cosines.stride(0) < cosines.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, argmax};
}

at::Tensor subcenter_max_backward_cuda(const at::Tensor& grad, const at::Tensor& argmax, int64_t k) {
  const char* op = "subcenter_max_backward";
  TORCH_CHECK(grad.is_cuda(), op, ": grad must be a CUDA tensor");
  check_subcenter_grad(grad, argmax, k, op);
  at::Tensor out = at::empty({grad.size(0), grad.size(1) * k}, grad.options());
  if (grad.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor arg = argmax.contiguous();
  // A catchable error for an argmax out of range, as on CPU (not a device assert).
  cuda::check_range_cuda(arg, 0, k, op, "argmax");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pairs = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "subcenter_max_backward", [&] {
    subcenter_scatter_kernel<scalar_t><<<subcenter_blocks(pairs), kSubcenterThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), arg.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
        grad.size(0), grad.size(1), k, grad.stride(0), grad.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("subcenter_max", &partialfc::subcenter_max_cuda);
  m.impl("subcenter_max_backward", &partialfc::subcenter_max_backward_cuda);
}
