// Schemas of the sub-center max (sub-center ArcFace) and of its backward.
// Kernels: cpu/subcenter_max_kernel.cpp, cuda/subcenter_max_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // cosines [B, S*K], identity s owning columns s*K .. s*K+K-1 -> (values [B, S] in the cosines' dtype, argmax
  // [B, S] int64 in [0, K)). Ties go to the lowest k; a NaN wins (the first NaN of the K), as in torch.max.
  m.def("subcenter_max(Tensor cosines, int num_subcenters) -> (Tensor, Tensor)");
  // grad [B, S] -> [B, S*K] in grad's dtype: grad[b, s] at column s*K + argmax[b, s], zero elsewhere.
  m.def("subcenter_max_backward(Tensor grad, Tensor argmax, int num_subcenters) -> Tensor");
}
