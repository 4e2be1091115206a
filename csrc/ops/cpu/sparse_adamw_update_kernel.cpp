// CPU sparse AdamW update: each sampled row of weight and both moments is read once, updated in the table's
// dtype (float32, or float64 for tests) and written back, with the row's own step count; unsampled rows are
// never touched.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "simd.h"

namespace partialfc {

// ../sparse_adamw_update.cpp
void check_sparse_adamw_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& row_step, const at::Tensor& index, const at::Tensor& grad_rows,
                                    double lr, double beta1, double beta2, double eps, double weight_decay);

namespace {

// The per-row constants of one AdamW step: `decay` = 1 - lr * wd, `step_size` = lr / (1 - beta1^t) and
// `bc2_sqrt` = sqrt(1 - beta2^t), formed in double from the row's step t as torch.optim.AdamW forms them in
// Python floats.
template <typename acc_t>
struct AdamwRow {
  acc_t step_size, bc2_sqrt;
};

template <typename acc_t>
inline AdamwRow<acc_t> adamw_row_constants(int64_t t, double lr, double beta1, double beta2) {
  const double td = static_cast<double>(t);
  return {static_cast<acc_t>(lr / (1.0 - std::pow(beta1, td))), static_cast<acc_t>(std::sqrt(1.0 - std::pow(beta2, td)))};
}

// AdamW on one element: the gradient is first rounded to the table's dtype, as torch.optim.AdamW sees it;
// the first moment moves as torch's lerp does (m + (1 - beta1) * (g - m)).
template <typename w_t, typename acc_t>
inline void adamw_element(w_t& w, w_t& m, w_t& v, acc_t grad, acc_t decay, acc_t one_minus_b1, acc_t b2,
                          acc_t one_minus_b2, acc_t eps, AdamwRow<acc_t> row) {
  const acc_t g = static_cast<acc_t>(static_cast<w_t>(grad));
  const acc_t wv = static_cast<acc_t>(w) * decay;
  const acc_t mv = static_cast<acc_t>(m) + one_minus_b1 * (g - static_cast<acc_t>(m));
  const acc_t vv = static_cast<acc_t>(v) * b2 + one_minus_b2 * g * g;
  m = static_cast<w_t>(mv);
  v = static_cast<w_t>(vv);
  w = static_cast<w_t>(wv - row.step_size * (mv / (std::sqrt(vv) / row.bc2_sqrt + eps)));
}

// One contiguous float32 row: the same arithmetic as adamw_element, as one vector loop.
PARTIALFC_CLONES void adamw_row_f32(float* __restrict w, float* __restrict m, float* __restrict v,
                                    const float* __restrict g, int64_t dim, float decay, float one_minus_b1, float b2,
                                    float one_minus_b2, float eps, float step_size, float bc2_sqrt) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const float gv = g[j];
    const float wv = w[j] * decay;
    const float mv = m[j] + one_minus_b1 * (gv - m[j]);
    const float vv = v[j] * b2 + one_minus_b2 * gv * gv;
    m[j] = mv;
    v[j] = vv;
    w[j] = wv - step_size * (mv / (std::sqrt(vv) / bc2_sqrt + eps));
  }
}

template <typename w_t, typename g_t, typename step_t>
void adamw_rows(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_step,
                const at::Tensor& index, const at::Tensor& grad, double lr, double beta1, double beta2, double eps_d,
                double wd) {
  using acc_t = at::opmath_type<w_t>;
  const int64_t rows = index.numel(), dim = weight.size(1);
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), ms0 = exp_avg.stride(0), ms1 = exp_avg.stride(1);
  const int64_t vs0 = exp_avg_sq.stride(0), vs1 = exp_avg_sq.stride(1), gs0 = grad.stride(0), gs1 = grad.stride(1);
  const int64_t ts0 = row_step.stride(0);
  const bool unit = ws1 == 1 && ms1 == 1 && vs1 == 1 && gs1 == 1;
  w_t* w = weight.data_ptr<w_t>();
  w_t* m = exp_avg.data_ptr<w_t>();
  w_t* v = exp_avg_sq.data_ptr<w_t>();
  step_t* steps = row_step.data_ptr<step_t>();
  const g_t* g = grad.const_data_ptr<g_t>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const acc_t decay = static_cast<acc_t>(1.0 - lr * wd), one_minus_b1 = static_cast<acc_t>(1.0 - beta1);
  const acc_t b2 = static_cast<acc_t>(beta2), one_minus_b2 = static_cast<acc_t>(1.0 - beta2);
  const acc_t eps = static_cast<acc_t>(eps_d);
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
      w_t* vr = v + r * vs0;
      const g_t* gr = g + i * gs0;
      if (unit) {
        if constexpr (std::is_same_v<w_t, float> && std::is_same_v<g_t, float>) {
          adamw_row_f32(wr, mr, vr, gr, dim, decay, one_minus_b1, b2, one_minus_b2, eps, c.step_size, c.bc2_sqrt);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < dim; ++j)
            adamw_element(wr[j], mr[j], vr[j], static_cast<acc_t>(gr[j]), decay, one_minus_b1, b2, one_minus_b2, eps,
                          c);
        }
      } else {
        for (int64_t j = 0; j < dim; ++j)
          adamw_element(wr[j * ws1], mr[j * ms1], vr[j * vs1], static_cast<acc_t>(gr[j * gs1]), decay, one_minus_b1,
                        b2, one_minus_b2, eps, c);
      }
    }
  });
}

void sparse_adamw_update_cpu(at::Tensor& weight, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_step,
                             const at::Tensor& index, const at::Tensor& grad_rows, double lr, double beta1,
                             double beta2, double eps, double weight_decay) {
  const char* op = "sparse_adamw_update";
  check_sparse_adamw_update_args(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, lr, beta1, beta2, eps,
                                 weight_decay);
  const int64_t rows = index.numel(), num_rows = weight.size(0);
  if (rows == 0) return;
  const at::Tensor idx = index.contiguous();
  // Every index is checked before any row is written: a bad one leaves table and state as they were.
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < num_rows, op, ": index[", i, "] = ", ip[i], " is outside [0, ", num_rows, ")");
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_adamw_update_w", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_adamw_update_g", [&] {
      using g_t = scalar_t;
      if (row_step.scalar_type() == at::kLong) {
        adamw_rows<w_t, g_t, int64_t>(weight, exp_avg, exp_avg_sq, row_step, idx, grad_rows, lr, beta1, beta2, eps,
                                      weight_decay);
      } else {
        adamw_rows<w_t, g_t, int32_t>(weight, exp_avg, exp_avg_sq, row_step, idx, grad_rows, lr, beta1, beta2, eps,
                                      weight_decay);
      }
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("sparse_adamw_update", &partialfc::sparse_adamw_update_cpu);
}
