// Helpers shared by the CPU kernels: run-time choice of the AVX2/FMA code paths, and prefetching of the
// scattered table rows that the gathers and updates touch.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Hot float32 row loops are compiled twice, AVX2/FMA and the baseline x86-64 build (4-lane SSE2 only); the
// loader picks one at start-up.
#define PARTIALFC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PARTIALFC_CLONES
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

// Rows ahead that the row loops prefetch. Sampled rows are scattered over the table, a page each, and the
// hardware prefetcher does not cross pages.
constexpr int64_t kPrefetchRows = 4;

// Prefetch every 64-byte line of a row of `dim` elements; `for_write` when the loop will store to it.
template <bool for_write, typename T>
inline void prefetch_row(const T* row, int64_t dim) {
#if defined(__GNUC__)
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, for_write, 0);
#endif
}

}  // namespace partialfc
