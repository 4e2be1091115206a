// CPU sparse SGD-momentum update: each sampled row of weight and momentum is read once, updated in float32
// (float64 for float64 tables) and written back; unsampled rows are never touched.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../checks.h"

namespace partialfc {
namespace {

constexpr int64_t kPrefetchRows = 4;

template <typename T>
inline void prefetch_row(T* row, int64_t dim) {
#if defined(__GNUC__)
  char* p = reinterpret_cast<char*>(row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 1, 0);
#endif
}

template <typename w_t, typename g_t>
void update_rows(at::Tensor& weight, at::Tensor& mom, const at::Tensor& index, const at::Tensor& grad, double lr_d,
                 double momentum_d, double wd_d) {
  using acc_t = at::opmath_type<w_t>;
  const int64_t rows = index.numel(), dim = weight.size(1), num_rows = weight.size(0);
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), ms0 = mom.stride(0), ms1 = mom.stride(1);
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  w_t* w = weight.data_ptr<w_t>();
  w_t* m = mom.data_ptr<w_t>();
  const g_t* g = grad.const_data_ptr<g_t>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const acc_t lr = static_cast<acc_t>(lr_d), mu = static_cast<acc_t>(momentum_d), wd = static_cast<acc_t>(wd_d);
  const bool unit = ws1 == 1 && ms1 == 1 && gs1 == 1;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = idx[i];
      TORCH_CHECK(r >= 0 && r < num_rows, "sparse_sgd_update: index[", i, "] = ", r, " is outside [0, ", num_rows, ")");
      w_t* wr = w + r * ws0;
      w_t* mr = m + r * ms0;
      const g_t* gr = g + i * gs0;
      if (unit) {
        // Scattered rows: fetch a later row's weight and momentum ahead (see gather_normalize_kernel.cpp).
        if (i + kPrefetchRows < end) {
          const int64_t next = idx[i + kPrefetchRows];
          prefetch_row(w + next * ws0, dim);
          prefetch_row(m + next * ms0, dim);
        }
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) {
          // The gradient is first rounded to the table's dtype, as torch.optim.SGD sees it.
          const acc_t wv = static_cast<acc_t>(wr[j]);
          const acc_t gv = static_cast<acc_t>(static_cast<w_t>(gr[j])) + wd * wv;
          const acc_t mv = static_cast<acc_t>(mr[j]) * mu + gv;
          mr[j] = static_cast<w_t>(mv);
          wr[j] = static_cast<w_t>(wv - lr * mv);
        }
      } else {
        for (int64_t j = 0; j < dim; ++j) {
          const acc_t wv = static_cast<acc_t>(wr[j * ws1]);
          const acc_t gv = static_cast<acc_t>(static_cast<w_t>(gr[j * gs1])) + wd * wv;
          const acc_t mv = static_cast<acc_t>(mr[j * ms1]) * mu + gv;
          mr[j * ms1] = static_cast<w_t>(mv);
          wr[j * ws1] = static_cast<w_t>(wv - lr * mv);
        }
      }
    }
  });
}

void sparse_sgd_update_cpu(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& index,
                           const at::Tensor& grad_rows, double lr, double momentum, double weight_decay) {
  const char* op = "sparse_sgd_update";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  check_rows(weight, weight.size(0), weight.size(1), "weight", op);
  check_rows(momentum_buffer, weight.size(0), weight.size(1), "momentum_buffer", op);
  TORCH_CHECK(momentum_buffer.scalar_type() == weight.scalar_type(), op, ": momentum_buffer dtype ",
              momentum_buffer.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  check_index(index, weight, op);
  check_rows(grad_rows, index.numel(), weight.size(1), "grad_rows", op);
  TORCH_CHECK(momentum_buffer.device() == weight.device() && grad_rows.device() == weight.device(), op,
              ": weight, momentum_buffer and grad_rows must be on one device");
  if (index.numel() == 0) return;
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_sgd_update_w", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_sgd_update_g", [&] {
      update_rows<w_t, scalar_t>(weight, momentum_buffer, idx, grad_rows, lr, momentum, weight_decay);
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("sparse_sgd_update", &partialfc::sparse_sgd_update_cpu);
}
