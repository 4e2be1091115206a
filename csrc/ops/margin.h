// The margin function shared by the CPU and CUDA kernels (see partialfc/ops.py for the definition):
//   f(t) = cos(m1 * acos(t) + m2) - m3      when m1 * acos(t) + m2 <= pi
//   f(t) = t - m3 - m2 * sin(m2)            otherwise
// and its exact derivative df/dt = m1 * sin(m1 * theta + m2) / sin(theta) (1 in the fallback branch).
#pragma once
#include <c10/macros/Macros.h>
#include <math.h>

namespace partialfc {

C10_HOST_DEVICE inline float m_acos(float x) { return ::acosf(x); }
C10_HOST_DEVICE inline double m_acos(double x) { return ::acos(x); }
C10_HOST_DEVICE inline float m_cos(float x) { return ::cosf(x); }
C10_HOST_DEVICE inline double m_cos(double x) { return ::cos(x); }
C10_HOST_DEVICE inline float m_sin(float x) { return ::sinf(x); }
C10_HOST_DEVICE inline double m_sin(double x) { return ::sin(x); }
C10_HOST_DEVICE inline float m_sqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double m_sqrt(double x) { return ::sqrt(x); }

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

}  // namespace partialfc
