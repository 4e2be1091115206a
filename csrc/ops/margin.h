// The margin function shared by the CPU and CUDA kernels (see partialfc/ops.py for the definition):
//   f(t) = cos(m1 * acos(t) + m2) - m3      when m1 * acos(t) + m2 <= pi
//   f(t) = t - m3 - m2 * sin(m2)            otherwise
// and its exact derivative df/dt = m1 * sin(m1 * theta + m2) / sin(theta) (1 in the fallback branch).
// The adaptive ops (AdaFace) may clip the angle instead of falling back: clipped_margin_value below.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <math.h>

#include <cmath>
#include <cstdint>

#include "stochastic_rounding.h"

namespace partialfc {

C10_HOST_DEVICE inline float m_acos(float x) { return ::acosf(x); }
C10_HOST_DEVICE inline double m_acos(double x) { return ::acos(x); }
C10_HOST_DEVICE inline float m_cos(float x) { return ::cosf(x); }
C10_HOST_DEVICE inline double m_cos(double x) { return ::cos(x); }
C10_HOST_DEVICE inline float m_sin(float x) { return ::sinf(x); }
C10_HOST_DEVICE inline double m_sin(double x) { return ::sin(x); }
C10_HOST_DEVICE inline float m_sqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double m_sqrt(double x) { return ::sqrt(x); }

// The key by which the margin backward's grad_absmax orders |x|: the bits of |x| as a float32, read as an
// unsigned integer. It orders the finite values by magnitude, below +inf, below every NaN, so an integer max
// (an atomicMax on CUDA) keeps the largest magnitude and lets a NaN through without a special case.
C10_HOST_DEVICE inline uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// Margin parameters; `plain` is CosFace / no angular margin (m1 == 1 and m2 == 0).
struct MarginParams {
  double s, m1, m2, m3, filter_threshold;
  bool plain() const { return m1 == 1.0 && m2 == 0.0; }
};

// f(t) for a clamped target cosine t.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t margin_value(acc_t t, acc_t m1, acc_t m2, acc_t m3, bool plain) {
  if (plain) return t - m3;
  const acc_t angle = m1 * m_acos(t) + m2;
  if (angle <= acc_t(3.14159265358979323846)) return m_cos(angle) - m3;
  return t - m3 - m2 * m_sin(m2);
}

// df/dt for a clamped target cosine t.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t margin_derivative(acc_t t, acc_t m1, acc_t m2, bool plain) {
  if (plain) return acc_t(1);
  const acc_t angle = m1 * m_acos(t) + m2;
  if (angle > acc_t(3.14159265358979323846)) return acc_t(1);
  acc_t sin2 = acc_t(1) - t * t;
  if (sin2 < acc_t(1e-12)) sin2 = acc_t(1e-12);
  return m1 * m_sin(angle) / m_sqrt(sin2);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t clamp_cos(acc_t v) {
  return v < acc_t(-1) ? acc_t(-1) : (v > acc_t(1) ? acc_t(1) : v);
}

// Clamp to [lo, hi] (NaN stays NaN).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clamp_to(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// AdaFace's target: f(t) = cos(clip(m1 * acos(t) + m2, alo, ahi)) - m3 for a clamped target cosine t, with
// [alo, ahi] = [eps, pi - eps].
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clipped_margin_value(acc_t t, acc_t m1, acc_t m2, acc_t m3, acc_t alo, acc_t ahi) {
  return m_cos(clamp_to(m1 * m_acos(t) + m2, alo, ahi)) - m3;
}

// Its derivative: m1 * sin(angle) / sin(theta) inside the clip, 0 where the clip holds the angle.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clipped_margin_derivative(acc_t t, acc_t m1, acc_t m2, acc_t alo, acc_t ahi) {
  const acc_t angle = m1 * m_acos(t) + m2;
  if (angle < alo || angle > ahi) return acc_t(0);
  acc_t sin2 = acc_t(1) - t * t;
  if (sin2 < acc_t(1e-12)) sin2 = acc_t(1e-12);
  return m1 * m_sin(angle) / m_sqrt(sin2);
}

// One sample's margin in the adaptive ops: angular m2 and additive m3, the cosine clamp [lo, hi] (with
// clip: [-1 + eps, 1 - eps] and the target angle clipped to [alo, ahi] = [eps, pi - eps]), and the
// CurricularFace re-weighting: a non-target entry whose stored value l = s * c has c > thr gets the logit
// l * (hard_t + c).
template <typename acc_t>
struct AdaptiveRow {
  acc_t m1, m2, m3, lo, hi, alo, ahi, s, thr, hard_t;
  bool clip, hard;

  C10_HOST_DEVICE acc_t target_value(acc_t t) const {
    if (clip) return clipped_margin_value(t, m1, m2, m3, alo, ahi);
    return margin_value(t, m1, m2, m3, m1 == acc_t(1) && m2 == acc_t(0));
  }
  // df/dt; 0 when the cosine sits on the clamp (a clamp passes no gradient there).
  C10_HOST_DEVICE acc_t target_derivative(acc_t t) const {
    if (clip) return (t <= lo || t >= hi) ? acc_t(0) : clipped_margin_derivative(t, m1, m2, alo, ahi);
    return margin_derivative(t, m1, m2, m1 == acc_t(1) && m2 == acc_t(0));
  }
  C10_HOST_DEVICE bool is_hard(acc_t stored) const { return hard && stored / s > thr; }
  // The logit of a non-target entry from its stored value s * c.
  C10_HOST_DEVICE acc_t negative_logit(acc_t stored) const {
    return is_hard(stored) ? stored * (hard_t + stored / s) : stored;
  }
  // d(logit) / d(c) / s of a non-target entry.
  C10_HOST_DEVICE acc_t negative_slope(acc_t stored) const {
    return is_hard(stored) ? hard_t + acc_t(2) * (stored / s) : acc_t(1);
  }
};

// The adaptive ops' arguments: scalars (bounds formed in double on the host, as the references form them)
// and the optional per-sample vectors (nullptr when absent), in the accumulation dtype.
template <typename acc_t>
struct AdaptiveInputs {
  const acc_t *sample_m2, *sample_m3, *hard_threshold;
  acc_t s, m1, m2, m3, lo, hi, alo, ahi, hard_t;
  bool clip;

  C10_HOST_DEVICE AdaptiveRow<acc_t> row(int64_t r) const {
    AdaptiveRow<acc_t> a;
    a.m1 = m1;
    a.m2 = sample_m2 ? m2 + sample_m2[r] : m2;
    a.m3 = sample_m3 ? m3 + sample_m3[r] : m3;
    a.lo = lo;
    a.hi = hi;
    a.alo = alo;
    a.ahi = ahi;
    a.s = s;
    a.thr = hard_threshold ? hard_threshold[r] : acc_t(0);
    a.hard_t = hard_t;
    a.clip = clip;
    a.hard = hard_threshold != nullptr;
    return a;
  }
};

// Host side: checks the adaptive ops' optional per-sample tensors and scalars, and returns each tensor as
// a contiguous vector in the accumulation dtype (an undefined tensor when absent).
inline at::Tensor adaptive_vector(const c10::optional<at::Tensor>& t, const at::Tensor& logits, const char* name,
                                  const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const int64_t rows = logits.size(0);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, op, ": ", name, " must be [", rows, "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble || t->scalar_type() == at::kHalf ||
                  t->scalar_type() == at::kBFloat16,
              op, ": ", name, " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == logits.device(), op, ": ", name, " is on ", t->device(), ", logits on ",
              logits.device());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t->to(acc).contiguous();
}

template <typename acc_t>
AdaptiveInputs<acc_t> adaptive_inputs(const at::Tensor& sample_m2, const at::Tensor& sample_m3,
                                      const at::Tensor& hard_threshold, double s, double m1, double m2, double m3,
                                      double clip_eps, double hard_t, const char* op) {
  TORCH_CHECK(clip_eps >= 0 && clip_eps < 0.5, op, ": clip_eps must be in [0, 0.5), got ", clip_eps);
  TORCH_CHECK(std::isfinite(hard_t), op, ": hard_t must be finite, got ", hard_t);
  const double pi = 3.14159265358979323846;
  AdaptiveInputs<acc_t> in;
  in.sample_m2 = sample_m2.defined() ? sample_m2.const_data_ptr<acc_t>() : nullptr;
  in.sample_m3 = sample_m3.defined() ? sample_m3.const_data_ptr<acc_t>() : nullptr;
  in.hard_threshold = hard_threshold.defined() ? hard_threshold.const_data_ptr<acc_t>() : nullptr;
  in.s = static_cast<acc_t>(s);
  in.m1 = static_cast<acc_t>(m1);
  in.m2 = static_cast<acc_t>(m2);
  in.m3 = static_cast<acc_t>(m3);
  in.lo = static_cast<acc_t>(-1.0 + clip_eps);
  in.hi = static_cast<acc_t>(1.0 - clip_eps);
  in.alo = static_cast<acc_t>(clip_eps);
  in.ahi = static_cast<acc_t>(pi - clip_eps);
  in.hard_t = static_cast<acc_t>(hard_t);
  in.clip = clip_eps > 0;
  return in;
}

}  // namespace partialfc
