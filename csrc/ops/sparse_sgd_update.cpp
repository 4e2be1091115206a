// Schema of the sparse SGD-momentum update of the sampled rows.
// Kernels: cpu/sparse_sgd_update_kernel.cpp, cuda/sparse_sgd_update_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // For each i: g = grad_rows[i] + weight_decay * w; m = momentum * m + g; w -= lr * m, on the rows index[i]
  // of weight and momentum_buffer (in place; index must hold distinct rows).
  m.def("sparse_sgd_update(Tensor(a!) weight, Tensor(b!) momentum_buffer, Tensor index, Tensor grad_rows, "
        "float lr, float momentum, float weight_decay) -> ()");
  // The same update with the backward of gather_normalize folded in: for each i, with
  // n = weight[index[i]] * inv_norm[i] (the forward's normalized row, recomputed from the untouched table),
  // grad_rows[i] = (g - n <g, n>) * inv_norm[i] / grad_scale where g = grad_normalized[i]; the [S, D]
  // gradient rows are never written. CPU kernel only.
  m.def("normalize_backward_sgd_update(Tensor(a!) weight, Tensor(b!) momentum_buffer, Tensor index, "
        "Tensor grad_normalized, Tensor inv_norm, float lr, float momentum, float weight_decay, "
        "float grad_scale) -> ()");
}
