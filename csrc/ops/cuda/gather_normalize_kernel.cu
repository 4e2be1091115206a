// CUDA gather + L2-normalize of sampled rows and its backward: one block per row, the row read once into
// registers (strided over the block's threads), a block reduction, then the scaled write.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kNormThreads = 128;

template <typename in_t, typename out_t, typename acc_t>
__global__ void gather_normalize_kernel(const in_t* __restrict__ weight, const int64_t* __restrict__ index,
                                        out_t* __restrict__ out, acc_t* __restrict__ inv_norm, int64_t dim,
                                        int64_t ws0, int64_t ws1, int64_t os0, int64_t os1) {
  __shared__ acc_t scratch[32];
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  const in_t* src = weight + r * ws0;
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(src[j * ws1]);
    sum += v * v;
  }
  sum = cuda::block_sum(sum, scratch);
  const acc_t norm = sqrt(sum);
  // max(norm, 1e-12) that keeps a NaN norm, as std::max on CPU and clamp_min in the reference do: a row with
  // a NaN gives NaN everywhere (and a NaN inverse norm), rather than its other entries scaled by 1e12.
  const acc_t scale = acc_t(1) / (norm < acc_t(1e-12) ? acc_t(1e-12) : norm);
  out_t* dst = out + i * os0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j * os1] = static_cast<out_t>(static_cast<acc_t>(src[j * ws1]) * scale);
  if (threadIdx.x == 0) inv_norm[i] = scale;
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_backward_kernel(const scalar_t* grad, const scalar_t* __restrict__ normalized,
                                          const acc_t* __restrict__ inv_norm, acc_t* out, int64_t dim, int64_t gs0,
                                          int64_t gs1, int64_t ns0, int64_t ns1, int64_t os0, int64_t os1) {
  // `out` may alias `grad` (then both have one dtype and layout): every element is read before written.
  __shared__ acc_t scratch[32];
  const int64_t i = blockIdx.x;
  const scalar_t* g = grad + i * gs0;
  const scalar_t* n = normalized + i * ns0;
  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dot += static_cast<acc_t>(g[j * gs1]) * static_cast<acc_t>(n[j * ns1]);
  dot = cuda::block_sum(dot, scratch);
  const acc_t scale = inv_norm[i];
  acc_t* o = out + i * os0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x)
    o[j * os1] = (static_cast<acc_t>(g[j * gs1]) - static_cast<acc_t>(n[j * ns1]) * dot) * scale;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void gather_normalize_out_cuda(const at::Tensor& weight, const at::Tensor& index, at::Tensor& out, at::Tensor& inv) {
  const char* op = "gather_normalize";
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  check_index(index, weight, op);
  const int64_t rows = index.numel(), dim = weight.size(1);
  check_rows(weight, weight.size(0), dim, "weight", op);
  check_rows(out, rows, dim, "out", op);
  check_vector(inv, rows, "inv_norm", op);
  TORCH_CHECK(inv.is_contiguous() && inv.scalar_type() == acc_type_of(weight.scalar_type()), op,
              ": inv_norm must be a contiguous ", acc_type_of(weight.scalar_type()), " tensor, got ", inv.scalar_type());
  TORCH_CHECK(out.device() == weight.device() && inv.device() == weight.device(), op,
              ": out and inv_norm must be on ", weight.device());
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor idx = index.contiguous();
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather_normalize_in", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gather_normalize_out", [&] {
      gather_normalize_kernel<in_t, scalar_t, acc_t><<<rows, kNormThreads, 0, stream>>>(
          weight.const_data_ptr<in_t>(), idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
          inv.mutable_data_ptr<acc_t>(), dim, weight.stride(0), weight.stride(1), out.stride(0), out.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gather_normalize_cuda(const at::Tensor& weight, const at::Tensor& index,
                                                         at::ScalarType out_dtype) {
  TORCH_CHECK(is_float_type(out_dtype), "gather_normalize: out_dtype must be a floating type, got ", out_dtype);
  TORCH_CHECK(weight.dim() == 2, "gather_normalize: weight must be 2-D [num_classes, D], got ", weight.sizes());
  at::Tensor out = at::empty({index.numel(), weight.size(1)}, weight.options().dtype(out_dtype));
  at::Tensor inv = at::empty({index.numel()}, weight.options().dtype(acc_type_of(weight.scalar_type())));
  gather_normalize_out_cuda(weight, index, out, inv);
  return {out, inv};
}

void gather_normalize_backward_out_cuda(const at::Tensor& grad, const at::Tensor& normalized, const at::Tensor& inv,
                                        at::Tensor& out) {
  const char* op = "gather_normalize_backward";
  TORCH_CHECK(grad.is_cuda(), op, ": grad must be a CUDA tensor");
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [S, D], got ", grad.sizes());
  const int64_t rows = grad.size(0), dim = grad.size(1);
  check_rows(grad, rows, dim, "grad", op);
  check_rows(normalized, rows, dim, "normalized", op);
  check_rows(out, rows, dim, "out", op);
  check_vector(inv, rows, "inv_norm", op);
  TORCH_CHECK(inv.scalar_type() == at::kFloat || inv.scalar_type() == at::kDouble, op,
              ": inv_norm must be float32 or float64, got ", inv.scalar_type());
  TORCH_CHECK(out.scalar_type() == inv.scalar_type(), op, ": out must have inv_norm's dtype ", inv.scalar_type(),
              ", got ", out.scalar_type());
  TORCH_CHECK(normalized.scalar_type() == grad.scalar_type(), op, ": normalized (", normalized.scalar_type(),
              ") and grad (", grad.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(normalized.device() == grad.device() && inv.device() == grad.device() && out.device() == grad.device(),
              op, ": every tensor must be on ", grad.device());
  if (out.data_ptr() == grad.data_ptr()) {
    TORCH_CHECK(out.strides() == grad.strides() && out.scalar_type() == grad.scalar_type(), op,
                ": an out that aliases grad must have grad's dtype and strides");
  }
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor inv_c = inv.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "normalize_backward", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      normalize_backward_kernel<scalar_t, acc_t><<<rows, kNormThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), normalized.const_data_ptr<scalar_t>(), inv_c.const_data_ptr<acc_t>(),
          out.data_ptr<acc_t>(), dim, grad.stride(0), grad.stride(1), normalized.stride(0), normalized.stride(1),
          out.stride(0), out.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (inv_c.scalar_type() == at::kDouble) {
      launch(double(0));
    } else {
      launch(float(0));
    }
  });
}

at::Tensor gather_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& normalized, const at::Tensor& inv) {
  TORCH_CHECK(grad.dim() == 2, "gather_normalize_backward: grad must be 2-D [S, D], got ", grad.sizes());
  at::Tensor out = at::empty(grad.sizes(), grad.options().dtype(inv.scalar_type()));
  gather_normalize_backward_out_cuda(grad, normalized, inv, out);
  return out;
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("gather_normalize", &partialfc::gather_normalize_cuda);
  m.impl("gather_normalize_out", &partialfc::gather_normalize_out_cuda);
  m.impl("gather_normalize_backward", &partialfc::gather_normalize_backward_cuda);
  m.impl("gather_normalize_backward_out", &partialfc::gather_normalize_backward_out_cuda);
}
