// Argument checks shared by the CPU and CUDA host launchers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace partialfc {

inline bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_index(const at::Tensor& index, const at::Tensor& table, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": index must be a 1-D int64 tensor, got ",
              index.dim(), "-D ", index.scalar_type());
  TORCH_CHECK(index.device() == table.device(), op, ": index is on ", index.device(), " but the table is on ",
              table.device());
}

inline void check_rows(const at::Tensor& t, int64_t rows, int64_t cols, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be [", rows, ", ",
              cols, "], got ", t.sizes());
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
}

inline void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be [", n, "], got ", t.sizes());
}

// The fused normalize-backward updates' inverse norms [S] (the accumulation dtype, on the table's device) and
// their loss scale.
inline void check_normalize_backward_args(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& inv_norm,
                                          double grad_scale, const char* op) {
  check_vector(inv_norm, index.numel(), "inv_norm", op);
  const at::ScalarType acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(inv_norm.scalar_type() == acc && inv_norm.device() == weight.device(), op, ": inv_norm must be a ",
              acc, " tensor on ", weight.device(), ", got ", inv_norm.scalar_type(), " on ", inv_norm.device());
  TORCH_CHECK(grad_scale != 0.0, op, ": grad_scale must be nonzero");
}

// The margin backward's grad_absmax: float32, one element, on the logits' device.
inline void check_grad_absmax(const std::optional<at::Tensor>& absmax, const at::Tensor& logits, const char* op) {
  if (!absmax.has_value()) return;
  const at::Tensor& a = *absmax;
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.numel() == 1, op, ": grad_absmax must be a float32 tensor of one "
              "element, got ", a.scalar_type(), " ", a.sizes());
  TORCH_CHECK(a.device() == logits.device(), op, ": grad_absmax is on ", a.device(), ", logits on ", logits.device());
}

// subcenter_max: [B, S*K] cosines, K >= 1 dividing the columns.
inline void check_subcenter_input(const at::Tensor& cosines, int64_t k, const char* op) {
  TORCH_CHECK(k >= 1, op, ": num_subcenters must be at least 1, got ", k);
  TORCH_CHECK(cosines.dim() == 2, op, ": cosines must be 2-D [B, S*K], got ", cosines.sizes());
  TORCH_CHECK(is_float_type(cosines.scalar_type()), op, ": cosines must be float32/float64/float16/bfloat16, got ",
              cosines.scalar_type());
  TORCH_CHECK(cosines.size(1) % k == 0, op, ": cosines has ", cosines.size(1),
              " columns, not a multiple of num_subcenters = ", k);
}

// subcenter_max_backward: [B, S] grad and its int64 argmax of the same shape and device.
inline void check_subcenter_grad(const at::Tensor& grad, const at::Tensor& argmax, int64_t k, const char* op) {
  TORCH_CHECK(k >= 1, op, ": num_subcenters must be at least 1, got ", k);
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [B, S], got ", grad.sizes());
  TORCH_CHECK(is_float_type(grad.scalar_type()), op, ": grad must be float32/float64/float16/bfloat16, got ",
              grad.scalar_type());
  TORCH_CHECK(argmax.scalar_type() == at::kLong && argmax.sizes() == grad.sizes(), op,
              ": argmax must be an int64 tensor of grad's shape ", grad.sizes(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes());
  TORCH_CHECK(argmax.device() == grad.device(), op, ": argmax is on ", argmax.device(), " but grad is on ",
              grad.device());
}

}  // namespace partialfc
