// CPU kernel of image_to_tensor: uint8 [H, W, 3] BGR -> float32 [3, H, W] RGB, (x - 127.5) / 127.5, optional
// left-right mirror, in one pass over the image.
//
// The AVX2 path (chosen at run time) takes 8 pixels (24 bytes) at a time into one 256-bit register; per channel
// one byte shuffle picks the 8 channel bytes, zero-extended to int32 and in output order (reversed for the
// mirror), then they are converted to float, normalized and stored: 20 instructions per 8 pixels. The last
// W % 8 pixels of a row go through a 256-entry table; machines without AVX2 use the table for every pixel.
//
// Exactness: the result equals float32 (x - 127.5f) / 127.5f bit for bit. d = x - 127.5 is exact in float32;
// instead of a division the kernel multiplies by 1 / 127.5 held as an unevaluated sum r + c of two floats
// (r = float32(1 / 127.5), c = float32(1 / 127.5 - r)): q = fma(d, r, d * c) carries about 48 bits before its
// one rounding, and since d / 127.5 is never close to halfway between two floats (it is n / 255 for an odd n)
// that rounding gives the correctly rounded quotient for each of the 256 inputs, as the division does
// (tests/data/test_image_to_tensor.py checks every value against numpy's division).
#include "image_to_tensor_kernel.h"
#include "simd.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PARTIALFC_ITT_X86 1
#else
#define PARTIALFC_ITT_X86 0
#endif

namespace partialfc {
namespace {

struct NormTable {
  float v[256];
  NormTable() {
    for (int k = 0; k < 256; ++k) v[k] = (static_cast<float>(k) - 127.5f) / 127.5f;
  }
};

const NormTable& norm_table() {
  static const NormTable table;
  return table;
}

// Output columns [x0, x1) of one row through the table: `src` is the image row (w BGR pixels), `r`, `g`, `b`
// the row in each output plane; with `flip` output column x reads source column w - 1 - x.
inline void convert_span_table(const uint8_t* src, float* r, float* g, float* b, int64_t x0, int64_t x1, int64_t w,
                               bool flip) {
  const float* t = norm_table().v;
  for (int64_t x = x0; x < x1; ++x) {
    const uint8_t* p = src + 3 * (flip ? w - 1 - x : x);
    r[x] = t[p[2]];
    g[x] = t[p[1]];
    b[x] = t[p[0]];
  }
}

#if PARTIALFC_ITT_X86
// vpshufb masks for 8 pixels (24 bytes at p) held as two 16-byte lanes: bytes p[0..15] and p[8..23]. Each
// 32-bit lane of the result receives one channel byte of one pixel, zero-extended (the -128 entries zero the
// other three bytes), so one shuffle yields the 8 values of a channel as int32. Without the mirror, output
// lanes 0-3 are pixels 0-3 (from p[0..15]) and lanes 4-7 pixels 4-7 (from p[8..23]); with the mirror, lanes 0-3
// are pixels 7-4 (from p[8..23]) and lanes 4-7 pixels 3-0 (from p[0..15]). No byte outside p[0..23] is read.
struct ShuffleMasks {
  alignas(32) int8_t m[2][3][32];  // [flip][channel][byte]
  ShuffleMasks() {
    for (int f = 0; f < 2; ++f)
      for (int c = 0; c < 3; ++c)
        for (int lane = 0; lane < 8; ++lane) {
          const int pixel = f ? 7 - lane : lane;
          // byte offset of the channel within the 16 bytes loaded into this lane's half
          const int from_second = pixel >= 4;  // pixels 4-7 come from p[8..23]
          const int byte = 3 * pixel + c - (from_second ? 8 : 0);
          int8_t* d = m[f][c] + 4 * lane;
          d[0] = static_cast<int8_t>(byte);
          d[1] = d[2] = d[3] = static_cast<int8_t>(-128);
        }
  }
};

const ShuffleMasks& shuffle_masks() {
  static const ShuffleMasks masks;
  return masks;
}

// 1 / 127.5 = kRecipHi + kRecipLo to about 48 bits.
constexpr float kRecipHi = static_cast<float>(1.0 / 127.5);
constexpr float kRecipLo = static_cast<float>(1.0 / 127.5 - static_cast<double>(kRecipHi));

__attribute__((target("avx2,fma"))) void convert_avx2(const uint8_t* img, float* out, int64_t h, int64_t w,
                                                      bool flip) {
  const ShuffleMasks& sm = shuffle_masks();
  const int f = flip ? 1 : 0;
  __m256i mask[3];
  for (int c = 0; c < 3; ++c) mask[c] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sm.m[f][c]));
  const __m256 half = _mm256_set1_ps(127.5f), r = _mm256_set1_ps(kRecipHi), lo = _mm256_set1_ps(kRecipLo);
  const int64_t plane = h * w, full = w - w % 8;
  for (int64_t y = 0; y < h; ++y) {
    const uint8_t* src = img + y * w * 3;
    float* rows[3] = {out + 2 * plane + y * w, out + plane + y * w, out + y * w};  // B, G, R planes by channel
    for (int64_t x = 0; x < full; x += 8) {
      const uint8_t* p = src + 3 * (flip ? w - 8 - x : x);
      const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
      const __m256i v = flip ? _mm256_set_m128i(first, second) : _mm256_set_m128i(second, first);
      for (int ch = 0; ch < 3; ++ch) {
        const __m256 d = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, mask[ch])), half);  // exact
        _mm256_storeu_ps(rows[ch] + x, _mm256_fmadd_ps(d, r, _mm256_mul_ps(d, lo)));
      }
    }
    convert_span_table(src, rows[2], rows[1], rows[0], full, w, w, flip);
  }
}

#endif

void check_image(const at::Tensor& image, const char* op) {
  TORCH_CHECK(image.scalar_type() == at::kByte, op, ": image must be uint8 (a decoded 8-bit image), got ",
              image.scalar_type());
  TORCH_CHECK(image.dim() == 3 && image.size(2) == 3, op,
              ": image must be [H, W, 3] (BGR, as cv2.imdecode returns), got ", image.sizes());
}

void convert(const at::Tensor& image, bool flip, at::Tensor& out) {
  const int64_t h = image.size(0), w = image.size(1);
  if (h == 0 || w == 0) return;
  const at::Tensor src = image.contiguous();
  convert_image(src.const_data_ptr<uint8_t>(), out.mutable_data_ptr<float>(), h, w, flip);
}

at::Tensor image_to_tensor_cpu(const at::Tensor& image, bool flip) {
  check_image(image, "image_to_tensor");
  at::Tensor out = at::empty({3, image.size(0), image.size(1)}, image.options().dtype(at::kFloat));
  convert(image, flip, out);
  return out;
}

void image_to_tensor_out_cpu(const at::Tensor& image, bool flip, at::Tensor& out) {
  const char* op = "image_to_tensor_out";
  check_image(image, op);
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == 3 && out.size(1) == image.size(0) && out.size(2) == image.size(1), op,
              ": out must be [3, ", image.size(0), ", ", image.size(1), "] for an image of ", image.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(out.device() == image.device(), op, ": out is on ", out.device(), " but the image is on ", image.device());
  convert(image, flip, out);
}

}  // namespace

void convert_image(const uint8_t* image, float* out, int64_t h, int64_t w, bool flip) {
#if PARTIALFC_ITT_X86
  if (cpu_has_avx2_fma()) {
    convert_avx2(image, out, h, w, flip);
    return;
  }
#endif
  const int64_t plane = h * w;
  for (int64_t y = 0; y < h; ++y)
    convert_span_table(image + y * w * 3, out + y * w, out + plane + y * w, out + 2 * plane + y * w, 0, w, w, flip);
}

}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("image_to_tensor", &partialfc::image_to_tensor_cpu);
  m.impl("image_to_tensor_out", &partialfc::image_to_tensor_out_cpu);
}

// The conversion has no gradient (its input is uint8 and its output a new tensor), so the same kernel also
// serves the autograd key: a call then skips the boxed autograd fallback, which costs about a microsecond
// per image in the data loader. (The _out variant keeps the fallback, which guards writes into tensors that
// require grad.)
TORCH_LIBRARY_IMPL(partialfc, AutogradCPU, m) { m.impl("image_to_tensor", &partialfc::image_to_tensor_cpu); }
