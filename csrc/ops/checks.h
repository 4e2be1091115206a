// Argument checks shared by the CPU and CUDA host launchers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace partialfc
