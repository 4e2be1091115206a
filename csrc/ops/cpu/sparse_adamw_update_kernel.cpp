// CPU sparse AdamW update: each sampled row of weight and both moments is read once, updated in float32
// (float64 for float64 tables) and written back, with the row's own step count; unsampled rows are never
// touched. A bfloat16 / float16 table (exp_avg in its dtype, exp_avg_sq in it or in float32) given a rounding
// seed is written with stochastic rounding (../stochastic_rounding.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "../checks.h"
#include "../sparse_adamw_update.h"
#include "../stochastic_rounding.h"
#include "simd.h"

namespace partialfc {

namespace {

// The per-row constants of one AdamW step, `step_size` = lr / (1 - beta1^t) and `bc2_sqrt` = sqrt(1 - beta2^t),
// formed in double from the row's step t as torch.optim.AdamW forms them in Python floats.
template <typename acc_t>
struct AdamwRow {
  acc_t step_size, bc2_sqrt;
};

template <typename acc_t>
inline AdamwRow<acc_t> adamw_row_constants(int64_t t, double lr, double beta1, double beta2) {
  const double td = static_cast<double>(t);
  return {static_cast<acc_t>(lr / (1.0 - std::pow(beta1, td))),
          static_cast<acc_t>(std::sqrt(1.0 - std::pow(beta2, td)))};
}

// The step's constants shared by every row (`decay` = 1 - lr * weight_decay).
template <typename acc_t>
struct AdamwStep {
  acc_t decay, one_minus_b1, b2, one_minus_b2, eps;
};

// AdamW on one element: the gradient is first rounded to the table's dtype, as torch.optim.AdamW sees it,
// except under stochastic rounding, where it is used in float32 as it comes; the first moment moves as torch's
// lerp does (m + (1 - beta1) * (g - m)). Each of the three results is rounded once to its storage dtype.
template <typename w_t, typename v_t, typename acc_t>
inline void adamw_element(w_t& w, w_t& m, v_t& v, acc_t grad, const AdamwStep<acc_t>& k, AdamwRow<acc_t> row,
                          const RowRounding& rnd, int64_t col) {
  const acc_t g = rnd.stochastic ? grad : static_cast<acc_t>(static_cast<w_t>(grad));
  const acc_t m0 = static_cast<acc_t>(m);
  const acc_t wv = static_cast<acc_t>(w) * k.decay;
  const acc_t mv = m0 + k.one_minus_b1 * (g - m0);
  const acc_t vv = static_cast<acc_t>(v) * k.b2 + k.one_minus_b2 * g * g;
  m = rnd.round<w_t>(mv, col, kRoundMomentum);
  v = rnd.round<v_t>(vv, col, kRoundExpAvgSq);
  w = rnd.round<w_t>(wv - row.step_size * (mv / (std::sqrt(vv) / row.bc2_sqrt + k.eps)), col, kRoundWeight);
}

// One float32 lane of adamw_element (the gradient is already float32), inlined into the vector row loops.
__attribute__((always_inline)) inline void adamw_lane(float& w, float& m, float& v, float g, const AdamwStep<float>& k,
                                                      const AdamwRow<float>& row) {
  const float m0 = m;
  const float wv = w * k.decay;
  const float mv = m0 + k.one_minus_b1 * (g - m0);
  const float vv = v * k.b2 + k.one_minus_b2 * g * g;
  m = mv;
  v = vv;
  w = wv - row.step_size * (mv / (std::sqrt(vv) / row.bc2_sqrt + k.eps));
}

// One contiguous float32 row of the plain update, as one vector loop.
PARTIALFC_CLONES void adamw_row_f32(float* __restrict w, float* __restrict m, float* __restrict v,
                                    const float* __restrict g, int64_t dim, AdamwStep<float> k, AdamwRow<float> row) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) adamw_lane(w[j], m[j], v[j], g[j], k, row);
}

// One contiguous float32 row of the fused update: dot = <g, w * scale> (this sweep reads the weight row into
// L1), then the update with grad = (g - w * scale * dot) * scale * inv_gscale.
PARTIALFC_CLONES void nb_adamw_row_f32(float* __restrict w, float* __restrict m, float* __restrict v,
                                       const float* __restrict g, int64_t dim, AdamwStep<float> k, AdamwRow<float> row,
                                       float scale, float inv_gscale) {
  float dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < dim; ++j) dot += g[j] * (w[j] * scale);
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j)
    adamw_lane(w[j], m[j], v[j], (g[j] - w[j] * scale * dot) * scale * inv_gscale, k, row);
}

// Both updates: the sampled rows split over threads; each row's step count bumped and its constants formed,
// then its elements updated. `inv` is null for the plain update, else the inverse norms of the fused one.
template <typename w_t, typename v_t, typename g_t, typename step_t>
void adamw_rows(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_step,
                const at::Tensor& index, const at::Tensor& grad, const at::opmath_type<w_t>* inv, double lr,
                double beta1, double beta2, double eps, double wd, double grad_scale, const Rounding& rounding) {
  using acc_t = at::opmath_type<w_t>;
  const int64_t rows = index.numel(), dim = weight.size(1);
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), ms0 = exp_avg.stride(0), ms1 = exp_avg.stride(1);
  const int64_t vs0 = exp_avg_sq.stride(0), vs1 = exp_avg_sq.stride(1), gs0 = grad.stride(0), gs1 = grad.stride(1);
  const int64_t ts0 = row_step.stride(0);
  const bool unit = ws1 == 1 && ms1 == 1 && vs1 == 1 && gs1 == 1;
  w_t* w = weight.data_ptr<w_t>();
  w_t* m = exp_avg.data_ptr<w_t>();
  v_t* v = exp_avg_sq.data_ptr<v_t>();
  step_t* steps = row_step.data_ptr<step_t>();
  const g_t* g = grad.const_data_ptr<g_t>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const AdamwStep<acc_t> k{static_cast<acc_t>(1.0 - lr * wd), static_cast<acc_t>(1.0 - beta1),
                           static_cast<acc_t>(beta2), static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps)};
  // Loss scales are powers of two in practice, so multiplying by the reciprocal is exact there.
  const acc_t inv_gscale = static_cast<acc_t>(1.0 / grad_scale);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = idx[i];
      if (unit && i + kPrefetchRows < end) {
        // Sampled rows are scattered: fetch a later row's three table rows ahead (see simd.h).
        const int64_t next = idx[i + kPrefetchRows];
        prefetch_row<true>(w + next * ws0, dim);
        prefetch_row<true>(m + next * ms0, dim);
        prefetch_row<true>(v + next * vs0, dim);
      }
      const int64_t t = static_cast<int64_t>(steps[r * ts0]) + 1;
      steps[r * ts0] = static_cast<step_t>(t);
      const AdamwRow<acc_t> c = adamw_row_constants<acc_t>(t, lr, beta1, beta2);
      w_t* wr = w + r * ws0;
      w_t* mr = m + r * ms0;
      v_t* vr = v + r * vs0;
      const g_t* gr = g + i * gs0;
      if constexpr (std::is_same_v<w_t, float> && std::is_same_v<v_t, float> && std::is_same_v<g_t, float>) {
        if (unit) {
          if (inv == nullptr) {
            adamw_row_f32(wr, mr, vr, gr, dim, k, c);
          } else {
            nb_adamw_row_f32(wr, mr, vr, gr, dim, k, c, inv[i], inv_gscale);
          }
          continue;
        }
      }
      // Other dtypes and strided rows, element by element.
      const RowRounding rnd(rounding.stochastic && !std::is_same_v<w_t, acc_t>, rounding.seed, rounding.step,
                            rounding.class_start + r);
      acc_t scale = 0, dot = 0;
      if (inv != nullptr) {
        scale = inv[i];
        for (int64_t j = 0; j < dim; ++j)
          dot += static_cast<acc_t>(gr[j * gs1]) * (static_cast<acc_t>(wr[j * ws1]) * scale);
      }
      for (int64_t j = 0; j < dim; ++j) {
        acc_t gv = static_cast<acc_t>(gr[j * gs1]);
        if (inv != nullptr) gv = (gv - static_cast<acc_t>(wr[j * ws1]) * scale * dot) * scale * inv_gscale;
        adamw_element(wr[j * ws1], mr[j * ms1], vr[j * vs1], gv, k, c, rnd, j);
      }
    }
  });
}

// Every index is checked before any row is written: a bad one leaves table and state as they were.
void check_index_range(const at::Tensor& idx, int64_t num_rows, const char* op) {
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < num_rows, op, ": index[", i, "] = ", ip[i], " is outside [0, ", num_rows, ")");
}

void sparse_adamw_update_cpu(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_step,
                             const at::Tensor& index, const at::Tensor& grad_rows, double lr, double beta1,
                             double beta2, double eps, double weight_decay, std::optional<int64_t> rounding_seed,
                             int64_t rounding_step, int64_t class_start) {
  const char* op = "sparse_adamw_update";
  check_sparse_adamw_update_args(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, "grad_rows", lr, beta1,
                                 beta2, eps, weight_decay, op);
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  if (index.numel() == 0) return;
  const at::Tensor idx = index.contiguous();
  check_index_range(idx, weight.size(0), op);
  dispatch_adamw(weight, exp_avg_sq, grad_rows, row_step, [&](auto w0, auto v0, auto g0, auto s0) {
    using w_t = decltype(w0);
    adamw_rows<w_t, decltype(v0), decltype(g0), decltype(s0)>(weight, exp_avg, exp_avg_sq, row_step, idx, grad_rows,
                                                              nullptr, lr, beta1, beta2, eps, weight_decay, 1.0,
                                                              rounding);
  });
}

void normalize_backward_adamw_update_cpu(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                         at::Tensor& row_step, const at::Tensor& index,
                                         const at::Tensor& grad_normalized, const at::Tensor& inv_norm, double lr,
                                         double beta1, double beta2, double eps, double weight_decay,
                                         double grad_scale, std::optional<int64_t> rounding_seed,
                                         int64_t rounding_step, int64_t class_start) {
  const char* op = "normalize_backward_adamw_update";
  check_sparse_adamw_update_args(weight, exp_avg, exp_avg_sq, row_step, index, grad_normalized, "grad_normalized",
                                 lr, beta1, beta2, eps, weight_decay, op);
  check_normalize_backward_args(weight, index, inv_norm, grad_scale, op);
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  if (index.numel() == 0) return;
  const at::Tensor idx = index.contiguous(), inv_c = inv_norm.contiguous();
  check_index_range(idx, weight.size(0), op);
  dispatch_adamw(weight, exp_avg_sq, grad_normalized, row_step, [&](auto w0, auto v0, auto g0, auto s0) {
    using w_t = decltype(w0);
    adamw_rows<w_t, decltype(v0), decltype(g0), decltype(s0)>(
        weight, exp_avg, exp_avg_sq, row_step, idx, grad_normalized, inv_c.const_data_ptr<at::opmath_type<w_t>>(), lr,
        beta1, beta2, eps, weight_decay, grad_scale, rounding);
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("sparse_adamw_update", &partialfc::sparse_adamw_update_cpu);
  m.impl("normalize_backward_adamw_update", &partialfc::normalize_backward_adamw_update_cpu);
}
