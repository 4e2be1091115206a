// Stochastic rounding of the sparse updates' float32 results to a bfloat16 / float16 table (host and device).
//
// A value x between two neighbours lo < x < hi of the storage dtype is stored as hi with probability
// (x - lo) / (hi - lo), so the expected stored value is x: updates far smaller than half an ulp still move
// the weights on average, where round-to-nearest would drop every one of them. The random bits come from a
// counter-based hash of (seed, step, global class id, column, stream), not from a generator's state, so a
// run is reproducible and a class gets the same rounding whatever the world size (its global id does not
// depend on the sharding). partialfc/ops/reference.py implements the same hash and rounding in PyTorch
// (`stochastic_round_ref`), and the kernels agree with it bit for bit.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace partialfc {

// The rounded tensor of an update, so that weight and state draw independent bits for one element.
enum RoundingStream : uint32_t { kRoundWeight = 0, kRoundMomentum = 1, kRoundExpAvgSq = 2 };

// Chris Wellons' lowbias32: a bijective 32-bit finalizer with low bias.
C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The hash of (seed, step, class id): one per sampled row.
C10_HOST_DEVICE inline uint32_t rounding_row_key(uint64_t seed, uint64_t step, uint64_t cls) {
  uint32_t k = mix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9u);
  k = mix32(k ^ static_cast<uint32_t>(seed >> 32));
  k = mix32(k ^ static_cast<uint32_t>(step));
  k = mix32(k ^ static_cast<uint32_t>(cls));
  return mix32(k ^ static_cast<uint32_t>(cls >> 32));
}

// The 32 random bits of one element of a row.
C10_HOST_DEVICE inline uint32_t rounding_bits(uint32_t row_key, int64_t col, uint32_t stream) {
  return mix32(row_key ^ static_cast<uint32_t>(col * 4 + stream));
}

C10_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

C10_HOST_DEVICE inline float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// bfloat16 keeps the top 16 bits of a float32: adding 16 random bits to the magnitude below them carries into
// the kept part with probability (dropped part) / 2^16. Infinities stay, NaNs stay NaN, the largest finite
// values may round up to infinity (as any rounding up would).
C10_HOST_DEVICE inline c10::BFloat16 stochastic_bf16(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) >= 0x7f800000u) return c10::BFloat16(x);  // inf, NaN
  const uint32_t rounded = (u + (bits & 0xffffu)) & 0xffff0000u;
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// stochastic_bf16 as raw bits and without branches, for lane-parallel loops: the same result bit for bit.
// c10::BFloat16(NaN) is the quiet NaN 0x7fc0; an infinity needs no case of its own, since its low 16 bits are
// zero and adding fewer than 2^16 to them cannot carry: it keeps its bits.
C10_HOST_DEVICE inline uint16_t stochastic_bf16_bits(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint16_t rounded = static_cast<uint16_t>((u + (bits & 0xffffu)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0) : rounded;
}

// float16: in its normal range (|x| >= 2^-14) it keeps 10 of float32's 23 mantissa bits, the same carry trick
// over the 13 dropped bits; below, its subnormals are multiples of 2^-24: |x| * 2^24 is split exactly into
// integer and fraction and rounded up when 24 random bits, as a fraction, fall below the fraction. Every
// step is exact in float32, so the result does not depend on how a compiler orders it.
C10_HOST_DEVICE inline c10::Half stochastic_half(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag >= 0x7f800000u) return c10::Half(x);  // inf, NaN
  if (mag >= 0x38800000u) {
    // The truncated float32 is a float16 value (or 2^16, which converts to infinity).
    return c10::Half(bits_float(((mag + (bits & 0x1fffu)) & ~0x1fffu) | (u & 0x80000000u)));
  }
  const float scaled = bits_float(mag) * 16777216.0f;  // [0, 1024): exact
  const float whole = std::floor(scaled);
  const float frac = scaled - whole;  // exact
  const float draw = static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);  // [0, 1) in steps of 2^-24
  const float q = draw < frac ? whole + 1.0f : whole;
  return c10::Half(bits_float(float_bits(q * (1.0f / 16777216.0f)) | (u & 0x80000000u)));
}

// How one sampled row writes its low-precision results: stochastically (`stochastic`, with the row's key) or
// to nearest. Float32 and float64 tables are written as they are.
struct RowRounding {
  bool stochastic;
  uint32_t key;

  C10_HOST_DEVICE RowRounding(bool stochastic_, uint64_t seed, uint64_t step, int64_t cls)
      : stochastic(stochastic_), key(stochastic_ ? rounding_row_key(seed, step, static_cast<uint64_t>(cls)) : 0u) {}

  template <typename T, typename acc_t>
  C10_HOST_DEVICE T round(acc_t x, int64_t col, uint32_t stream) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (stochastic) return stochastic_bf16(static_cast<float>(x), rounding_bits(key, col, stream));
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      if (stochastic) return stochastic_half(static_cast<float>(x), rounding_bits(key, col, stream));
    }
    return static_cast<T>(x);
  }
};

// The rounding arguments of an update op (`rounding_seed`, `rounding_step`, `class_start`): stochastic when a
// seed is given; the global class id of local row r is class_start + r.
struct Rounding {
  bool stochastic;
  uint64_t seed, step;
  int64_t class_start;
};

inline Rounding make_rounding(std::optional<int64_t> seed, int64_t step, int64_t class_start, const char* op) {
  TORCH_CHECK(step >= 0, op, ": rounding_step must be >= 0, got ", step);
  TORCH_CHECK(class_start >= 0, op, ": class_start must be >= 0, got ", class_start);
  return {seed.has_value(), static_cast<uint64_t>(seed.value_or(0)), static_cast<uint64_t>(step), class_start};
}

}  // namespace partialfc
