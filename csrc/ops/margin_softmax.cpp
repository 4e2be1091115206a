// Schemas of the margin-softmax forward (statistics) and backward, both in place on the logits buffer.
// Kernels: cpu/margin_softmax_kernel.cpp, cuda/margin_softmax_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // logits [B, S] holds cosines on entry and the scaled margin logits on exit. labels [B] in [0, S) or -1.
  // Returns (row_max, sum_exp relative to row_max, target_logit, target_cos), each [B] in logits' dtype.
  m.def("margin_softmax_forward(Tensor(a!) logits, Tensor labels, float s, float m1, float m2, float m3, "
        "float filter_threshold) -> (Tensor, Tensor, Tensor, Tensor)");
  // logits [B, S] (the forward's output) becomes d(sum of losses)/d(cosine) * grad_scale.
  m.def("margin_softmax_backward(Tensor(a!) logits, Tensor labels, Tensor global_max, Tensor global_sum_exp, "
        "Tensor target_cos, float s, float m1, float m2, float m3, float grad_scale, float filter_threshold) -> ()");
}
