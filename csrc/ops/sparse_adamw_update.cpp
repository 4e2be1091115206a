// Schema of the sparse AdamW update of the sampled rows, and the argument checks its CPU and CUDA launchers
// share. Kernels: cpu/sparse_adamw_update_kernel.cpp, cuda/sparse_adamw_update_kernel.cu.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "checks.h"
#include "sparse_adamw_update.h"

namespace partialfc {

// Shapes, dtypes, devices and hyperparameters of both AdamW updates (`rows` is grad_rows or grad_normalized);
// the index values are checked by each launcher (on the host: a bad row raises a catchable error on every
// device, and before any row is written).
void check_sparse_adamw_update_args(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& row_step, const at::Tensor& index, const at::Tensor& rows,
                                    const char* rows_name, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  const int64_t num_rows = weight.size(0), dim = weight.size(1);
  check_rows(weight, num_rows, dim, "weight", op);
  // The math runs in float32 (float64 for float64 tables). A bf16/fp16 table keeps exp_avg in its dtype and
  // exp_avg_sq in its dtype or in float32 (float16's range cannot hold the squares of small gradients).
  const auto w_type = weight.scalar_type();
  const bool low = w_type == at::kBFloat16 || w_type == at::kHalf;
  check_rows(exp_avg, num_rows, dim, "exp_avg", op);
  check_rows(exp_avg_sq, num_rows, dim, "exp_avg_sq", op);
  TORCH_CHECK(exp_avg.scalar_type() == w_type &&
                  (exp_avg_sq.scalar_type() == w_type || (low && exp_avg_sq.scalar_type() == at::kFloat)),
              op, ": exp_avg and exp_avg_sq must have the weight's dtype ", w_type,
              low ? " (exp_avg_sq may be float32)" : "", ", got ", exp_avg.scalar_type(), " and ",
              exp_avg_sq.scalar_type());
  check_vector(row_step, num_rows, "row_step", op);
  TORCH_CHECK(row_step.scalar_type() == at::kLong || row_step.scalar_type() == at::kInt, op,
              ": row_step must be int64 or int32, got ", row_step.scalar_type());
  check_index(index, weight, op);
  check_rows(rows, index.numel(), dim, rows_name, op);
  TORCH_CHECK(exp_avg.device() == weight.device() && exp_avg_sq.device() == weight.device() &&
                  row_step.device() == weight.device() && rows.device() == weight.device(),
              op, ": weight, exp_avg, exp_avg_sq, row_step and ", rows_name, " must be on one device, got ",
              weight.device(), ", ", exp_avg.device(), ", ", exp_avg_sq.device(), ", ", row_step.device(), ", ",
              rows.device());
  TORCH_CHECK(lr >= 0.0, op, ": lr must be >= 0, got ", lr);
  // beta < 1 keeps the bias corrections 1 - beta^t nonzero.
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, op, ": weight_decay must be >= 0, got ", weight_decay);
}

}  // namespace partialfc

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // torch.optim.AdamW (no amsgrad) on the rows index[i] of weight, exp_avg, exp_avg_sq, each row with its own
  // step count row_step[index[i]] for the bias corrections, in place; other rows untouched (index must hold
  // distinct rows). With g = grad_rows[i] and t = ++row_step[r]:
  //   w *= 1 - lr * weight_decay;  m += (1 - beta1) * (g - m);  v = beta2 * v + (1 - beta2) * g * g;
  //   w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
  m.def("sparse_adamw_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, "
        "Tensor index, Tensor grad_rows, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "int? rounding_seed=None, int rounding_step=0, int class_start=0) -> ()");
  // The same update with the backward of gather_normalize folded in, as normalize_backward_sgd_update does:
  // grad_rows[i] = (g - n <g, n>) * inv_norm[i] / grad_scale with g = grad_normalized[i] and
  // n = weight[index[i]] * inv_norm[i] recomputed from the table (unchanged since the forward); no [S, D]
  // gradient is written. CPU and CUDA kernels.
  // With a rounding_seed, a bfloat16 / float16 table and its moments are written with stochastic rounding
  // keyed by (rounding_seed, rounding_step, class_start + index[i], column), as in sparse_sgd_update.
  m.def("normalize_backward_adamw_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) row_step, Tensor index, Tensor grad_normalized, Tensor inv_norm, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, float grad_scale, int? rounding_seed=None, "
        "int rounding_step=0, int class_start=0) -> ()");
}
