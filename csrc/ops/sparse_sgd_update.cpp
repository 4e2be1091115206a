// Schema of the sparse SGD-momentum update of the sampled rows.
// Kernels: cpu/sparse_sgd_update_kernel.cpp, cuda/sparse_sgd_update_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // For each i: g = grad_rows[i] + weight_decay * w; m = momentum * m + g; w -= lr * m, on the rows index[i]
  // of weight and momentum_buffer (in place; index must hold distinct rows). With a rounding_seed, a
  // bfloat16 / float16 table and its momentum take the update in float32 and are written with stochastic
  // rounding keyed by (rounding_seed, rounding_step, class_start + index[i], column); without one (and for
  // float32 / float64 tables) they are written as before, rounded to nearest.
  m.def("sparse_sgd_update(Tensor(a!) weight, Tensor(b!) momentum_buffer, Tensor index, Tensor grad_rows, "
        "float lr, float momentum, float weight_decay, int? rounding_seed=None, int rounding_step=0, "
        "int class_start=0) -> ()");
  // The same update with the backward of gather_normalize folded in: for each i, with
  // n = weight[index[i]] * inv_norm[i] (the forward's normalized row, recomputed from the untouched table),
  // grad_rows[i] = (g - n <g, n>) * inv_norm[i] / grad_scale where g = grad_normalized[i]; the [S, D]
  // gradient rows are never written. Rounding as in sparse_sgd_update.
  m.def("normalize_backward_sgd_update(Tensor(a!) weight, Tensor(b!) momentum_buffer, Tensor index, "
        "Tensor grad_normalized, Tensor inv_norm, float lr, float momentum, float weight_decay, "
        "float grad_scale, int? rounding_seed=None, int rounding_step=0, int class_start=0) -> ()");
}
