// Schema of the training-image conversion used by the data loaders (partialfc/data/transforms.py).
// Kernel: cpu/image_to_tensor_kernel.cpp. It runs in the DataLoader worker processes on decoded images, before
// anything reaches an accelerator, so it has a CPU kernel only: no CUDA kernel is needed or registered.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(partialfc, m) {
  // A decoded OpenCV image, uint8 [H, W, 3] in BGR order, to the backbone input float32 [3, H, W] in RGB order,
  // normalized as (x - 127.5) / 127.5 (the same float32 values as that expression), mirrored left-right when
  // `flip`. One single-threaded pass: the loaders run one conversion per worker process.
  m.def("image_to_tensor(Tensor image, bool flip=False) -> Tensor");
  // Same, written into a caller-owned float32 [3, H, W] tensor (for example one slot of a batch buffer).
  m.def("image_to_tensor_out(Tensor image, bool flip, Tensor(a!) out) -> ()");
}
