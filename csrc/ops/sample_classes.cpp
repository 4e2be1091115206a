// Schema of the class sampler. Kernels: cpu/sample_classes_kernel.cpp, cuda/sample_classes_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // labels: global class ids [B] (int64). Returns (index [S] sorted local class ids, remapped labels [B] in
  // [0, S) or -1). Every positive of [class_start, class_start + num_local) is kept; negatives are drawn
  // uniformly without replacement; S = max(num_sample, #positives), or num_local when num_sample >= num_local.
  m.def("sample_classes(Tensor labels, int class_start, int num_local, int num_sample, int seed) -> (Tensor, Tensor)");
}
