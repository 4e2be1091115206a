// CUDA sparse SGD-momentum update: one block per sampled row, threads over the embedding dimension.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kUpdateThreads = 128;

template <typename w_t, typename g_t, typename acc_t>
__global__ void update_kernel(w_t* weight, w_t* mom, const int64_t* __restrict__ index, const g_t* __restrict__ grad,
                              int64_t dim, int64_t ws0, int64_t ws1, int64_t ms0, int64_t ms1, int64_t gs0,
                              int64_t gs1, acc_t lr, acc_t mu, acc_t wd) {
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  w_t* wr = weight + r * ws0;
  w_t* mr = mom + r * ms0;
  const g_t* gr = grad + i * gs0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const acc_t wv = static_cast<acc_t>(wr[j * ws1]);
    // The gradient is first rounded to the table's dtype, as torch.optim.SGD sees it.
    const acc_t gv = static_cast<acc_t>(static_cast<w_t>(gr[j * gs1])) + wd * wv;
    const acc_t mv = static_cast<acc_t>(mr[j * ms1]) * mu + gv;
    mr[j * ms1] = static_cast<w_t>(mv);
    wr[j * ws1] = static_cast<w_t>(wv - lr * mv);
  }
}

void sparse_sgd_update_cuda(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& index,
                            const at::Tensor& grad_rows, double lr, double momentum, double weight_decay) {
  const char* op = "sparse_sgd_update";
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  check_rows(weight, weight.size(0), weight.size(1), "weight", op);
  check_rows(momentum_buffer, weight.size(0), weight.size(1), "momentum_buffer", op);
  TORCH_CHECK(momentum_buffer.scalar_type() == weight.scalar_type(), op, ": momentum_buffer dtype ",
              momentum_buffer.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  check_index(index, weight, op);
  check_rows(grad_rows, index.numel(), weight.size(1), "grad_rows", op);
  TORCH_CHECK(momentum_buffer.device() == weight.device() && grad_rows.device() == weight.device(), op,
              ": weight, momentum_buffer and grad_rows must be on one device");
  const int64_t rows = index.numel();
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous();
  // Before any row is written: a bad index leaves table and momentum as they were.
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_sgd_update_w", [&] {
    using w_t = scalar_t;
    using acc_t = at::opmath_type<w_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_sgd_update_g", [&] {
      update_kernel<w_t, scalar_t, acc_t><<<rows, kUpdateThreads, 0, stream>>>(
          weight.data_ptr<w_t>(), momentum_buffer.data_ptr<w_t>(), idx.const_data_ptr<int64_t>(),
          grad_rows.const_data_ptr<scalar_t>(), weight.size(1), weight.stride(0), weight.stride(1),
          momentum_buffer.stride(0), momentum_buffer.stride(1), grad_rows.stride(0), grad_rows.stride(1),
          static_cast<acc_t>(lr), static_cast<acc_t>(momentum), static_cast<acc_t>(weight_decay));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sparse_sgd_update", &partialfc::sparse_sgd_update_cuda);
}
