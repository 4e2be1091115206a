// Schemas of the fused gather + L2-normalize of sampled class centers and of its backward.
// Kernels: cpu/gather_normalize_kernel.cpp, cuda/gather_normalize_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // (weight[index] / ||weight[index]||) [S, D] in out_dtype, and the inverse norms [S] in float32 (float64
  // for float64 weights).
  m.def("gather_normalize(Tensor weight, Tensor index, ScalarType out_dtype) -> (Tensor, Tensor)");
  // Same, written into caller-owned buffers (out [S, D], inv_norm [S]) so that a training loop reuses them.
  m.def("gather_normalize_out(Tensor weight, Tensor index, Tensor(a!) out, Tensor(b!) inv_norm) -> ()");
  // Gradient of the gathered raw rows [S, D]: (g - n * <g, n>) * inv_norm, in inv_norm's dtype.
  m.def("gather_normalize_backward(Tensor grad, Tensor normalized, Tensor inv_norm) -> Tensor");
  // Same into `out` [S, D]; `out` may be `grad` itself (then the backward runs in place).
  m.def("gather_normalize_backward_out(Tensor grad, Tensor normalized, Tensor inv_norm, Tensor(a!) out) -> ()");
}
