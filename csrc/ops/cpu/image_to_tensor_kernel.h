// The pointer-level kernel of image_to_tensor, shared by the op (image_to_tensor_kernel.cpp) and the data
// loaders' direct Python entry point (csrc/image_fastpath.cpp).
#pragma once

#include <cstdint>

namespace partialfc {

// `image`: h x w BGR pixels, uint8, rows packed (3 * w bytes each); `out`: 3 planes of h x w float32 (R, G, B),
// (x - 127.5) / 127.5, columns mirrored when `flip`. Single-threaded.
void convert_image(const uint8_t* image, float* out, int64_t h, int64_t w, bool flip);

}  // namespace partialfc
