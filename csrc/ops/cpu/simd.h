// Helpers shared by the CPU kernels: run-time choice of the AVX2/FMA code paths, and prefetching of the
// scattered table rows that the gathers and updates touch.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Hot float32 row loops are compiled twice, AVX2/FMA and the baseline x86-64 build (4-lane SSE2 only); the
// loader picks one at start-up.
#define PARTIALFC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PARTIALFC_CLONES
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
// The bfloat16 row loops also get an AVX-512 (x86-64-v4) build: 16-lane 32-bit multiplies for the rounding hash,
// unsigned compares and the 32-to-16-bit narrowing are single instructions there (the stochastically rounded SGD
// update of 200K rows on 2 threads: 166 ms with AVX2, 81 ms with AVX-512). The float32 loops are bound by memory
// and keep their two builds, so their results stay what they were.
#define PARTIALFC_CLONES_AVX512 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PARTIALFC_CLONES_AVX512 PARTIALFC_CLONES
#endif

namespace partialfc {

// Whether this CPU runs the AVX2/FMA variants written with explicit target attributes.
inline bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// Whether this CPU runs the kernels' explicit AVX-512 builds (the class-major margin sweeps, the bf16 gather's
// streaming stores), unless the environment asks for their AVX2 builds with PARTIALFC_CPU_AVX512=0 (the tests
// that compare the two builds do). The target_clones builds above are picked by the loader and ignore it.
inline bool cpu_has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool yes = [] {
    const char* env = std::getenv("PARTIALFC_CPU_AVX512");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2_fma();
  }();
  return yes;
#else
  return false;
#endif
}

// Rows ahead that the row loops prefetch. Sampled rows are scattered over the table, a page each, and the
// hardware prefetcher does not cross pages.
constexpr int64_t kPrefetchRows = 4;

// Prefetch every 64-byte line of a row of `dim` elements: a row the loop reads once with the non-temporal hint
// (prefetchnta: it should not evict the step's buffers), a row it reads again or stores to (`reused`) into all
// cache levels (prefetcht0). Not `__builtin_prefetch(p, 1, 0)` for the latter: without PREFETCHW in the baseline
// x86-64 build it becomes prefetchnta as well, and that made the bfloat16 update of 200K scattered rows of a 2M
// table on huge pages 20% slower (93 against 77 ms; prefetching the gradient rows too: 74 ms); for the gather
// prefetchnta is the faster (30 against 33 ms).
template <bool reused, typename T>
inline void prefetch_row(const T* row, int64_t dim) {
#if defined(__GNUC__)
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, reused ? 3 : 0);
#endif
}

// The float32 value of a bfloat16 given as its bits (exact: bfloat16 is float32's upper half). In lane-parallel
// loops over raw bits this is a shift, where c10::BFloat16's conversion does not vectorize as well.
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

}  // namespace partialfc
