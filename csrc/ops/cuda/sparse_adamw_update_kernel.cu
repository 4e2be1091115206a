// CUDA sparse AdamW update: one block per sampled row, threads over the embedding dimension; the row's step
// count is bumped by one thread, which forms the row's bias corrections for the block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <type_traits>

#include "common.cuh"

namespace partialfc {

// ../sparse_adamw_update.cpp
void check_sparse_adamw_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& row_step, const at::Tensor& index, const at::Tensor& rows,
                                    const char* rows_name, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, const char* op);

namespace {

constexpr int kAdamwThreads = 128;

template <typename w_t, typename g_t, typename step_t, typename acc_t>
__global__ void adamw_kernel(w_t* weight, w_t* exp_avg, w_t* exp_avg_sq, step_t* row_step,
                             const int64_t* __restrict__ index, const g_t* __restrict__ grad, int64_t dim, int64_t ws0,
                             int64_t ws1, int64_t ms0, int64_t ms1, int64_t vs0, int64_t vs1, int64_t ts0, int64_t gs0,
                             int64_t gs1, double lr, double beta1, double beta2, acc_t decay, acc_t eps) {
  __shared__ acc_t step_size, bc2_sqrt;
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  if (threadIdx.x == 0) {
    const int64_t t = static_cast<int64_t>(row_step[r * ts0]) + 1;
    row_step[r * ts0] = static_cast<step_t>(t);
    // In double, as torch.optim.AdamW forms them in Python floats.
    step_size = static_cast<acc_t>(lr / (1.0 - pow(beta1, static_cast<double>(t))));
    bc2_sqrt = static_cast<acc_t>(sqrt(1.0 - pow(beta2, static_cast<double>(t))));
  }
  __syncthreads();
  const acc_t one_minus_b1 = static_cast<acc_t>(1.0 - beta1), b2 = static_cast<acc_t>(beta2);
  const acc_t one_minus_b2 = static_cast<acc_t>(1.0 - beta2);
  w_t* wr = weight + r * ws0;
  w_t* mr = exp_avg + r * ms0;
  w_t* vr = exp_avg_sq + r * vs0;
  const g_t* gr = grad + i * gs0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    // The gradient is first rounded to the table's dtype, as torch.optim.AdamW sees it.
    const acc_t g = static_cast<acc_t>(static_cast<w_t>(gr[j * gs1]));
    const acc_t m0 = static_cast<acc_t>(mr[j * ms1]);
    const acc_t wv = static_cast<acc_t>(wr[j * ws1]) * decay;
    const acc_t mv = m0 + one_minus_b1 * (g - m0);
    const acc_t vv = static_cast<acc_t>(vr[j * vs1]) * b2 + one_minus_b2 * g * g;
    mr[j * ms1] = static_cast<w_t>(mv);
    vr[j * vs1] = static_cast<w_t>(vv);
    wr[j * ws1] = static_cast<w_t>(wv - step_size * (mv / (sqrt(vv) / bc2_sqrt + eps)));
  }
}

void sparse_adamw_update_cuda(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_step,
                              const at::Tensor& index, const at::Tensor& grad_rows, double lr, double beta1,
                              double beta2, double eps, double weight_decay) {
  const char* op = "sparse_adamw_update";
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor");
  check_sparse_adamw_update_args(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, "grad_rows", lr, beta1,
                                 beta2, eps, weight_decay, op);
  const int64_t rows = index.numel();
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous();
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_adamw_update_w", [&] {
    using w_t = scalar_t;
    using acc_t = at::opmath_type<w_t>;
    const acc_t decay = static_cast<acc_t>(1.0 - lr * weight_decay);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_adamw_update_g", [&] {
      using g_t = scalar_t;
      auto launch = [&](auto* steps) {
        using step_t = std::remove_pointer_t<decltype(steps)>;
        adamw_kernel<w_t, g_t, step_t, acc_t><<<rows, kAdamwThreads, 0, stream>>>(
            weight.data_ptr<w_t>(), exp_avg.data_ptr<w_t>(), exp_avg_sq.data_ptr<w_t>(), steps,
            idx.const_data_ptr<int64_t>(), grad_rows.const_data_ptr<g_t>(), weight.size(1), weight.stride(0),
            weight.stride(1), exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
            row_step.stride(0), grad_rows.stride(0), grad_rows.stride(1), lr, beta1, beta2, decay,
            static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (row_step.scalar_type() == at::kLong) {
        launch(row_step.data_ptr<int64_t>());
      } else {
        launch(row_step.data_ptr<int32_t>());
      }
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sparse_adamw_update", &partialfc::sparse_adamw_update_cuda);
}
