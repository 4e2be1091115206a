// CPU margin-softmax forward (statistics) and backward, in place on the logits buffer. One row per task
// of at::parallel_for; a row is swept twice while it sits in the L2 cache (transform + max, then sum-exp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../margin.h"
#include "simd.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Hot float loops get an AVX2/FMA variant chosen at run time; other machines run the baseline build.
#define PARTIALFC_X86_DISPATCH 1
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define PARTIALFC_X86_DISPATCH 0
#endif

namespace partialfc {
namespace {

// exp(x) for float with a Cephes-style polynomial on x = n ln2 + r, |r| <= ln2 / 2 (relative error below
// 2 ulp), written with GCC/Clang vector extensions: 4 lanes (SSE2) in the baseline build, 8 lanes in the
// AVX2/FMA variant chosen at run time. The argument is clamped to [-87.34, 88.72]: below, the result is
// FLT_MIN-sized (1.2e-38) instead of a denormal or 0, which no softmax sum or probability can tell apart;
// the callers only pass x <= 0 (a logit minus its row's max).
typedef float vfloat4 __attribute__((vector_size(16)));
typedef int32_t vint4 __attribute__((vector_size(16)));
typedef float vfloat8 __attribute__((vector_size(32)));
typedef int32_t vint8 __attribute__((vector_size(32)));
typedef float vfloat16 __attribute__((vector_size(64)));
typedef int32_t vint16 __attribute__((vector_size(64)));
#define PARTIALFC_INLINE inline __attribute__((always_inline))

template <typename VF, typename VI>
PARTIALFC_INLINE VF exp_vec(VF x) {
  const VF lo = VF{} - 87.3365447f, hi = VF{} + 88.7228391f;
  const VF shifter = VF{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const VF t = x * 1.44269504088896341f + shifter;
  const VF n = t - shifter;
  VF r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const VI bits = ((ti - 0x4B400000) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename VF>
PARTIALFC_INLINE VF load_vec(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename VI>
PARTIALFC_INLINE VI load_ivec(const int32_t* p) {
  VI v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The trailing elements that do not fill a vector, padded with `pad`.
template <typename VF>
PARTIALFC_INLINE VF load_tail(const float* p, int64_t n, float pad) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  float tmp[lanes];
  for (int i = 0; i < lanes; ++i) tmp[i] = i < n ? p[i] : pad;
  return load_vec<VF>(tmp);
}

template <typename VF, typename VI>
PARTIALFC_INLINE float sum_exp_impl(const float* row, int64_t n, float shift) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  VF acc = VF{};
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) acc += exp_vec<VF, VI>(load_vec<VF>(row + j) - shift);
  float total = 0.0f;
  for (int i = 0; i < lanes; ++i) total += acc[i];
  if (j < n) {
    const VF e = exp_vec<VF, VI>(load_tail<VF>(row + j, n - j, shift) - shift);
    for (int64_t i = 0; i < n - j; ++i) total += e[i];
  }
  return total;
}

template <typename VF, typename VI>
PARTIALFC_INLINE void softmax_scale_impl(float* row, int64_t n, float shift, float factor) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    const VF e = exp_vec<VF, VI>(load_vec<VF>(row + j) - shift) * factor;
    std::memcpy(row + j, &e, sizeof(e));
  }
  if (j < n) {
    const VF e = exp_vec<VF, VI>(load_tail<VF>(row + j, n - j, shift) - shift) * factor;
    for (int64_t i = 0; i < n - j; ++i) row[j + i] = e[i];
  }
}

#if PARTIALFC_X86_DISPATCH
__attribute__((target("avx2,fma"))) float sum_exp_avx2(const float* row, int64_t n, float shift) {
  return sum_exp_impl<vfloat8, vint8>(row, n, shift);
}
__attribute__((target("avx2,fma"))) void softmax_scale_avx2(float* row, int64_t n, float shift, float factor) {
  softmax_scale_impl<vfloat8, vint8>(row, n, shift, factor);
}
#endif

// sum_j exp(row[j] - shift)
float sum_exp_f32(const float* row, int64_t n, float shift) {
#if PARTIALFC_X86_DISPATCH
  if (cpu_has_avx2_fma()) return sum_exp_avx2(row, n, shift);
#endif
  return sum_exp_impl<vfloat4, vint4>(row, n, shift);
}

// row[j] = exp(row[j] - shift) / sum * scale
void softmax_scale_f32(float* row, int64_t n, float shift, float inv_sum, float scale) {
#if PARTIALFC_X86_DISPATCH
  if (cpu_has_avx2_fma()) return softmax_scale_avx2(row, n, shift, inv_sum * scale);
#endif
  softmax_scale_impl<vfloat4, vint4>(row, n, shift, inv_sum * scale);
}

// The NaN rule of the margin ops: a NaN anywhere in a row is that row's max (and so its sum-exp, loss and
// gradients), as torch.max has it; comparisons alone (std::max) would skip it.
template <typename T>
PARTIALFC_INLINE T nan_max(T m, T v) {
  return (v > m || v != v) ? v : m;
}
template <typename VF>
PARTIALFC_INLINE VF nan_max_vec(VF m, VF v) {
  return ((v > m) | (v != v)) ? v : m;
}

// One step of the online (max, sum-exp) of a row, for the half-precision rows swept once: the sum is kept
// relative to the running max and rescaled when the max grows.
template <typename acc_t>
inline void online_add(acc_t& mx, acc_t& sum, acc_t l) {
  if (l > mx) {
    sum = sum * std::exp(mx - l) + acc_t(1);
    mx = l;
  } else if (l != l) {
    mx = sum = l;
  } else {
    sum += std::exp(l - mx);
  }
}

// Clamp to [-1, 1] (NaN stays NaN, as torch.clamp), multiply by s, and return the row max (NaN rule);
// the target column (if any) is rewritten after. Written with vector types: the scalar form's branches kept
// GCC from vectorizing it, and it cost three times the exp pass.
template <typename VF>
PARTIALFC_INLINE float clamp_scale_max_impl(float* row, int64_t n, float s) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  const VF lo = VF{} - 1.0f, hi = VF{} + 1.0f;
  VF vmx = VF{} - std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    VF v = load_vec<VF>(row + j);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    v = v * s;
    std::memcpy(row + j, &v, sizeof(v));
    vmx = nan_max_vec(vmx, v);
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < lanes; ++i) mx = nan_max(mx, vmx[i]);
  for (; j < n; ++j) {
    float v = row[j];
    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    v = v * s;
    row[j] = v;
    mx = nan_max(mx, v);
  }
  return mx;
}

// max_j row[j] (NaN rule), for the rows whose target column held the max before the margin.
template <typename VF>
PARTIALFC_INLINE float row_max_impl(const float* row, int64_t n) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  VF vmx = VF{} - std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    const VF v = load_vec<VF>(row + j);
    vmx = nan_max_vec(vmx, v);
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < lanes; ++i) mx = nan_max(mx, vmx[i]);
  for (; j < n; ++j) mx = nan_max(mx, row[j]);
  return mx;
}

#if PARTIALFC_X86_DISPATCH
__attribute__((target("avx2,fma"))) float clamp_scale_max_avx2(float* row, int64_t n, float s) {
  return clamp_scale_max_impl<vfloat8>(row, n, s);
}
__attribute__((target("avx2,fma"))) float row_max_avx2(const float* row, int64_t n) {
  return row_max_impl<vfloat8>(row, n);
}
#endif

float clamp_scale_max_f32(float* row, int64_t n, float s) {
#if PARTIALFC_X86_DISPATCH
  if (cpu_has_avx2_fma()) return clamp_scale_max_avx2(row, n, s);
#endif
  return clamp_scale_max_impl<vfloat4>(row, n, s);
}

float row_max_f32(const float* row, int64_t n) {
#if PARTIALFC_X86_DISPATCH
  if (cpu_has_avx2_fma()) return row_max_avx2(row, n);
#endif
  return row_max_impl<vfloat4>(row, n);
}

template <typename scalar_t>
inline scalar_t* row_ptr(const at::Tensor& t, int64_t r) {
  return t.data_ptr<scalar_t>() + r * t.stride(0);
}

// The largest abs_bits of n contiguous float32 values: an integer max over their bits, which the AVX2 clone
// vectorizes (vpand, vpmaxud; the baseline x86-64 build has no unsigned 32-bit max).
PARTIALFC_CLONES uint32_t max_abs_bits_f32(const float* p, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, p + i, sizeof b);
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

// The backward's grad_absmax (see margin_softmax.cpp). Each worker takes the largest abs_bits of a block or
// row right after writing it, while it is still in cache, so the check costs no pass over memory; the workers'
// maxima meet in one atomic, and finish() folds in the value the tensor held on entry.
class GradAbsMax {
 public:
  explicit GradAbsMax(const std::optional<at::Tensor>& out)
      : out_(out.has_value() ? out->data_ptr<float>() : nullptr) {}

  bool wanted() const { return out_ != nullptr; }

  // The largest abs_bits of n values at `stride` (0 for none).
  template <typename scalar_t>
  static uint32_t of(const scalar_t* p, int64_t n, int64_t stride) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stride == 1) return max_abs_bits_f32(p, n);
    }
    uint32_t m = 0;
    if (stride == 1) {
      for (int64_t i = 0; i < n; ++i) m = std::max(m, abs_bits(static_cast<float>(p[i])));
    } else {
      for (int64_t i = 0; i < n; ++i) m = std::max(m, abs_bits(static_cast<float>(p[i * stride])));
    }
    return m;
  }

  void add(uint32_t bits) {
    uint32_t seen = bits_.load(std::memory_order_relaxed);
    while (bits > seen && !bits_.compare_exchange_weak(seen, bits, std::memory_order_relaxed)) {
    }
  }

  void finish() {
    if (out_ != nullptr) *out_ = bits_float(std::max(abs_bits(*out_), bits_.load()));
  }

 private:
  float* out_;
  std::atomic<uint32_t> bits_{0};
};

// Half-precision logits: whether a dtype is read into float32 and swept once (online max and sum-exp).
template <typename scalar_t>
constexpr bool half_precision() {
  return std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
}

template <typename scalar_t>
void forward_rows(at::Tensor& logits, const int64_t* labels, const MarginParams& mp, at::Tensor& row_max,
                  at::Tensor& sum_exp, at::Tensor& target_logit, at::Tensor& target_cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), cols = logits.size(1), cs = logits.stride(1);
  const acc_t s = static_cast<acc_t>(mp.s), m1 = static_cast<acc_t>(mp.m1), m2 = static_cast<acc_t>(mp.m2),
              m3 = static_cast<acc_t>(mp.m3), thr = static_cast<acc_t>(mp.filter_threshold);
  const bool plain = mp.plain(), filter = mp.filter_threshold > 0;
  acc_t* out_max = row_max.data_ptr<acc_t>();
  acc_t* out_sum = sum_exp.data_ptr<acc_t>();
  acc_t* out_tl = target_logit.data_ptr<acc_t>();
  acc_t* out_tc = target_cos.data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = row_ptr<scalar_t>(logits, r);
      const int64_t t = labels[r];
      TORCH_CHECK(t >= -1 && t < cols, "margin_softmax_forward: labels[", r, "] = ", t, " is outside [-1, ", cols, ")");
      acc_t tc = 0;
      if (t >= 0) tc = clamp_cos(static_cast<acc_t>(row[t * cs]));
      const bool filter_row = filter;  // every row: also those whose target lives on another rank
      if constexpr (half_precision<scalar_t>()) {
        // One sweep in float32: clamp, filter, margin, scale, store rounded; the statistics are those of the
        // stored values, which the backward reads, except the target's logit, taken unrounded (see
        // backward_target_logit).
        const acc_t target_value = t >= 0 ? margin_value(tc, m1, m2, m3, plain) * s : acc_t(0);
        const scalar_t target = static_cast<scalar_t>(target_value);
        acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = 0;
        for (int64_t j = 0; j < cols; ++j) {
          if (j == t) {
            row[j * cs] = target;
            online_add(mx, sum, target_value);
            continue;
          }
          acc_t v = clamp_cos(static_cast<acc_t>(row[j * cs]));
          if (filter_row && v > thr) v = 0;  // inter-class filtering
          const scalar_t stored = static_cast<scalar_t>(v * s);
          row[j * cs] = stored;
          online_add(mx, sum, static_cast<acc_t>(stored));
        }
        out_max[r] = mx;
        out_sum[r] = sum;
        out_tl[r] = target_value;
        out_tc[r] = tc;
        continue;
      }
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      bool done = false;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (cs == 1 && !filter_row) {
          mx = clamp_scale_max_f32(row, cols, s);
          done = true;
        }
      }
      if (!done) {
        for (int64_t j = 0; j < cols; ++j) {
          acc_t v = clamp_cos(static_cast<acc_t>(row[j * cs]));
          // Inter-class filtering: a non-target class too close to the sample gets logit 0.
          if (filter_row && j != t && v > thr) v = 0;
          const scalar_t stored = static_cast<scalar_t>(v * s);
          row[j * cs] = stored;
          mx = nan_max(mx, static_cast<acc_t>(stored));
        }
      }
      acc_t tl = 0;
      if (t >= 0) {
        const scalar_t stored = static_cast<scalar_t>(margin_value(tc, m1, m2, m3, plain) * s);
        row[t * cs] = stored;
        tl = static_cast<acc_t>(stored);
        // The target column changed: the row max must account for it (recompute only if it was the max; a
        // NaN max stays: the NaN is in another column, or the target's own cosine was NaN).
        if (tl > mx) {
          mx = tl;
        } else if (static_cast<acc_t>(static_cast<scalar_t>(tc * s)) == mx) {
          mx = -std::numeric_limits<acc_t>::infinity();
          bool fast = false;
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (cs == 1) {
              mx = row_max_f32(row, cols);
              fast = true;
            }
          }
          if (!fast) {
            for (int64_t j = 0; j < cols; ++j) mx = nan_max(mx, static_cast<acc_t>(row[j * cs]));
          }
        }
      }
      acc_t sum = 0;
      if (cols > 0) {
        done = false;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (cs == 1) {
            sum = sum_exp_f32(row, cols, mx);
            done = true;
          }
        }
        if (!done) {
          for (int64_t j = 0; j < cols; ++j) sum += std::exp(static_cast<acc_t>(row[j * cs]) - mx);
        }
      }
      out_max[r] = mx;
      out_sum[r] = sum;
      out_tl[r] = tl;
      out_tc[r] = t >= 0 ? tc : acc_t(0);
    }
  });
}

// The backward's scalar arguments and per-sample statistics, for either layout.
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t s, m1, m2, m3, scale;
  bool plain, filter;
  const acc_t *gm, *gs, *tc;  // global max, global sum-exp and target cosine per sample
  BackwardArgs(const at::Tensor& gmax, const at::Tensor& gsum, const at::Tensor& tcos, const MarginParams& mp,
               double grad_scale)
      : s(static_cast<acc_t>(mp.s)),
        m1(static_cast<acc_t>(mp.m1)),
        m2(static_cast<acc_t>(mp.m2)),
        m3(static_cast<acc_t>(mp.m3)),
        scale(static_cast<acc_t>(mp.s * grad_scale)),
        plain(mp.plain()),
        filter(mp.filter_threshold > 0),
        gm(gmax.const_data_ptr<acc_t>()),
        gs(gsum.const_data_ptr<acc_t>()),
        tc(tcos.const_data_ptr<acc_t>()) {}
  // The logit the forward's statistics gave sample b's target, whose stored value is `stored`: that value
  // for float32 / float64 logits; for half-precision logits the unrounded float32 one, recomputed from the
  // target cosine, because at s = 64 a bfloat16 logit is off by up to 0.125, which would move every
  // probability of the row by up to 13%.
  acc_t target_logit(int64_t b, acc_t stored) const {
    if constexpr (half_precision<scalar_t>()) {
      return margin_value(tc[b], m1, m2, m3, plain) * s;
    } else {
      return stored;
    }
  }
};

// ---- Class-major logits ----
// The fused head on CPU keeps its logits as a row-major [S, B] buffer, one row per sampled class, and hands these
// ops its transpose: a [B, S] view with strides (1, B). MKL runs the GEMM that fills it, centers @ features^T,
// faster than features @ centers^T into [B, S] (figures in docs/benchmarks.md). A sample's logits are then a strided
// column, so the kernels below walk the buffer one class row at a time with a vector over the batch, in blocks
// of class rows small enough to stay in the L2 cache for the second (sum-exp) sweep; the blocks' per-sample
// (max, sum-exp) are then combined like the ranks' are. Per-sample values (target row, target logit, ...) sit in
// arrays padded to a multiple of the vector width.

bool class_major(const at::Tensor& logits) {
  return logits.size(0) > 1 && logits.size(1) > 1 && logits.stride(0) == 1 && logits.stride(1) == logits.size(0);
}

constexpr int64_t kPad = 16;                     // widest vector (AVX-512), in floats
constexpr int64_t kColumnBlockBytes = 256 << 10;  // class rows per block: about this many bytes
constexpr int32_t kNoTarget = -2;                 // never a class row; also marks padding lanes

int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

int64_t column_block_rows(int64_t batch, int64_t elem_size) {
  return std::max<int64_t>(1, kColumnBlockBytes / std::max<int64_t>(1, batch * elem_size));
}

// The target class row of each sample as int32 (kNoTarget for -1 and for padding), checking the labels.
std::vector<int32_t> column_targets(const int64_t* labels, int64_t batch, int64_t cols, const char* op) {
  TORCH_CHECK(cols < std::numeric_limits<int32_t>::max(), op, ": too many classes (", cols, ") for class-major logits");
  std::vector<int32_t> tgt(padded(batch), kNoTarget);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t t = labels[b];
    TORCH_CHECK(t >= -1 && t < cols, op, ": labels[", b, "] = ", t, " is outside [-1, ", cols, ")");
    tgt[b] = t >= 0 ? static_cast<int32_t>(t) : kNoTarget;
  }
  return tgt;
}

// float32 forward over class rows [j0, j1) of `base` (rows of `batch` floats): clamp, filter, margin on the
// target, scale, store; then the block's per-sample max (NaN rule) and sum-exp relative to it.
// The second sweep (sum-exp) may use wider vectors (VF2, VI2) than the first: the lanes are samples either way.
template <typename VF, typename VI, typename VF2 = VF, typename VI2 = VI>
PARTIALFC_INLINE void forward_block_cols_impl(float* base, int64_t batch, int64_t j0, int64_t j1, const int32_t* tgt,
                                              const float* tval, float s, bool filter, float thr, float* mx,
                                              float* sum) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  const VF lo = VF{} - 1.0f, hi = VF{} + 1.0f, zero = VF{};
  const int64_t full = batch - batch % lanes;
  for (int64_t k = 0; k < padded(batch); k += lanes) {
    const VF init = VF{} - std::numeric_limits<float>::infinity();
    std::memcpy(mx + k, &init, sizeof(init));
    std::memcpy(sum + k, &zero, sizeof(zero));
  }
  for (int64_t j = j0; j < j1; ++j) {
    float* row = base + j * batch;
    const VI jv = VI{} + static_cast<int32_t>(j);
    for (int64_t k = 0; k < batch; k += lanes) {
      VF v = k < full ? load_vec<VF>(row + k) : load_tail<VF>(row + k, batch - k, 0.0f);
      const VI t = load_ivec<VI>(tgt + k);
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
      // Inter-class filtering: a non-target class too close to the sample gets logit 0 (in every row: a sample
      // whose target lives on another rank is filtered here as it is there).
      if (filter) v = ((v > thr) & (t != jv)) ? zero : v;
      v = v * s;
      v = t == jv ? load_vec<VF>(tval + k) : v;
      if (k < full) {
        std::memcpy(row + k, &v, sizeof(v));
      } else {
        for (int64_t i = 0; i < batch - k; ++i) row[k + i] = v[i];
      }
      const VF m = nan_max_vec(load_vec<VF>(mx + k), v);
      std::memcpy(mx + k, &m, sizeof(m));
    }
  }
  constexpr int lanes2 = sizeof(VF2) / sizeof(float);
  const int64_t full2 = batch - batch % lanes2;
  for (int64_t j = j0; j < j1; ++j) {
    const float* row = base + j * batch;
    for (int64_t k = 0; k < batch; k += lanes2) {
      const VF2 m = load_vec<VF2>(mx + k);
      // padding lanes: 0 - (-inf) would overflow the exp's clamp harmlessly; they are never read
      const VF2 v = k < full2 ? load_vec<VF2>(row + k) : load_tail<VF2>(row + k, batch - k, 0.0f);
      const VF2 acc = load_vec<VF2>(sum + k) + exp_vec<VF2, VI2>(v - m);
      std::memcpy(sum + k, &acc, sizeof(acc));
    }
  }
}

// float32 backward over class rows [j0, j1): softmax * scale, the target's margin gradient, filtered logits 0.
template <typename VF, typename VI>
PARTIALFC_INLINE void backward_block_cols_impl(float* base, int64_t batch, int64_t j0, int64_t j1, const int32_t* tgt,
                                               const float* shift, const float* factor, const float* tgrad,
                                               bool filter) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  const VF zero = VF{};
  const int64_t full = batch - batch % lanes;
  for (int64_t j = j0; j < j1; ++j) {
    float* row = base + j * batch;
    const VI jv = VI{} + static_cast<int32_t>(j);
    for (int64_t k = 0; k < batch; k += lanes) {
      const VF v = k < full ? load_vec<VF>(row + k) : load_tail<VF>(row + k, batch - k, 0.0f);
      const VI t = load_ivec<VI>(tgt + k);
      VF e = exp_vec<VF, VI>(v - load_vec<VF>(shift + k)) * load_vec<VF>(factor + k);
      // With filtering, the dropped logits (exactly 0 after the forward) get no gradient.
      if (filter) e = (v == zero) ? zero : e;
      e = t == jv ? load_vec<VF>(tgrad + k) : e;
      if (k < full) {
        std::memcpy(row + k, &e, sizeof(e));
      } else {
        for (int64_t i = 0; i < batch - k; ++i) row[k + i] = e[i];
      }
    }
  }
}

#if PARTIALFC_X86_DISPATCH
__attribute__((target("avx2,fma"))) void forward_block_cols_avx2(float* base, int64_t batch, int64_t j0, int64_t j1,
                                                                 const int32_t* tgt, const float* tval, float s,
                                                                 bool filter, float thr, float* mx, float* sum) {
  forward_block_cols_impl<vfloat8, vint8>(base, batch, j0, j1, tgt, tval, s, filter, thr, mx, sum);
}
__attribute__((target("avx2,fma"))) void backward_block_cols_avx2(float* base, int64_t batch, int64_t j0, int64_t j1,
                                                                  const int32_t* tgt, const float* shift,
                                                                  const float* factor, const float* tgrad,
                                                                  bool filter) {
  backward_block_cols_impl<vfloat8, vint8>(base, batch, j0, j1, tgt, shift, factor, tgrad, filter);
}
#endif

#if PARTIALFC_X86_DISPATCH
// The class-major exp sweeps also get a 16-lane AVX-512 build. Their lanes are samples and each lane's operations
// are the same at any width, so it gives the AVX2 build's results bit for bit (tests/ops/test_margin_softmax.py).
// The exp polynomial bounds them at 8 lanes: the backward of [200K, 128] logits took 48-56 ms with AVX2 and 23-24
// ms with AVX-512 on the 2-core machine. The forward's first sweep (clamp, margin, masked max) stays at 8 lanes:
// at 16 its selects made the whole forward 2.4x slower.
#define PARTIALFC_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
__attribute__((target(PARTIALFC_AVX512))) void forward_block_cols_avx512(float* base, int64_t batch, int64_t j0,
                                                                         int64_t j1, const int32_t* tgt,
                                                                         const float* tval, float s, bool filter,
                                                                         float thr, float* mx, float* sum) {
  forward_block_cols_impl<vfloat8, vint8, vfloat16, vint16>(base, batch, j0, j1, tgt, tval, s, filter, thr, mx, sum);
}
__attribute__((target(PARTIALFC_AVX512))) void backward_block_cols_avx512(float* base, int64_t batch, int64_t j0,
                                                                          int64_t j1, const int32_t* tgt,
                                                                          const float* shift, const float* factor,
                                                                          const float* tgrad, bool filter) {
  backward_block_cols_impl<vfloat16, vint16>(base, batch, j0, j1, tgt, shift, factor, tgrad, filter);
}

#endif

void forward_block_cols_f32(float* base, int64_t batch, int64_t j0, int64_t j1, const int32_t* tgt, const float* tval,
                            float s, bool filter, float thr, float* mx, float* sum) {
#if PARTIALFC_X86_DISPATCH
  if (cpu_has_avx512()) return forward_block_cols_avx512(base, batch, j0, j1, tgt, tval, s, filter, thr, mx, sum);
  if (cpu_has_avx2_fma()) return forward_block_cols_avx2(base, batch, j0, j1, tgt, tval, s, filter, thr, mx, sum);
#endif
  forward_block_cols_impl<vfloat4, vint4>(base, batch, j0, j1, tgt, tval, s, filter, thr, mx, sum);
}

void backward_block_cols_f32(float* base, int64_t batch, int64_t j0, int64_t j1, const int32_t* tgt,
                             const float* shift, const float* factor, const float* tgrad, bool filter) {
#if PARTIALFC_X86_DISPATCH
  if (cpu_has_avx512()) return backward_block_cols_avx512(base, batch, j0, j1, tgt, shift, factor, tgrad, filter);
  if (cpu_has_avx2_fma()) return backward_block_cols_avx2(base, batch, j0, j1, tgt, shift, factor, tgrad, filter);
#endif
  backward_block_cols_impl<vfloat4, vint4>(base, batch, j0, j1, tgt, shift, factor, tgrad, filter);
}

// Other dtypes (float64 for gradcheck, half/bfloat16 logits): the same blocks with scalar loops.
template <typename scalar_t, typename acc_t>
void forward_block_cols_scalar(scalar_t* base, int64_t batch, int64_t j0, int64_t j1, const int32_t* tgt,
                               const acc_t* tval, acc_t s, bool filter, acc_t thr, acc_t* mx, acc_t* sum) {
  for (int64_t b = 0; b < batch; ++b) {
    mx[b] = -std::numeric_limits<acc_t>::infinity();
    sum[b] = 0;
  }
  for (int64_t j = j0; j < j1; ++j) {
    scalar_t* row = base + j * batch;
    for (int64_t b = 0; b < batch; ++b) {
      acc_t v = clamp_cos(static_cast<acc_t>(row[b]));
      if (filter && tgt[b] != j && v > thr) v = 0;
      const scalar_t stored = tgt[b] == j ? static_cast<scalar_t>(tval[b]) : static_cast<scalar_t>(v * s);
      row[b] = stored;
      mx[b] = nan_max(mx[b], tgt[b] == j ? tval[b] : static_cast<acc_t>(stored));
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    const scalar_t* row = base + j * batch;
    for (int64_t b = 0; b < batch; ++b)
      sum[b] += std::exp((tgt[b] == j ? tval[b] : static_cast<acc_t>(row[b])) - mx[b]);
  }
}

template <typename scalar_t>
void forward_cols(at::Tensor& logits, const int64_t* labels, const MarginParams& mp, at::Tensor& row_max,
                  at::Tensor& sum_exp, at::Tensor& target_logit, at::Tensor& target_cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = logits.size(0), cols = logits.size(1);
  scalar_t* base = logits.data_ptr<scalar_t>();
  const std::vector<int32_t> tgt = column_targets(labels, batch, cols, "margin_softmax_forward");
  const acc_t s = static_cast<acc_t>(mp.s), thr = static_cast<acc_t>(mp.filter_threshold);
  const bool plain = mp.plain(), filter = mp.filter_threshold > 0;
  // The target's cosine and its margin logit, per sample (read before anything is rewritten); the logit
  // unrounded, as the statistics take it (for half-precision logits; the stored value otherwise).
  std::vector<acc_t> tcos(padded(batch), 0), tval(padded(batch), 0);
  for (int64_t b = 0; b < batch; ++b) {
    if (tgt[b] < 0) continue;
    tcos[b] = clamp_cos(static_cast<acc_t>(base[tgt[b] * batch + b]));
    tval[b] =
        margin_value(tcos[b], static_cast<acc_t>(mp.m1), static_cast<acc_t>(mp.m2), static_cast<acc_t>(mp.m3), plain) *
        s;
  }
  const int64_t block = column_block_rows(batch, sizeof(scalar_t));
  const int64_t num_blocks = (cols + block - 1) / block, width = padded(batch);
  std::vector<acc_t> block_max(num_blocks * width), block_sum(num_blocks * width);
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * block, j1 = std::min(cols, j0 + block);
      acc_t* mx = block_max.data() + c * width;
      acc_t* sum = block_sum.data() + c * width;
      if constexpr (std::is_same_v<scalar_t, float>) {
        forward_block_cols_f32(base, batch, j0, j1, tgt.data(), tval.data(), s, filter, thr, mx, sum);
      } else {
        forward_block_cols_scalar<scalar_t, acc_t>(base, batch, j0, j1, tgt.data(), tval.data(), s, filter, thr, mx,
                                                   sum);
      }
    }
  });
  acc_t* out_max = row_max.data_ptr<acc_t>();
  acc_t* out_sum = sum_exp.data_ptr<acc_t>();
  acc_t* out_tl = target_logit.data_ptr<acc_t>();
  acc_t* out_tc = target_cos.data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < num_blocks; ++c) mx = nan_max(mx, block_max[c * width + b]);
    acc_t sum = 0;
    for (int64_t c = 0; c < num_blocks; ++c) {
      const acc_t m = block_max[c * width + b];
      // a NaN max (a block with a NaN logit) makes the total NaN through exp(m - mx)
      sum += m == mx ? block_sum[c * width + b] : block_sum[c * width + b] * std::exp(m - mx);
    }
    out_max[b] = mx;
    out_sum[b] = sum;
    out_tl[b] = tgt[b] >= 0 ? tval[b] : acc_t(0);
    out_tc[b] = tcos[b];
  }
}

template <typename scalar_t>
void backward_cols(at::Tensor& logits, const int64_t* labels, const at::Tensor& gmax, const at::Tensor& gsum,
                   const at::Tensor& tcos, const MarginParams& mp, double grad_scale, GradAbsMax& absmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = logits.size(0), cols = logits.size(1);
  scalar_t* base = logits.data_ptr<scalar_t>();
  const std::vector<int32_t> tgt = column_targets(labels, batch, cols, "margin_softmax_backward");
  const BackwardArgs<scalar_t> a(gmax, gsum, tcos, mp, grad_scale);
  const acc_t m1 = a.m1, m2 = a.m2, scale = a.scale;
  const bool plain = a.plain, filter = a.filter;
  const acc_t *gm = a.gm, *gs = a.gs, *tc = a.tc;
  // Per sample: the shift and factor of its softmax, and its target's gradient (from the stored target logit).
  std::vector<acc_t> shift(padded(batch), 0), inv_sum(padded(batch), 0), factor(padded(batch), 0),
      tgrad(padded(batch), 0);
  for (int64_t b = 0; b < batch; ++b) {
    shift[b] = static_cast<acc_t>(gm[b]);
    const acc_t denom = static_cast<acc_t>(gs[b]);
    inv_sum[b] = acc_t(1) / denom;
    factor[b] = inv_sum[b] * scale;
    if (tgt[b] >= 0) {
      const acc_t target_p = std::exp(a.target_logit(b, static_cast<acc_t>(base[tgt[b] * batch + b])) - shift[b]) / denom;
      tgrad[b] = static_cast<acc_t>(static_cast<scalar_t>(
          (target_p - 1) * margin_derivative(static_cast<acc_t>(tc[b]), m1, m2, plain) * scale));
    }
  }
  const int64_t block = column_block_rows(batch, sizeof(scalar_t));
  at::parallel_for(0, (cols + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    uint32_t local_absmax = 0;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * block, j1 = std::min(cols, j0 + block);
      if constexpr (std::is_same_v<scalar_t, float>) {
        backward_block_cols_f32(base, batch, j0, j1, tgt.data(), shift.data(), factor.data(), tgrad.data(), filter);
      } else {
        for (int64_t j = j0; j < j1; ++j) {
          scalar_t* row = base + j * batch;
          for (int64_t b = 0; b < batch; ++b) {
            const acc_t l = static_cast<acc_t>(row[b]);
            if (tgt[b] == j) {
              row[b] = static_cast<scalar_t>(tgrad[b]);
            } else {
              row[b] = (filter && l == 0) ? scalar_t(0)
                                                         : static_cast<scalar_t>(std::exp(l - shift[b]) * inv_sum[b] * scale);
            }
          }
        }
      }
      // The block's columns are contiguous [j0, j1) x [0, batch), and still in cache.
      if (absmax.wanted()) {
        local_absmax = std::max(local_absmax, GradAbsMax::of(base + j0 * batch, (j1 - j0) * batch, 1));
      }
    }
    absmax.add(local_absmax);
  });
}

// The dtype of the statistics, in and out: float32 for float32 and half-precision logits, float64 for float64.
at::ScalarType accumulation_type(at::ScalarType logits) { return logits == at::kDouble ? at::kDouble : at::kFloat; }

void check_logits(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [B, S], got ", logits.sizes());
  TORCH_CHECK(is_float_type(logits.scalar_type()), op, ": logits must be a floating tensor, got ",
              logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 [", logits.size(0), "], got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), ", logits on ",
              logits.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_cpu(
    at::Tensor& logits, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double filter_threshold, bool store_logits) {
  check_logits(logits, labels, "margin_softmax_forward");
  if (!store_logits) {
    // The in-place kernels on a copy (clone keeps a class-major layout): the CPU step stores its logits.
    at::Tensor work = logits.clone();
    return margin_softmax_forward_cpu(work, labels, s, m1, m2, m3, filter_threshold, true);
  }
  const int64_t rows = logits.size(0);
  auto opts = logits.options().dtype(accumulation_type(logits.scalar_type()));
  at::Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts);
  at::Tensor target_logit = at::empty({rows}, opts), target_cos = at::empty({rows}, opts);
  if (rows == 0) return {row_max, sum_exp, target_logit, target_cos};
  const at::Tensor lab = labels.contiguous();
  const MarginParams mp{s, m1, m2, m3, filter_threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_softmax_forward", [&] {
    if (class_major(logits)) {
      forward_cols<scalar_t>(logits, lab.const_data_ptr<int64_t>(), mp, row_max, sum_exp, target_logit, target_cos);
    } else {
      forward_rows<scalar_t>(logits, lab.const_data_ptr<int64_t>(), mp, row_max, sum_exp, target_logit, target_cos);
    }
  });
  return {row_max, sum_exp, target_logit, target_cos};
}

template <typename scalar_t>
void backward_rows(at::Tensor& logits, const int64_t* labels, const at::Tensor& gmax, const at::Tensor& gsum,
                   const at::Tensor& tcos, const MarginParams& mp, double grad_scale, GradAbsMax& absmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), cols = logits.size(1), cs = logits.stride(1);
  const BackwardArgs<scalar_t> a(gmax, gsum, tcos, mp, grad_scale);
  const acc_t m1 = a.m1, m2 = a.m2, scale = a.scale;
  const bool plain = a.plain, filter = a.filter;
  const acc_t *gm = a.gm, *gs = a.gs, *tc = a.tc;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    uint32_t local_absmax = 0;
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = row_ptr<scalar_t>(logits, r);
      const int64_t t = labels[r];
      TORCH_CHECK(t >= -1 && t < cols, "margin_softmax_backward: labels[", r, "] = ", t, " is outside [-1, ", cols,
                  ")");
      const acc_t shift = static_cast<acc_t>(gm[r]), denom = static_cast<acc_t>(gs[r]);
      const bool filter_row = filter;  // every row: also those whose target lives on another rank
      acc_t target_p = 0;
      if (t >= 0) target_p = std::exp(a.target_logit(r, static_cast<acc_t>(row[t * cs])) - shift) / denom;
      bool done = false;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (cs == 1 && !filter_row) {
          softmax_scale_f32(row, cols, shift, 1.0f / denom, scale);
          done = true;
        }
      }
      if (!done) {
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t l = static_cast<acc_t>(row[j * cs]);
          // With filtering, the dropped logits (exactly 0 after the forward) get no gradient.
          row[j * cs] = (filter_row && l == 0) ? scalar_t(0) : static_cast<scalar_t>(std::exp(l - shift) / denom * scale);
        }
      }
      if (t >= 0) {
        const acc_t deriv = margin_derivative(static_cast<acc_t>(tc[r]), m1, m2, plain);
        row[t * cs] = static_cast<scalar_t>((target_p - 1) * deriv * scale);
      }
      if (absmax.wanted()) local_absmax = std::max(local_absmax, GradAbsMax::of(row, cols, cs));
    }
    absmax.add(local_absmax);
  });
}

void margin_softmax_backward_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& global_max,
                                 const at::Tensor& global_sum_exp, const at::Tensor& target_cos, double s, double m1,
                                 double m2, double m3, double grad_scale, double filter_threshold,
                                 const std::optional<at::Tensor>& grad_absmax, bool from_cosines) {
  const char* op = "margin_softmax_backward";
  check_logits(logits, labels, op);
  check_grad_absmax(grad_absmax, logits, op);
  // The logits as a storing forward leaves them, then the backward over those.
  if (from_cosines) margin_softmax_forward_cpu(logits, labels, s, m1, m2, m3, filter_threshold, true);
  const int64_t rows = logits.size(0);
  check_vector(global_max, rows, "global_max", op);
  check_vector(global_sum_exp, rows, "global_sum_exp", op);
  check_vector(target_cos, rows, "target_cos", op);
  if (rows == 0 || logits.size(1) == 0) return;
  const auto dtype = logits.scalar_type(), acc = accumulation_type(dtype);
  const at::Tensor gm = global_max.to(acc).contiguous(), gs = global_sum_exp.to(acc).contiguous();
  const at::Tensor tc = target_cos.to(acc).contiguous(), lab = labels.contiguous();
  const MarginParams mp{s, m1, m2, m3, filter_threshold};
  GradAbsMax absmax(grad_absmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "margin_softmax_backward", [&] {
    if (class_major(logits)) {
      backward_cols<scalar_t>(logits, lab.const_data_ptr<int64_t>(), gm, gs, tc, mp, grad_scale, absmax);
    } else {
      backward_rows<scalar_t>(logits, lab.const_data_ptr<int64_t>(), gm, gs, tc, mp, grad_scale, absmax);
    }
  });
  absmax.finish();
}

// ---- Adaptive margins (AdaFace, CurricularFace) ----
// Per-sample margins and re-weighted negatives, in scalar loops over rows of any layout (class-major too,
// then strided): the vectorized paths above stay those of the fixed margins, bit for bit.

template <typename scalar_t>
void forward_adaptive(at::Tensor& logits, const int64_t* labels, const AdaptiveInputs<at::opmath_type<scalar_t>>& in,
                      double filter_threshold, at::Tensor& row_max, at::Tensor& sum_exp, at::Tensor& target_logit,
                      at::Tensor& target_cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), cols = logits.size(1), cs = logits.stride(1);
  const acc_t thr = static_cast<acc_t>(filter_threshold), s = in.s;
  const bool filter = filter_threshold > 0;
  acc_t* out_max = row_max.data_ptr<acc_t>();
  acc_t* out_sum = sum_exp.data_ptr<acc_t>();
  acc_t* out_tl = target_logit.data_ptr<acc_t>();
  acc_t* out_tc = target_cos.data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = row_ptr<scalar_t>(logits, r);
      const int64_t t = labels[r];
      TORCH_CHECK(t >= -1 && t < cols, "margin_softmax_forward_adaptive: labels[", r, "] = ", t, " is outside [-1, ",
                  cols, ")");
      const AdaptiveRow<acc_t> a = in.row(r);
      // A non-target entry's logit, rounded to the storage type as a stored logit is.
      auto negative = [&](acc_t stored) {
        return a.hard ? static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(stored))) : stored;
      };
      const acc_t tc = t >= 0 ? clamp_to(static_cast<acc_t>(row[t * cs]), a.lo, a.hi) : acc_t(0);
      const bool filter_row = filter;  // every row: also those whose target lives on another rank
      acc_t mx = -std::numeric_limits<acc_t>::infinity(), tl = 0, online_sum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        acc_t logit;
        if (j == t) {
          // unrounded, as in forward_rows (the stored value itself for float32 / float64)
          logit = tl = a.target_value(tc) * s;
          row[j * cs] = static_cast<scalar_t>(logit);
        } else {
          acc_t v = clamp_to(static_cast<acc_t>(row[j * cs]), a.lo, a.hi);
          if (filter_row && v > thr) v = 0;  // inter-class filtering
          const scalar_t stored = static_cast<scalar_t>(v * s);
          row[j * cs] = stored;
          logit = negative(static_cast<acc_t>(stored));
        }
        // Half-precision rows are swept once (online sum-exp); float32 / float64 keep two sweeps.
        if constexpr (half_precision<scalar_t>()) {
          online_add(mx, online_sum, logit);
        } else {
          mx = nan_max(mx, logit);
        }
      }
      acc_t sum = online_sum;
      if constexpr (!half_precision<scalar_t>()) {
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t l = static_cast<acc_t>(row[j * cs]);
          sum += std::exp((j == t ? l : negative(l)) - mx);
        }
      }
      out_max[r] = mx;
      out_sum[r] = sum;
      out_tl[r] = tl;
      out_tc[r] = tc;
    }
  });
}

template <typename scalar_t>
void backward_adaptive(at::Tensor& logits, const int64_t* labels, const at::Tensor& gmax, const at::Tensor& gsum,
                       const at::Tensor& tcos, const AdaptiveInputs<at::opmath_type<scalar_t>>& in, double grad_scale,
                       double filter_threshold, GradAbsMax& absmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), cols = logits.size(1), cs = logits.stride(1);
  const acc_t scale = static_cast<acc_t>(static_cast<double>(in.s) * grad_scale);
  const bool filter = filter_threshold > 0;
  const acc_t *gm = gmax.const_data_ptr<acc_t>(), *gs = gsum.const_data_ptr<acc_t>(),
              *tc = tcos.const_data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    uint32_t local_absmax = 0;
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = row_ptr<scalar_t>(logits, r);
      const int64_t t = labels[r];
      TORCH_CHECK(t >= -1 && t < cols, "margin_softmax_backward_adaptive: labels[", r, "] = ", t, " is outside [-1, ",
                  cols, ")");
      const AdaptiveRow<acc_t> a = in.row(r);
      const acc_t shift = static_cast<acc_t>(gm[r]), denom = static_cast<acc_t>(gs[r]);
      // The clamp's bounds as stored: an entry there was clamped and gets no gradient.
      const acc_t stored_lo = static_cast<acc_t>(static_cast<scalar_t>(a.lo * a.s));
      const acc_t stored_hi = static_cast<acc_t>(static_cast<scalar_t>(a.hi * a.s));
      const bool filter_row = filter;  // every row: also those whose target lives on another rank
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t l = static_cast<acc_t>(row[j * cs]);
        acc_t g;
        if (j == t) {
          // the target's logit as the forward's statistics took it (see BackwardArgs::target_logit)
          acc_t lt = l;
          if constexpr (half_precision<scalar_t>()) lt = a.target_value(static_cast<acc_t>(tc[r])) * a.s;
          g = (std::exp(lt - shift) / denom - 1) * a.target_derivative(static_cast<acc_t>(tc[r])) * scale;
        } else if (filter_row && l == 0) {
          g = 0;  // a dropped (filtered) logit
        } else if (a.clip && (l <= stored_lo || l >= stored_hi)) {
          g = 0;
        } else {
          const acc_t logit = a.hard ? static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(l))) : l;
          g = std::exp(logit - shift) / denom * a.negative_slope(l) * scale;
        }
        row[j * cs] = static_cast<scalar_t>(g);
      }
      if (absmax.wanted()) local_absmax = std::max(local_absmax, GradAbsMax::of(row, cols, cs));
    }
    absmax.add(local_absmax);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_adaptive_cpu(
    at::Tensor& logits, const at::Tensor& labels, double s, double m1, double m2, double m3, double filter_threshold,
    const std::optional<at::Tensor>& sample_m2, const std::optional<at::Tensor>& sample_m3, double clip_eps,
    const std::optional<at::Tensor>& hard_threshold, double hard_t, bool store_logits) {
  const char* op = "margin_softmax_forward_adaptive";
  check_logits(logits, labels, op);
  if (!store_logits) {
    at::Tensor work = logits.clone();  // as in margin_softmax_forward_cpu
    return margin_softmax_forward_adaptive_cpu(work, labels, s, m1, m2, m3, filter_threshold, sample_m2, sample_m3,
                                               clip_eps, hard_threshold, hard_t, true);
  }
  const at::Tensor sm2 = adaptive_vector(sample_m2, logits, "sample_m2", op);
  const at::Tensor sm3 = adaptive_vector(sample_m3, logits, "sample_m3", op);
  const at::Tensor hard = adaptive_vector(hard_threshold, logits, "hard_threshold", op);
  const int64_t rows = logits.size(0);
  const auto dtype = logits.scalar_type();
  auto opts = logits.options().dtype(accumulation_type(dtype));
  at::Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts);
  at::Tensor target_logit = at::empty({rows}, opts), target_cos = at::empty({rows}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "margin_softmax_forward_adaptive", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = adaptive_inputs<acc_t>(sm2, sm3, hard, s, m1, m2, m3, clip_eps, hard_t, op);
    if (rows == 0) return;
    const at::Tensor lab = labels.contiguous();
    forward_adaptive<scalar_t>(logits, lab.const_data_ptr<int64_t>(), in, filter_threshold, row_max, sum_exp,
                               target_logit, target_cos);
  });
  return {row_max, sum_exp, target_logit, target_cos};
}

void margin_softmax_backward_adaptive_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& global_max,
                                          const at::Tensor& global_sum_exp, const at::Tensor& target_cos, double s,
                                          double m1, double m2, double m3, double grad_scale, double filter_threshold,
                                          const std::optional<at::Tensor>& sample_m2,
                                          const std::optional<at::Tensor>& sample_m3, double clip_eps,
                                          const std::optional<at::Tensor>& hard_threshold, double hard_t,
                                          const std::optional<at::Tensor>& grad_absmax, bool from_cosines) {
  const char* op = "margin_softmax_backward_adaptive";
  check_logits(logits, labels, op);
  check_grad_absmax(grad_absmax, logits, op);
  if (from_cosines) {  // as in margin_softmax_backward_cpu
    margin_softmax_forward_adaptive_cpu(logits, labels, s, m1, m2, m3, filter_threshold, sample_m2, sample_m3, clip_eps,
                                        hard_threshold, hard_t, true);
  }
  const int64_t rows = logits.size(0);
  check_vector(global_max, rows, "global_max", op);
  check_vector(global_sum_exp, rows, "global_sum_exp", op);
  check_vector(target_cos, rows, "target_cos", op);
  const at::Tensor sm2 = adaptive_vector(sample_m2, logits, "sample_m2", op);
  const at::Tensor sm3 = adaptive_vector(sample_m3, logits, "sample_m3", op);
  const at::Tensor hard = adaptive_vector(hard_threshold, logits, "hard_threshold", op);
  const auto dtype = logits.scalar_type();
  GradAbsMax absmax(grad_absmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "margin_softmax_backward_adaptive", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = adaptive_inputs<acc_t>(sm2, sm3, hard, s, m1, m2, m3, clip_eps, hard_t, op);
    if (rows == 0 || logits.size(1) == 0) return;
    const auto acc = accumulation_type(dtype);
    const at::Tensor gm = global_max.to(acc).contiguous(), gs = global_sum_exp.to(acc).contiguous();
    const at::Tensor tc = target_cos.to(acc).contiguous(), lab = labels.contiguous();
    backward_adaptive<scalar_t>(logits, lab.const_data_ptr<int64_t>(), gm, gs, tc, in, grad_scale, filter_threshold,
                                absmax);
  });
  absmax.finish();
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("margin_softmax_forward", &partialfc::margin_softmax_forward_cpu);
  m.impl("margin_softmax_backward", &partialfc::margin_softmax_backward_cpu);
  m.impl("margin_softmax_forward_adaptive", &partialfc::margin_softmax_forward_adaptive_cpu);
  m.impl("margin_softmax_backward_adaptive", &partialfc::margin_softmax_backward_adaptive_cpu);
}
