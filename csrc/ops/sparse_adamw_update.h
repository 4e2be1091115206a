// What the CPU and CUDA launchers of the sparse AdamW updates share: the argument checks (defined in
// sparse_adamw_update.cpp) and the dispatch over the table, moment, gradient and step-count dtypes.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

namespace partialfc {

// Shapes, dtypes, devices and hyperparameters of both AdamW updates (`rows` is grad_rows or grad_normalized).
void check_sparse_adamw_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& row_step, const at::Tensor& index, const at::Tensor& rows,
                                    const char* rows_name, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, const char* op);

// fn(w_t{}, v_t{}, g_t{}, step_t{}) over the table, gradient and step dtypes: v_t is the weight's dtype, or
// float32 beside a bf16/fp16 table.
template <typename Fn>
void dispatch_adamw(const at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& grad,
                    const at::Tensor& row_step, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_adamw_update_w", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sparse_adamw_update_g", [&] {
      using g_t = scalar_t;
      auto with_v = [&](auto v0) {
        if (row_step.scalar_type() == at::kLong) {
          fn(w_t{}, v0, g_t{}, int64_t{});
        } else {
          fn(w_t{}, v0, g_t{}, int32_t{});
        }
      };
      if constexpr (std::is_same_v<w_t, c10::BFloat16> || std::is_same_v<w_t, c10::Half>) {
        if (exp_avg_sq.scalar_type() == at::kFloat) {
          with_v(float{});
          return;
        }
      }
      with_v(w_t{});
    });
  });
}

}  // namespace partialfc
