// CPU sparse SGD-momentum update: each sampled row of weight and momentum is read once, updated in float32
// (float64 for float64 tables) and written back; unsampled rows are never touched. A bfloat16 / float16 table
// given a rounding seed is written with stochastic rounding (../stochastic_rounding.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../checks.h"
#include "../stochastic_rounding.h"
#include "simd.h"

namespace partialfc {
namespace {

// SGD with momentum on one element (dampening 0): the gradient is first rounded to the table's dtype, as
// torch.optim.SGD sees it.
template <typename w_t, typename acc_t>
inline void sgd_element(w_t& w, w_t& m, acc_t grad, acc_t lr, acc_t mu, acc_t wd) {
  const acc_t wv = static_cast<acc_t>(w);
  const acc_t mv = static_cast<acc_t>(m) * mu + (static_cast<acc_t>(static_cast<w_t>(grad)) + wd * wv);
  m = static_cast<w_t>(mv);
  w = static_cast<w_t>(wv - lr * mv);
}

// SGD with momentum on one element of a low-precision table, stochastically rounded: the gradient is used in
// float32 as it comes (no rounding to the table's dtype first); momentum and weight are rounded once each.
template <typename w_t>
inline void sgd_element_rounded(w_t& w, w_t& m, float grad, float lr, float mu, float wd, const RowRounding& rnd,
                                int64_t col) {
  const float wv = static_cast<float>(w);
  const float mv = static_cast<float>(m) * mu + (grad + wd * wv);
  m = rnd.round<w_t>(mv, col, kRoundMomentum);
  w = rnd.round<w_t>(wv - lr * mv, col, kRoundWeight);
}

// Whether an update writes `w_t` with stochastic rounding: a seed was given and the table is bf16/fp16.
template <typename w_t>
constexpr bool is_low_precision() {
  return std::is_same_v<w_t, c10::BFloat16> || std::is_same_v<w_t, c10::Half>;
}

// The loop both updates share: the sampled rows split over threads, each index checked, and
// `row(i, weight row, momentum row, gradient row i, unit)` called, `unit` when all three rows are contiguous.
// Before a unit-stride row, a later row's weight, momentum and gradient are prefetched (scattered rows, see simd.h).
template <typename w_t, typename g_t, typename RowFn>
void for_each_sampled_row(at::Tensor& weight, at::Tensor& mom, const at::Tensor& index, const at::Tensor& grad,
                          const char* op, const RowFn& row) {
  const int64_t rows = index.numel(), dim = weight.size(1), num_rows = weight.size(0);
  const int64_t ws0 = weight.stride(0), ms0 = mom.stride(0), gs0 = grad.stride(0);
  const bool unit = weight.stride(1) == 1 && mom.stride(1) == 1 && grad.stride(1) == 1;
  w_t* w = weight.data_ptr<w_t>();
  w_t* m = mom.data_ptr<w_t>();
  const g_t* g = grad.const_data_ptr<g_t>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = idx[i];
      TORCH_CHECK(r >= 0 && r < num_rows, op, ": index[", i, "] = ", r, " is outside [0, ", num_rows, ")");
      if (unit && i + kPrefetchRows < end) {
        const int64_t next = idx[i + kPrefetchRows];
        prefetch_row<true>(w + next * ws0, dim);
        prefetch_row<true>(m + next * ms0, dim);
        prefetch_row<true>(g + (i + kPrefetchRows) * gs0, dim);  // read twice: the dot product, then the update
      }
      row(i, w + r * ws0, m + r * ms0, g + i * gs0, unit);
    }
  });
}

// One float32 row of update_rows.
PARTIALFC_CLONES void sgd_row_f32(float* __restrict w, float* __restrict m, const float* __restrict g, int64_t dim,
                                  float lr, float mu, float wd) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const float wv = w[j];
    const float mv = m[j] * mu + (g[j] + wd * wv);
    m[j] = mv;
    w[j] = wv - lr * mv;
  }
}

// One contiguous bfloat16 row of SGD-momentum, stochastically rounded, for a float32 gradient `g` (grad_row: the
// gradient itself; normalize: the normalize backward (g - w * scale * dot) * scale * inv_gscale of it). Written
// lane-parallel (omp simd over the elements, the hash included): the element-wise scalar form was twice the
// update's memory time. Every element is computed exactly as sgd_element_rounded does (the same operations in
// the same order, and stochastic_bf16's bits), so both forms give the same table bit for bit.
template <bool normalize>
PARTIALFC_CLONES_AVX512 void sgd_row_bf16_stochastic(uint16_t* __restrict w, uint16_t* __restrict m, const float* __restrict g,
                                              int64_t dim, float scale, float dot, float inv_gscale, float lr,
                                              float mu, float wd, uint32_t key) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const float wv = bf16_bits_to_float(w[j]);
    float rv = g[j];
    if constexpr (normalize) rv = (rv - wv * scale * dot) * scale * inv_gscale;
    const float mv = bf16_bits_to_float(m[j]) * mu + (rv + wd * wv);
    m[j] = stochastic_bf16_bits(mv, rounding_bits(key, j, kRoundMomentum));
    w[j] = stochastic_bf16_bits(wv - lr * mv, rounding_bits(key, j, kRoundWeight));
  }
}

// <g, w * scale> over a row of a float32 gradient and a bfloat16 weight row (raw bits), summed in one order
// whatever the strides and the instruction set: element j into partial sum j % 16, then the 16 partials added
// pairwise. Lane-parallel for unit strides (a column-order sum is a chain of D dependent adds, which cost more
// than the rest of the row's update); the strided form gives the same bits, so both rows round alike.
constexpr int kDotLanes = 16;

template <bool unit>
PARTIALFC_CLONES_AVX512 float bf16_row_dot(const float* __restrict g, int64_t gs, const uint16_t* __restrict w, int64_t ws,
                                    int64_t dim, float scale) {
  const auto term = [&](int64_t k) {
    return (unit ? g[k] : g[k * gs]) * (bf16_bits_to_float(unit ? w[k] : w[k * ws]) * scale);
  };
  float part[kDotLanes] = {};
  int64_t j = 0;
  for (; j + kDotLanes <= dim; j += kDotLanes) {
#pragma omp simd
    for (int l = 0; l < kDotLanes; ++l) part[l] += term(j + l);
  }
  for (int l = 0; j + l < dim; ++l) part[l] += term(j + l);
  for (int width = kDotLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

template <typename w_t, typename g_t>
void update_rows(at::Tensor& weight, at::Tensor& mom, const at::Tensor& index, const at::Tensor& grad, double lr_d,
                 double momentum_d, double wd_d, const Rounding& rounding) {
  using acc_t = at::opmath_type<w_t>;
  const int64_t dim = weight.size(1), ws1 = weight.stride(1), ms1 = mom.stride(1), gs1 = grad.stride(1);
  const acc_t lr = static_cast<acc_t>(lr_d), mu = static_cast<acc_t>(momentum_d), wd = static_cast<acc_t>(wd_d);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for_each_sampled_row<w_t, g_t>(weight, mom, index, grad, "sparse_sgd_update",
                                 [&](int64_t i, w_t* wr, w_t* mr, const g_t* gr, bool unit) {
    if constexpr (is_low_precision<w_t>()) {
      if (rounding.stochastic) {
        const RowRounding rnd(true, rounding.seed, rounding.step, rounding.class_start + idx[i]);
        if constexpr (std::is_same_v<w_t, c10::BFloat16> && std::is_same_v<g_t, float>) {
          if (unit) {
            sgd_row_bf16_stochastic<false>(reinterpret_cast<uint16_t*>(wr), reinterpret_cast<uint16_t*>(mr), gr, dim,
                                           1.0f, 0.0f, 1.0f, lr, mu, wd, rnd.key);
            return;
          }
        }
        for (int64_t j = 0; j < dim; ++j)
          sgd_element_rounded(wr[j * ws1], mr[j * ms1], static_cast<float>(gr[j * gs1]), lr, mu, wd, rnd, j);
        return;
      }
    }
    if (unit) {
      if constexpr (std::is_same_v<w_t, float> && std::is_same_v<g_t, float>) {
        sgd_row_f32(wr, mr, gr, dim, lr, mu, wd);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) sgd_element(wr[j], mr[j], static_cast<acc_t>(gr[j]), lr, mu, wd);
      }
    } else {
      for (int64_t j = 0; j < dim; ++j)
        sgd_element(wr[j * ws1], mr[j * ms1], static_cast<acc_t>(gr[j * gs1]), lr, mu, wd);
    }
  });
}

// One float32 row of normalize_backward_update_rows: dot = <g, w * scale>, then
// grad = (g - w * scale * dot) * scale * inv_gscale; SGD-momentum on w, m.
PARTIALFC_CLONES void update_row_f32(float* __restrict w, float* __restrict m, const float* __restrict g,
                                     int64_t dim, float scale, float inv_gscale, float lr, float mu, float wd) {
  float dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < dim; ++j) dot += g[j] * (w[j] * scale);
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const float wv = w[j];
    const float rv = (g[j] - wv * scale * dot) * scale * inv_gscale;
    const float mv = m[j] * mu + (rv + wd * wv);
    m[j] = mv;
    w[j] = wv - lr * mv;
  }
}

// The update of update_rows, with the gradient rows computed on the fly from the gradient of the normalized
// rows: one sweep reads the weight row (L1 afterwards), the gradient row, and the momentum row, and the
// second sweep writes weight and momentum. Nothing of size [S, D] is written besides the table rows.
template <typename w_t, typename g_t>
void normalize_backward_update_rows(at::Tensor& weight, at::Tensor& mom, const at::Tensor& index,
                                    const at::Tensor& grad, const at::Tensor& inv, double lr_d, double momentum_d,
                                    double wd_d, double grad_scale_d, const Rounding& rounding) {
  using acc_t = at::opmath_type<w_t>;
  const int64_t dim = weight.size(1), ws1 = weight.stride(1), ms1 = mom.stride(1), gs1 = grad.stride(1);
  const acc_t* inv_norm = inv.const_data_ptr<acc_t>();
  const acc_t lr = static_cast<acc_t>(lr_d), mu = static_cast<acc_t>(momentum_d), wd = static_cast<acc_t>(wd_d);
  // Loss scales are powers of two in practice, so multiplying by the reciprocal is exact there.
  const acc_t inv_gscale = static_cast<acc_t>(1.0 / grad_scale_d);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for_each_sampled_row<w_t, g_t>(weight, mom, index, grad, "normalize_backward_sgd_update",
                                 [&](int64_t i, w_t* wr, w_t* mr, const g_t* gr, bool unit) {
    const acc_t scale = inv_norm[i];
    acc_t dot = 0;
    if constexpr (is_low_precision<w_t>()) {
      if (rounding.stochastic) {
        const RowRounding rnd(true, rounding.seed, rounding.step, rounding.class_start + idx[i]);
        if constexpr (std::is_same_v<w_t, c10::BFloat16> && std::is_same_v<g_t, float>) {
          // Contiguous and strided rows sum the dot product in the same order (bf16_row_dot): the same bits.
          const uint16_t* wb = reinterpret_cast<const uint16_t*>(wr);
          if (unit) {
            dot = bf16_row_dot<true>(gr, 1, wb, 1, dim, scale);
            sgd_row_bf16_stochastic<true>(reinterpret_cast<uint16_t*>(wr), reinterpret_cast<uint16_t*>(mr), gr, dim,
                                          scale, dot, inv_gscale, lr, mu, wd, rnd.key);
            return;
          }
          dot = bf16_row_dot<false>(gr, gs1, wb, ws1, dim, scale);
        } else {
          for (int64_t j = 0; j < dim; ++j)
            dot += static_cast<acc_t>(gr[j * gs1]) * (static_cast<acc_t>(wr[j * ws1]) * scale);
        }
        for (int64_t j = 0; j < dim; ++j) {
          const acc_t rv =
              (static_cast<acc_t>(gr[j * gs1]) - static_cast<acc_t>(wr[j * ws1]) * scale * dot) * scale * inv_gscale;
          sgd_element_rounded(wr[j * ws1], mr[j * ms1], rv, lr, mu, wd, rnd, j);
        }
        return;
      }
    }
    if (unit) {
      if constexpr (std::is_same_v<w_t, float> && std::is_same_v<g_t, float>) {
        update_row_f32(wr, mr, gr, dim, scale, inv_gscale, lr, mu, wd);
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < dim; ++j)
          dot += static_cast<acc_t>(gr[j]) * (static_cast<acc_t>(wr[j]) * scale);
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) {
          const acc_t rv = (static_cast<acc_t>(gr[j]) - static_cast<acc_t>(wr[j]) * scale * dot) * scale * inv_gscale;
          sgd_element(wr[j], mr[j], rv, lr, mu, wd);
        }
      }
    } else {
      for (int64_t j = 0; j < dim; ++j)
        dot += static_cast<acc_t>(gr[j * gs1]) * (static_cast<acc_t>(wr[j * ws1]) * scale);
      for (int64_t j = 0; j < dim; ++j) {
        const acc_t rv =
            (static_cast<acc_t>(gr[j * gs1]) - static_cast<acc_t>(wr[j * ws1]) * scale * dot) * scale * inv_gscale;
        sgd_element(wr[j * ws1], mr[j * ms1], rv, lr, mu, wd);
      }
    }
  });
}

void check_update_args(const at::Tensor& weight, const at::Tensor& momentum_buffer, const at::Tensor& index,
                       const at::Tensor& rows, const char* rows_name, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  check_rows(weight, weight.size(0), weight.size(1), "weight", op);
  check_rows(momentum_buffer, weight.size(0), weight.size(1), "momentum_buffer", op);
  TORCH_CHECK(momentum_buffer.scalar_type() == weight.scalar_type(), op, ": momentum_buffer dtype ",
              momentum_buffer.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  check_index(index, weight, op);
  check_rows(rows, index.numel(), weight.size(1), rows_name, op);
  TORCH_CHECK(momentum_buffer.device() == weight.device() && rows.device() == weight.device(), op,
              ": weight, momentum_buffer and ", rows_name, " must be on one device");
}

void normalize_backward_sgd_update_cpu(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& index,
                                       const at::Tensor& grad_normalized, const at::Tensor& inv_norm, double lr,
                                       double momentum, double weight_decay, double grad_scale,
                                       std::optional<int64_t> rounding_seed, int64_t rounding_step,
                                       int64_t class_start) {
  const char* op = "normalize_backward_sgd_update";
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  check_update_args(weight, momentum_buffer, index, grad_normalized, "grad_normalized", op);
  check_normalize_backward_args(weight, index, inv_norm, grad_scale, op);
  if (index.numel() == 0) return;
  const at::Tensor idx = index.contiguous(), inv_c = inv_norm.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "nb_sgd_update_w", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_normalized.scalar_type(), "nb_sgd_update_g", [&] {
      normalize_backward_update_rows<w_t, scalar_t>(weight, momentum_buffer, idx, grad_normalized, inv_c, lr,
                                                    momentum, weight_decay, grad_scale, rounding);
    });
  });
}

void sparse_sgd_update_cpu(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& index,
                           const at::Tensor& grad_rows, double lr, double momentum, double weight_decay,
                           std::optional<int64_t> rounding_seed, int64_t rounding_step, int64_t class_start) {
  check_update_args(weight, momentum_buffer, index, grad_rows, "grad_rows", "sparse_sgd_update");
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, "sparse_sgd_update");
  if (index.numel() == 0) return;
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_sgd_update_w", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_sgd_update_g", [&] {
      update_rows<w_t, scalar_t>(weight, momentum_buffer, idx, grad_rows, lr, momentum, weight_decay, rounding);
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("sparse_sgd_update", &partialfc::sparse_sgd_update_cpu);
  m.impl("normalize_backward_sgd_update", &partialfc::normalize_backward_sgd_update_cpu);
}
