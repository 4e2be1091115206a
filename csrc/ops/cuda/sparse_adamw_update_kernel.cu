// CUDA sparse AdamW update and its fused form with the normalize backward: one block per sampled row, threads
// over the embedding dimension; the row's step count is bumped by one thread, which forms the row's bias
// corrections for the block. A bfloat16 / float16 table given a rounding seed is written with stochastic
// rounding (../stochastic_rounding.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../checks.h"
#include "../sparse_adamw_update.h"
#include "../stochastic_rounding.h"
#include "common.cuh"

namespace partialfc {

namespace {

constexpr int kAdamwThreads = 128;

// The step's constants shared by every row (`decay` = 1 - lr * weight_decay), formed on the host.
template <typename acc_t>
struct AdamwStepConstants {
  acc_t decay, one_minus_b1, b2, one_minus_b2, eps;
};

template <typename acc_t>
AdamwStepConstants<acc_t> adamw_step_constants(double lr, double beta1, double beta2, double eps, double wd) {
  return {static_cast<acc_t>(1.0 - lr * wd), static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(beta2),
          static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps)};
}

// Thread 0 of a row's block: t = ++row_step[r] and the row's constants step_size = lr / (1 - beta1^t) and
// bc2_sqrt = sqrt(1 - beta2^t), in double as torch.optim.AdamW forms them in Python floats. The caller makes
// them visible to the block with a barrier.
template <typename step_t, typename acc_t>
__device__ __forceinline__ void adamw_bump_row_step(step_t* step, double lr, double beta1, double beta2,
                                                    acc_t& step_size, acc_t& bc2_sqrt) {
  const int64_t t = static_cast<int64_t>(*step) + 1;
  *step = static_cast<step_t>(t);
  step_size = static_cast<acc_t>(lr / (1.0 - pow(beta1, static_cast<double>(t))));
  bc2_sqrt = static_cast<acc_t>(sqrt(1.0 - pow(beta2, static_cast<double>(t))));
}

// AdamW on one element. Stochastically rounded (a bf16/fp16 table with a seed: rnd.stochastic), the math runs
// in float32 with the gradient as it comes and no FMA contraction (__f*_rn), so that the rounded results match
// the CPU kernel and the PyTorch reference bit for bit. Rounded to nearest, the gradient is first rounded to
// the table's dtype, as torch.optim.AdamW sees it.
template <typename w_t, typename v_t, typename acc_t>
__device__ __forceinline__ void adamw_element(w_t& w, w_t& m, v_t& v, acc_t grad, const AdamwStepConstants<acc_t>& k,
                                              acc_t step_size, acc_t bc2_sqrt, const RowRounding& rnd, int64_t col) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (rnd.stochastic) {
      const float g = grad;
      const float m0 = static_cast<float>(m);
      const float wv = __fmul_rn(static_cast<float>(w), k.decay);
      const float mv = __fadd_rn(m0, __fmul_rn(k.one_minus_b1, __fsub_rn(g, m0)));
      const float vv = __fadd_rn(__fmul_rn(static_cast<float>(v), k.b2), __fmul_rn(__fmul_rn(k.one_minus_b2, g), g));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2_sqrt), k.eps);
      m = rnd.round<w_t>(mv, col, kRoundMomentum);
      v = rnd.round<v_t>(vv, col, kRoundExpAvgSq);
      w = rnd.round<w_t>(__fsub_rn(wv, __fmul_rn(step_size, __fdiv_rn(mv, denom))), col, kRoundWeight);
      return;
    }
  }
  const acc_t g = static_cast<acc_t>(static_cast<w_t>(grad));
  const acc_t m0 = static_cast<acc_t>(m);
  const acc_t wv = static_cast<acc_t>(w) * k.decay;
  const acc_t mv = m0 + k.one_minus_b1 * (g - m0);
  const acc_t vv = static_cast<acc_t>(v) * k.b2 + k.one_minus_b2 * g * g;
  m = static_cast<w_t>(mv);
  v = static_cast<v_t>(vv);
  w = static_cast<w_t>(wv - step_size * (mv / (sqrt(vv) / bc2_sqrt + k.eps)));
}

// Round-to-nearest products and differences that nvcc does not contract into FMAs (float and double).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename w_t, typename v_t, typename g_t, typename step_t, typename acc_t>
__global__ void adamw_kernel(w_t* weight, w_t* exp_avg, v_t* exp_avg_sq, step_t* row_step,
                             const int64_t* __restrict__ index, const g_t* __restrict__ grad, int64_t dim, int64_t ws0,
                             int64_t ws1, int64_t ms0, int64_t ms1, int64_t vs0, int64_t vs1, int64_t ts0, int64_t gs0,
                             int64_t gs1, double lr, double beta1, double beta2, AdamwStepConstants<acc_t> k,
                             Rounding rounding) {
  __shared__ acc_t step_size, bc2_sqrt;
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  if (threadIdx.x == 0) adamw_bump_row_step(row_step + r * ts0, lr, beta1, beta2, step_size, bc2_sqrt);
  __syncthreads();
  w_t* wr = weight + r * ws0;
  w_t* mr = exp_avg + r * ms0;
  v_t* vr = exp_avg_sq + r * vs0;
  const g_t* gr = grad + i * gs0;
  const RowRounding rnd(rounding.stochastic && !std::is_same_v<w_t, acc_t>, rounding.seed, rounding.step,
                        rounding.class_start + r);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x)
    adamw_element(wr[j * ws1], mr[j * ms1], vr[j * vs1], static_cast<acc_t>(gr[j * gs1]), k, step_size, bc2_sqrt,
                  rnd, j);
}

// The update with the gradient rows formed from the gradient of the normalized rows, as
// normalize_backward_update_kernel (sparse_sgd_update_kernel.cu) does for SGD: the block sums
// dot = <g, w * scale> over the row, then each thread updates its elements with
// grad = (g - w * scale * dot) * scale * inv_gscale, formed in registers: nothing of size [S, D] is written
// besides the table rows.
template <typename w_t, typename v_t, typename g_t, typename step_t, typename acc_t>
__global__ void normalize_backward_adamw_kernel(w_t* weight, w_t* exp_avg, v_t* exp_avg_sq, step_t* row_step,
                                                const int64_t* __restrict__ index, const g_t* __restrict__ grad,
                                                const acc_t* __restrict__ inv_norm, int64_t dim, int64_t ws0,
                                                int64_t ws1, int64_t ms0, int64_t ms1, int64_t vs0, int64_t vs1,
                                                int64_t ts0, int64_t gs0, int64_t gs1, double lr, double beta1,
                                                double beta2, AdamwStepConstants<acc_t> k, acc_t inv_gscale,
                                                Rounding rounding) {
  __shared__ acc_t scratch[cuda::kWarp];
  __shared__ acc_t step_size, bc2_sqrt;
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  if (threadIdx.x == 0) adamw_bump_row_step(row_step + r * ts0, lr, beta1, beta2, step_size, bc2_sqrt);
  w_t* wr = weight + r * ws0;
  w_t* mr = exp_avg + r * ms0;
  v_t* vr = exp_avg_sq + r * vs0;
  const g_t* gr = grad + i * gs0;
  const acc_t scale = inv_norm[i];
  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x)
    dot += static_cast<acc_t>(gr[j * gs1]) * (static_cast<acc_t>(wr[j * ws1]) * scale);
  // block_sum's barriers: every thread has read its weights before any is written, and thread 0's step_size
  // and bc2_sqrt are visible to the block.
  dot = cuda::block_sum(dot, scratch);
  const RowRounding rnd(rounding.stochastic && !std::is_same_v<w_t, acc_t>, rounding.seed, rounding.step,
                        rounding.class_start + r);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    // In the CPU kernel's order of operations, without FMA contraction.
    const acc_t wv = static_cast<acc_t>(wr[j * ws1]);
    const acc_t gv = mul_rn(mul_rn(sub_rn(static_cast<acc_t>(gr[j * gs1]), mul_rn(mul_rn(wv, scale), dot)), scale),
                            inv_gscale);
    adamw_element(wr[j * ws1], mr[j * ms1], vr[j * vs1], gv, k, step_size, bc2_sqrt, rnd, j);
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
  // Before any row is written: a bad index leaves table and state as they were.
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  dispatch_adamw(weight, exp_avg_sq, grad_rows, row_step, [&](auto w0, auto v0, auto g0, auto s0) {
    using w_t = decltype(w0);
    using v_t = decltype(v0);
    using g_t = decltype(g0);
    using step_t = decltype(s0);
    using acc_t = at::opmath_type<w_t>;
    adamw_kernel<w_t, v_t, g_t, step_t, acc_t><<<rows, kAdamwThreads, 0, stream>>>(
        weight.data_ptr<w_t>(), exp_avg.data_ptr<w_t>(), exp_avg_sq.data_ptr<v_t>(), row_step.data_ptr<step_t>(),
        idx.const_data_ptr<int64_t>(), grad_rows.const_data_ptr<g_t>(), weight.size(1), weight.stride(0),
        weight.stride(1), exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
        row_step.stride(0), grad_rows.stride(0), grad_rows.stride(1), lr, beta1, beta2,
        adamw_step_constants<acc_t>(lr, beta1, beta2, eps, weight_decay), rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void normalize_backward_adamw_update_cuda(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                          at::Tensor& row_step, const at::Tensor& index,
                                          const at::Tensor& grad_normalized, const at::Tensor& inv_norm, double lr,
                                          double beta1, double beta2, double eps, double weight_decay,
                                          double grad_scale, std::optional<int64_t> rounding_seed,
                                          int64_t rounding_step, int64_t class_start) {
  const char* op = "normalize_backward_adamw_update";
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor");
  check_sparse_adamw_update_args(weight, exp_avg, exp_avg_sq, row_step, index, grad_normalized, "grad_normalized",
                                 lr, beta1, beta2, eps, weight_decay, op);
  check_normalize_backward_args(weight, index, inv_norm, grad_scale, op);
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  const int64_t rows = index.numel();
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous(), inv_c = inv_norm.contiguous();
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  dispatch_adamw(weight, exp_avg_sq, grad_normalized, row_step, [&](auto w0, auto v0, auto g0, auto s0) {
    using w_t = decltype(w0);
    using v_t = decltype(v0);
    using g_t = decltype(g0);
    using step_t = decltype(s0);
    using acc_t = at::opmath_type<w_t>;
    // Loss scales are powers of two in practice, so multiplying by the reciprocal is exact there.
    normalize_backward_adamw_kernel<w_t, v_t, g_t, step_t, acc_t><<<rows, kAdamwThreads, 0, stream>>>(
        weight.data_ptr<w_t>(), exp_avg.data_ptr<w_t>(), exp_avg_sq.data_ptr<v_t>(), row_step.data_ptr<step_t>(),
        idx.const_data_ptr<int64_t>(), grad_normalized.const_data_ptr<g_t>(), inv_c.const_data_ptr<acc_t>(),
        weight.size(1), weight.stride(0), weight.stride(1), exp_avg.stride(0), exp_avg.stride(1),
        exp_avg_sq.stride(0), exp_avg_sq.stride(1), row_step.stride(0), grad_normalized.stride(0),
        grad_normalized.stride(1), lr, beta1, beta2, adamw_step_constants<acc_t>(lr, beta1, beta2, eps, weight_decay),
        static_cast<acc_t>(1.0 / grad_scale), rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sparse_adamw_update", &partialfc::sparse_adamw_update_cuda);
  m.impl("normalize_backward_adamw_update", &partialfc::normalize_backward_adamw_update_cuda);
}
