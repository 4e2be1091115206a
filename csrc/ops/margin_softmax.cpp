// Schemas of the margin-softmax forward (statistics) and backward, both in place on the logits buffer.
// Kernels: cpu/margin_softmax_kernel.cpp, cuda/margin_softmax_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // logits [B, S] holds cosines on entry and the scaled margin logits on exit. labels [B] in [0, S) or -1.
  // Returns (row_max, sum_exp relative to row_max, target_logit, target_cos), each [B] in logits' dtype.
  // store_logits=false: the logits are only read (they keep the cosines), and the backward is then called with
  // from_cosines=true and derives each logit from its cosine as this op would have stored it. On CUDA that
  // saves the write of the [B, S] buffer (docs/kernels.md); the CPU kernels and the reference work on a copy.
  m.def("margin_softmax_forward(Tensor(a!) logits, Tensor labels, float s, float m1, float m2, float m3, "
        "float filter_threshold, bool store_logits=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // logits [B, S] (the forward's output) becomes d(sum of losses)/d(cosine) * grad_scale.
  // grad_absmax (optional, float32, one element on the logits' device) becomes the larger of itself and the
  // largest |gradient| as stored (in the logits' dtype), NaN when a stored gradient is NaN (ordering
  // NaN > +inf > finite, as the bits of |x| compare). The head's finiteness check reads it instead of making a
  // pass over the centers' gradient (partialfc/head/partial_fc.py, CenterGrad.is_finite).
  m.def("margin_softmax_backward(Tensor(a!) logits, Tensor labels, Tensor global_max, Tensor global_sum_exp, "
        "Tensor target_cos, float s, float m1, float m2, float m3, float grad_scale, float filter_threshold, "
        "Tensor(b!)? grad_absmax=None, bool from_cosines=False) -> ()");
  // The same with per-sample margins (AdaFace) and re-weighted hard negatives (CurricularFace): sample b's
  // target angle gets sample_m2[b] and its target cosine sample_m3[b] on top of (m2, m3); clip_eps > 0 clamps
  // every cosine to [-1 + clip_eps, 1 - clip_eps] and clips the target angle to [clip_eps, pi - clip_eps]
  // (no fallback branch); a non-target cosine c > hard_threshold[b] gets the logit s * c * (hard_t + c). With
  // hard_threshold, such entries hold s * c on exit (the backward derives their logit from it).
  m.def("margin_softmax_forward_adaptive(Tensor(a!) logits, Tensor labels, float s, float m1, float m2, float m3, "
        "float filter_threshold, Tensor? sample_m2, Tensor? sample_m3, float clip_eps, Tensor? hard_threshold, "
        "float hard_t, bool store_logits=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("margin_softmax_backward_adaptive(Tensor(a!) logits, Tensor labels, Tensor global_max, "
        "Tensor global_sum_exp, Tensor target_cos, float s, float m1, float m2, float m3, float grad_scale, "
        "float filter_threshold, Tensor? sample_m2, Tensor? sample_m3, float clip_eps, Tensor? hard_threshold, "
        "float hard_t, Tensor(b!)? grad_absmax=None, bool from_cosines=False) -> ()");
}
