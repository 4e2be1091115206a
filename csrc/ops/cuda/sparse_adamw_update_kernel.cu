// CUDA sparse AdamW update: one block per sampled row, threads over the embedding dimension; the row's step
// count is bumped by one thread, which forms the row's bias corrections for the block. A bfloat16 / float16
// table given a rounding seed is written with stochastic rounding (../stochastic_rounding.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../stochastic_rounding.h"
#include "common.cuh"

namespace partialfc {

// ../sparse_adamw_update.cpp
void check_sparse_adamw_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& row_step, const at::Tensor& index, const at::Tensor& rows,
                                    const char* rows_name, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, const char* op);

namespace {

constexpr int kAdamwThreads = 128;

template <typename w_t, typename v_t, typename g_t, typename step_t, typename acc_t>
__global__ void adamw_kernel(w_t* weight, w_t* exp_avg, v_t* exp_avg_sq, step_t* row_step,
                             const int64_t* __restrict__ index, const g_t* __restrict__ grad, int64_t dim, int64_t ws0,
                             int64_t ws1, int64_t ms0, int64_t ms1, int64_t vs0, int64_t vs1, int64_t ts0, int64_t gs0,
                             int64_t gs1, double lr, double beta1, double beta2, acc_t decay, acc_t eps,
                             Rounding rounding) {
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
  v_t* vr = exp_avg_sq + r * vs0;
  const g_t* gr = grad + i * gs0;
  const bool stochastic = rounding.stochastic && !std::is_same_v<w_t, acc_t>;
  const RowRounding rnd(stochastic, rounding.seed, rounding.step, rounding.class_start + r);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (stochastic) {
        // In float32 with the gradient as it comes; no FMA contraction (__f*_rn), so that the rounded results
        // match the CPU kernel and the PyTorch reference bit for bit.
        const float g = static_cast<float>(gr[j * gs1]);
        const float m0 = static_cast<float>(mr[j * ms1]);
        const float wv = __fmul_rn(static_cast<float>(wr[j * ws1]), decay);
        const float mv = __fadd_rn(m0, __fmul_rn(one_minus_b1, __fsub_rn(g, m0)));
        const float vv =
            __fadd_rn(__fmul_rn(static_cast<float>(vr[j * vs1]), b2), __fmul_rn(__fmul_rn(one_minus_b2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2_sqrt), eps);
        mr[j * ms1] = rnd.round<w_t>(mv, j, kRoundMomentum);
        vr[j * vs1] = rnd.round<v_t>(vv, j, kRoundExpAvgSq);
        wr[j * ws1] = rnd.round<w_t>(__fsub_rn(wv, __fmul_rn(step_size, __fdiv_rn(mv, denom))), j, kRoundWeight);
        continue;
      }
    }
    // The gradient is first rounded to the table's dtype, as torch.optim.AdamW sees it.
    const acc_t g = static_cast<acc_t>(static_cast<w_t>(gr[j * gs1]));
    const acc_t m0 = static_cast<acc_t>(mr[j * ms1]);
    const acc_t wv = static_cast<acc_t>(wr[j * ws1]) * decay;
    const acc_t mv = m0 + one_minus_b1 * (g - m0);
    const acc_t vv = static_cast<acc_t>(vr[j * vs1]) * b2 + one_minus_b2 * g * g;
    mr[j * ms1] = static_cast<w_t>(mv);
    vr[j * vs1] = static_cast<v_t>(vv);
    wr[j * ws1] = static_cast<w_t>(wv - step_size * (mv / (sqrt(vv) / bc2_sqrt + eps)));
  }
}

void sparse_adamw_update_cuda(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_step,
                              const at::Tensor& index, const at::Tensor& grad_rows, double lr, double beta1,
                              double beta2, double eps, double weight_decay, std::optional<int64_t> rounding_seed,
                              int64_t rounding_step, int64_t class_start) {
  const char* op = "sparse_adamw_update";
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor");
  check_sparse_adamw_update_args(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, "grad_rows", lr, beta1,
                                 beta2, eps, weight_decay, op);
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  const int64_t rows = index.numel();
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous();
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_adamw_update_w", [&] {
    using w_t = scalar_t;
    using acc_t = at::opmath_type<w_t>;
    const acc_t decay = static_cast<acc_t>(1.0 - lr * weight_decay);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_adamw_update_g", [&] {
      using g_t = scalar_t;
      auto launch = [&](auto* steps, auto* sq) {
        using step_t = std::remove_pointer_t<decltype(steps)>;
        using v_t = std::remove_pointer_t<decltype(sq)>;
        adamw_kernel<w_t, v_t, g_t, step_t, acc_t><<<rows, kAdamwThreads, 0, stream>>>(
            weight.data_ptr<w_t>(), exp_avg.data_ptr<w_t>(), sq, steps, idx.const_data_ptr<int64_t>(),
            grad_rows.const_data_ptr<g_t>(), weight.size(1), weight.stride(0), weight.stride(1), exp_avg.stride(0),
            exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1), row_step.stride(0), grad_rows.stride(0),
            grad_rows.stride(1), lr, beta1, beta2, decay, static_cast<acc_t>(eps), rounding);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      // exp_avg_sq in the weight's dtype, or float32 beside a bf16/fp16 table.
      auto with_steps = [&](auto* sq) {
        if (row_step.scalar_type() == at::kLong) {
          launch(row_step.data_ptr<int64_t>(), sq);
        } else {
          launch(row_step.data_ptr<int32_t>(), sq);
        }
      };
      if constexpr (!std::is_same_v<w_t, acc_t>) {
        if (exp_avg_sq.scalar_type() == at::kFloat) {
          with_steps(exp_avg_sq.data_ptr<float>());
          return;
        }
      }
      with_steps(exp_avg_sq.data_ptr<w_t>());
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sparse_adamw_update", &partialfc::sparse_adamw_update_cuda);
}
