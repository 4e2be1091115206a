// CPU gather + L2-normalize of sampled rows, and its backward; rows are split over threads with
// at::parallel_for and each row is read once from memory (its second sweep hits the L1 cache).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "simd.h"

namespace partialfc {
namespace {

constexpr int64_t kRowGrain = 64;

// float32 rows: dst = src / max(||src||, 1e-12); returns the inverse norm.
PARTIALFC_CLONES float normalize_row_f32(const float* __restrict src, float* __restrict dst, int64_t dim) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < dim; ++j) sum += src[j] * src[j];
  const float scale = 1.0f / std::max(std::sqrt(sum), 1e-12f);
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) dst[j] = src[j] * scale;
  return scale;
}

// The inverse norm 1 / max(||src||, 1e-12) of a bfloat16 row (its bits). One function for both bf16 gathers
// below, so that they give the same bits.
PARTIALFC_CLONES_AVX512 float bf16_row_inv_norm(const uint16_t* __restrict src, int64_t dim) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < dim; ++j) {
    const float v = bf16_bits_to_float(src[j]);
    sum += v * v;
  }
  return 1.0f / std::max(std::sqrt(sum), 1e-12f);
}

// bfloat16 rows (their bits) into float32 rows, as normalize_row_f32; the generic loop's c10::BFloat16
// conversions ran at about half this speed.
PARTIALFC_CLONES_AVX512 float normalize_row_bf16_f32(const uint16_t* __restrict src, float* __restrict dst,
                                                     int64_t dim) {
  const float scale = bf16_row_inv_norm(src, dim);
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) dst[j] = bf16_bits_to_float(src[j]) * scale;
  return scale;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PARTIALFC_STREAMING_GATHER 1
// normalize_row_bf16_f32 with streaming (non-temporal) stores, for 64-byte aligned rows of a multiple of 16
// elements. The gathered rows are far larger than the caches, so the GEMMs read them from memory either way;
// plain stores first read every destination line (write-allocate), streaming ones do not. For 200K rows of a 2M
// table on 2 cores, 41 ms with plain stores against 27 ms. The same rows and inverse norms as
// normalize_row_bf16_f32, bit for bit (tests/ops/test_gather_normalize.py). The caller fences.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own avx512fintrin.h, not this code
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) float normalize_row_bf16_f32_streaming(
    const uint16_t* __restrict src, float* __restrict dst, int64_t dim) {
  const float scale = bf16_row_inv_norm(src, dim);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < dim; j += 16) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    _mm512_stream_ps(dst + j, _mm512_mul_ps(v, vscale));
  }
  return scale;
}
#pragma GCC diagnostic pop
#else
#define PARTIALFC_STREAMING_GATHER 0
#endif

// float32 rows: out = (g - n <g, n>) * scale (out may be g).
PARTIALFC_CLONES void normalize_backward_row_f32(const float* g, const float* __restrict n, float* out, int64_t dim,
                                                 float scale) {
  float dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < dim; ++j) dot += g[j] * n[j];
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) out[j] = (g[j] - n[j] * dot) * scale;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename in_t, typename out_t>
void gather_normalize_rows(const at::Tensor& weight, const at::Tensor& index, at::Tensor& out, at::Tensor& inv) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t rows = index.numel(), dim = weight.size(1), num_rows = weight.size(0);
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const in_t* w = weight.const_data_ptr<in_t>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  acc_t* inv_norm = inv.mutable_data_ptr<acc_t>();
  // Streaming stores: bf16 rows into contiguous float32 rows that start on 64-byte lines (see above).
  bool streaming = false;
  if constexpr (std::is_same_v<in_t, c10::BFloat16> && std::is_same_v<out_t, float>) {
    streaming = PARTIALFC_STREAMING_GATHER && cpu_has_avx512() && ws1 == 1 && os1 == 1 && dim % 16 == 0 &&
                os0 % 16 == 0 && reinterpret_cast<uintptr_t>(o) % 64 == 0;
  }
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
#if PARTIALFC_STREAMING_GATHER
    // Streaming stores are weakly ordered: make them visible before this thread's part is reported done.
    struct Fence {
      bool on;
      ~Fence() {
        if (on) _mm_sfence();
      }
    } fence{streaming};
#endif
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = idx[i];
      TORCH_CHECK(r >= 0 && r < num_rows, "gather_normalize: index[", i, "] = ", r, " is outside [0, ", num_rows, ")");
      const in_t* src = w + r * ws0;
      out_t* dst = o + i * os0;
      acc_t sum = 0;
      if (ws1 == 1 && os1 == 1) {
        // The sampled rows are scattered over the table (a page each): fetch a later row while this one
        // is processed, since the hardware prefetcher does not cross pages.
        if (i + kPrefetchRows < end) prefetch_row<false>(w + idx[i + kPrefetchRows] * ws0, dim);
        if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
          inv_norm[i] = normalize_row_f32(src, dst, dim);
          continue;
        } else if constexpr (std::is_same_v<in_t, c10::BFloat16> && std::is_same_v<out_t, float>) {
#if PARTIALFC_STREAMING_GATHER
          if (streaming) {
            inv_norm[i] = normalize_row_bf16_f32_streaming(reinterpret_cast<const uint16_t*>(src), dst, dim);
            continue;
          }
#endif
          inv_norm[i] = normalize_row_bf16_f32(reinterpret_cast<const uint16_t*>(src), dst, dim);
          continue;
        }
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < dim; ++j) {
          const acc_t v = static_cast<acc_t>(src[j]);
          sum += v * v;
        }
        const acc_t scale = acc_t(1) / std::max(std::sqrt(sum), acc_t(1e-12));
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) dst[j] = static_cast<out_t>(static_cast<acc_t>(src[j]) * scale);
        inv_norm[i] = scale;
      } else {
        for (int64_t j = 0; j < dim; ++j) {
          const acc_t v = static_cast<acc_t>(src[j * ws1]);
          sum += v * v;
        }
        const acc_t scale = acc_t(1) / std::max(std::sqrt(sum), acc_t(1e-12));
        for (int64_t j = 0; j < dim; ++j) dst[j * os1] = static_cast<out_t>(static_cast<acc_t>(src[j * ws1]) * scale);
        inv_norm[i] = scale;
      }
    }
  });
}

void gather_normalize_out_cpu(const at::Tensor& weight, const at::Tensor& index, at::Tensor& out, at::Tensor& inv) {
  const char* op = "gather_normalize";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  check_index(index, weight, op);
  const int64_t rows = index.numel(), dim = weight.size(1);
  check_rows(weight, weight.size(0), dim, "weight", op);
  check_rows(out, rows, dim, "out", op);
  check_vector(inv, rows, "inv_norm", op);
  TORCH_CHECK(inv.is_contiguous() && inv.scalar_type() == acc_type_of(weight.scalar_type()), op,
              ": inv_norm must be a contiguous ", acc_type_of(weight.scalar_type()), " tensor, got ", inv.scalar_type());
  TORCH_CHECK(out.device() == weight.device() && inv.device() == weight.device(), op,
              ": out and inv_norm must be on ", weight.device());
  if (rows == 0) return;
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather_normalize_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gather_normalize_out", [&] {
      gather_normalize_rows<in_t, scalar_t>(weight, idx, out, inv);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gather_normalize_cpu(const at::Tensor& weight, const at::Tensor& index,
                                                        at::ScalarType out_dtype) {
  TORCH_CHECK(is_float_type(out_dtype), "gather_normalize: out_dtype must be a floating type, got ", out_dtype);
  TORCH_CHECK(weight.dim() == 2, "gather_normalize: weight must be 2-D [num_classes, D], got ", weight.sizes());
  at::Tensor out = at::empty({index.numel(), weight.size(1)}, weight.options().dtype(out_dtype));
  at::Tensor inv = at::empty({index.numel()}, weight.options().dtype(acc_type_of(weight.scalar_type())));
  gather_normalize_out_cpu(weight, index, out, inv);
  return {out, inv};
}

template <typename grad_t, typename norm_t, typename acc_t>
void normalize_backward_rows(const at::Tensor& grad, const at::Tensor& normalized, const at::Tensor& inv,
                             at::Tensor& out) {
  const int64_t rows = grad.size(0), dim = grad.size(1);
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1), ns0 = normalized.stride(0), ns1 = normalized.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const grad_t* g = grad.const_data_ptr<grad_t>();
  const norm_t* n = normalized.const_data_ptr<norm_t>();
  const acc_t* inv_norm = inv.const_data_ptr<acc_t>();
  // `out` may alias `grad` (same dtype and layout): each element is read before it is written.
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const grad_t* gr = g + i * gs0;
      const norm_t* nr = n + i * ns0;
      acc_t* orow = o + i * os0;
      acc_t dot = 0;
      const acc_t scale = inv_norm[i];
      if (gs1 == 1 && ns1 == 1 && os1 == 1) {
        if constexpr (std::is_same_v<grad_t, float> && std::is_same_v<norm_t, float> && std::is_same_v<acc_t, float>) {
          normalize_backward_row_f32(gr, nr, orow, dim, scale);
          continue;
        }
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < dim; ++j) dot += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(nr[j]);
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j)
          orow[j] = (static_cast<acc_t>(gr[j]) - static_cast<acc_t>(nr[j]) * dot) * scale;
      } else {
        for (int64_t j = 0; j < dim; ++j) dot += static_cast<acc_t>(gr[j * gs1]) * static_cast<acc_t>(nr[j * ns1]);
        for (int64_t j = 0; j < dim; ++j)
          orow[j * os1] = (static_cast<acc_t>(gr[j * gs1]) - static_cast<acc_t>(nr[j * ns1]) * dot) * scale;
      }
    }
  });
}

void gather_normalize_backward_out_cpu(const at::Tensor& grad, const at::Tensor& normalized, const at::Tensor& inv,
                                       at::Tensor& out) {
  const char* op = "gather_normalize_backward";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [S, D], got ", grad.sizes());
  const int64_t rows = grad.size(0), dim = grad.size(1);
  check_rows(grad, rows, dim, "grad", op);
  check_rows(normalized, rows, dim, "normalized", op);
  check_rows(out, rows, dim, "out", op);
  check_vector(inv, rows, "inv_norm", op);
  TORCH_CHECK(inv.scalar_type() == at::kFloat || inv.scalar_type() == at::kDouble, op,
              ": inv_norm must be float32 or float64, got ", inv.scalar_type());
  TORCH_CHECK(out.scalar_type() == inv.scalar_type(), op, ": out must have inv_norm's dtype ", inv.scalar_type(),
              ", got ", out.scalar_type());
  TORCH_CHECK(normalized.scalar_type() == grad.scalar_type(), op, ": normalized (", normalized.scalar_type(),
              ") and grad (", grad.scalar_type(), ") must have the same dtype");
  if (out.data_ptr() == grad.data_ptr()) {
    TORCH_CHECK(out.strides() == grad.strides() && out.scalar_type() == grad.scalar_type(), op,
                ": an out that aliases grad must have grad's dtype and strides");
  }
  if (rows == 0) return;
  const at::Tensor inv_c = inv.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "normalize_backward", [&] {
    if (inv_c.scalar_type() == at::kDouble) {
      normalize_backward_rows<scalar_t, scalar_t, double>(grad, normalized, inv_c, out);
    } else {
      normalize_backward_rows<scalar_t, scalar_t, float>(grad, normalized, inv_c, out);
    }
  });
}

at::Tensor gather_normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& normalized, const at::Tensor& inv) {
  TORCH_CHECK(grad.dim() == 2, "gather_normalize_backward: grad must be 2-D [S, D], got ", grad.sizes());
  at::Tensor out = at::empty(grad.sizes(), grad.options().dtype(inv.scalar_type()));
  gather_normalize_backward_out_cpu(grad, normalized, inv, out);
  return out;
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("gather_normalize", &partialfc::gather_normalize_cpu);
  m.impl("gather_normalize_out", &partialfc::gather_normalize_out_cpu);
  m.impl("gather_normalize_backward", &partialfc::gather_normalize_backward_cpu);
  m.impl("gather_normalize_backward_out", &partialfc::gather_normalize_backward_out_cpu);
}
