// CUDA margin-softmax forward and backward, in place on the logits (float32, float64, bfloat16 or float16;
// arithmetic and statistics in float32, float64 for float64). Forward: for short rows one block per row
// (transform + max, then sum-exp); for long rows each row split over blocks of one chunk each, swept once with
// 16-byte loads and an online (max, sum-exp), then a small pass combining the chunks. Backward: rows on grid.y,
// each thread one 16-byte vector of its row when the rows are contiguous and 16-byte aligned, else one logit;
// with grad_absmax, each block folds the largest |gradient| it stored into it with one atomicMax.
// store_logits=false / from_cosines=true: the forward only reads the cosines, and the backward derives each
// stored logit from its cosine with the forward's own transform (bit for bit what the forward would have
// stored), which saves one write of the [B, S] logits per step.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "../checks.h"
#include "../margin.h"
#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kRowThreads = 512;
constexpr int kLogitThreads = 256;

__device__ __forceinline__ float m_exp(float x) { return __expf(x); }
__device__ __forceinline__ double m_exp(double x) { return ::exp(x); }

// Half-precision logits (bfloat16, float16): the target's logit enters the statistics unrounded (float32)
// and the backward recomputes it from the target cosine, because at s = 64 a bfloat16 logit is off by up to
// 0.125, which would move every probability of the row by up to 13%. float32 / float64: the stored value.
template <typename scalar_t>
constexpr bool half_precision() {
  return !std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>;
}

// Calls f with std::true_type or std::false_type: a runtime flag as a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// STORE: the logits are written back; otherwise the second sweep derives them from the cosines again.
template <typename scalar_t, typename acc_t, bool STORE>
__global__ void forward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs,
                               int64_t cs, acc_t s, acc_t m1, acc_t m2, acc_t m3, acc_t thr, bool plain, bool filter,
                               acc_t* __restrict__ row_max, acc_t* __restrict__ sum_exp,
                               acc_t* __restrict__ target_logit, acc_t* __restrict__ target_cos) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  scalar_t* row = logits + r * rs;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const bool filter_row = filter;  // every row: also those whose target lives on another rank
  // A non-target entry's stored logit from its clamped cosine (inter-class filtering drops the close ones).
  auto negative = [&](acc_t v) { return static_cast<scalar_t>((filter_row && v > thr ? acc_t(0) : v) * s); };
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  acc_t tl = 0, tc = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t v = clamp_cos(static_cast<acc_t>(row[j * cs]));
    scalar_t stored;
    acc_t sv;
    if (j == t) {
      tc = v;
      tl = sv = margin_value(v, m1, m2, m3, plain) * s;  // unrounded (see half_precision)
      stored = static_cast<scalar_t>(tl);
    } else {
      stored = negative(v);
      sv = static_cast<acc_t>(stored);
    }
    if constexpr (STORE) row[j * cs] = stored;
    mx = sv > mx || sv != sv ? sv : mx;
  }
  mx = cuda::block_max(mx, scratch, -std::numeric_limits<acc_t>::infinity());
  // Each thread re-reads only the elements it wrote itself (and holds its target's logit): no barrier needed
  // before the second sweep.
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    acc_t l = tl;
    if (j != t) {
      const scalar_t x = row[j * cs];
      l = static_cast<acc_t>(STORE ? x : negative(clamp_cos(static_cast<acc_t>(x))));
    }
    sum += m_exp(l - mx);
  }
  sum = cuda::block_sum(sum, scratch);
  // The thread that owned the target column reports it.
  if (t >= 0 && threadIdx.x == t % blockDim.x) {
    target_logit[r] = tl;
    target_cos[r] = tc;
  }
  if (threadIdx.x == 0) {
    row_max[r] = mx;
    sum_exp[r] = sum;
    if (t < 0) {
      target_logit[r] = acc_t(0);
      target_cos[r] = acc_t(0);
    }
  }
}

// Adaptive margins (AdaFace, CurricularFace): the same sweeps with each row's margin from AdaptiveInputs; a
// re-weighted negative's logit is derived from its stored value in each sweep.
template <typename scalar_t, typename acc_t, bool STORE>
__global__ void adaptive_forward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs,
                                        int64_t cs, AdaptiveInputs<acc_t> in, acc_t thr, bool filter,
                                        acc_t* __restrict__ row_max, acc_t* __restrict__ sum_exp,
                                        acc_t* __restrict__ target_logit, acc_t* __restrict__ target_cos) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  scalar_t* row = logits + r * rs;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const AdaptiveRow<acc_t> a = in.row(r);
  const bool filter_row = filter;  // every row: also those whose target lives on another rank
  // A non-target entry's stored value from its raw cosine, as forward_kernel's `negative`.
  auto negative = [&](acc_t raw) {
    const acc_t v = clamp_to(raw, a.lo, a.hi);
    return static_cast<scalar_t>((filter_row && v > thr ? acc_t(0) : v) * a.s);
  };
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  acc_t tl = 0, tc = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t raw = static_cast<acc_t>(row[j * cs]);
    acc_t logit;
    if (j == t) {
      tc = clamp_to(raw, a.lo, a.hi);
      logit = tl = a.target_value(tc) * a.s;  // unrounded (see half_precision)
      if constexpr (STORE) row[j * cs] = static_cast<scalar_t>(tl);
    } else {
      const scalar_t stored = negative(raw);
      if constexpr (STORE) row[j * cs] = stored;
      logit = static_cast<acc_t>(stored);
      if (a.hard) logit = static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(logit)));
    }
    mx = logit > mx || logit != logit ? logit : mx;
  }
  mx = cuda::block_max(mx, scratch, -std::numeric_limits<acc_t>::infinity());
  // Each thread re-reads only the elements it wrote itself: no barrier needed before the second sweep.
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    acc_t l = tl;
    if (j != t) {
      const scalar_t x = row[j * cs];
      l = static_cast<acc_t>(STORE ? x : negative(static_cast<acc_t>(x)));
      if (a.hard) l = static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(l)));
    }
    sum += m_exp(l - mx);
  }
  sum = cuda::block_sum(sum, scratch);
  if (t >= 0 && threadIdx.x == t % blockDim.x) {
    target_logit[r] = tl;
    target_cos[r] = tc;
  }
  if (threadIdx.x == 0) {
    row_max[r] = mx;
    sum_exp[r] = sum;
    if (t < 0) {
      target_logit[r] = acc_t(0);
      target_cos[r] = acc_t(0);
    }
  }
}

// ---- Long rows: each row split over blocks, swept once ----
// A row of S logits is cut into chunks of kChunkVectors 16-byte vectors per thread; block (r, c) transforms
// chunk c of row r in place (16-byte loads and stores when the row allows) and keeps an online max and
// sum-exp of its logits in registers; a second, small kernel combines each row's chunks. The logits are read
// and written once (the one-block-per-row kernel reads them twice and makes one block stream a whole row).

constexpr int kSplitThreads = 256;
constexpr int kChunkVectors = 4;
constexpr int64_t kSplitMinCols = 8192;  // shorter rows: one block per row
constexpr int kCombineWarps = 4;

// A VEC-element vector of logits, for one 16-byte load and store.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// max with the NaN rule (a NaN is the max), as warp_max and the CPU kernels have it.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t m, acc_t v) {
  return (v > m || v != v) ? v : m;
}

// Adds logit l to a (max, sum-exp relative to max) pair.
template <typename acc_t>
__device__ __forceinline__ void online_add(acc_t& mx, acc_t& sum, acc_t l) {
  if (l > mx) {
    sum = sum * m_exp(mx - l) + acc_t(1);
    mx = l;
  } else if (l != l) {
    mx = sum = l;
  } else {
    sum += m_exp(l - mx);
  }
}

// Merges the pair (om, os) into (mx, sum); an empty pair is (-inf, 0), a NaN max makes the sum NaN.
template <typename acc_t>
__device__ __forceinline__ void online_merge(acc_t& mx, acc_t& sum, acc_t om, acc_t os) {
  const acc_t m = nan_max(mx, om);
  sum = (mx == m ? sum : sum * m_exp(mx - m)) + (om == m ? os : os * m_exp(om - m));
  mx = m;
}

template <typename acc_t>
__device__ __forceinline__ void warp_merge(acc_t& mx, acc_t& sum) {
#pragma unroll
  for (int offset = cuda::kWarp / 2; offset > 0; offset >>= 1) {
    const acc_t om = __shfl_xor_sync(0xffffffffu, mx, offset), os = __shfl_xor_sync(0xffffffffu, sum, offset);
    online_merge(mx, sum, om, os);
  }
}

// One row's element transform for the fixed margins: the clamped cosine, and the stored value with the logit
// it enters the softmax with (the stored value read back).
template <typename scalar_t, typename acc_t>
struct FixedRowOp {
  acc_t s, m1, m2, m3, thr;
  bool plain, filter_row;
  int64_t t;
  __device__ acc_t cos(acc_t raw) const { return clamp_cos(raw); }
  __device__ scalar_t store(int64_t j, acc_t c, acc_t& logit) const {
    if (j == t) {
      logit = margin_value(c, m1, m2, m3, plain) * s;  // unrounded (see half_precision)
      return static_cast<scalar_t>(logit);
    }
    const scalar_t stored = static_cast<scalar_t>((filter_row && c > thr ? acc_t(0) : c) * s);
    logit = static_cast<acc_t>(stored);
    return stored;
  }
};

template <typename scalar_t, typename acc_t>
struct FixedMargin {
  acc_t s, m1, m2, m3, thr;
  bool plain, filter;
  __device__ FixedRowOp<scalar_t, acc_t> row(int64_t, int64_t t) const {
    return {s, m1, m2, m3, thr, plain, filter, t};
  }
};

// The adaptive margins' transform: per-sample margin, optional clip, re-weighted hard negatives.
template <typename scalar_t, typename acc_t>
struct AdaptiveRowOp {
  AdaptiveRow<acc_t> a;
  acc_t thr;
  bool filter_row;
  int64_t t;
  __device__ acc_t cos(acc_t raw) const { return clamp_to(raw, a.lo, a.hi); }
  __device__ scalar_t store(int64_t j, acc_t c, acc_t& logit) const {
    if (j == t) {
      logit = a.target_value(c) * a.s;  // unrounded (see half_precision)
      return static_cast<scalar_t>(logit);
    }
    const scalar_t stored = static_cast<scalar_t>((filter_row && c > thr ? acc_t(0) : c) * a.s);
    logit = static_cast<acc_t>(stored);
    if (a.hard) logit = static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(logit)));
    return stored;
  }
};

template <typename scalar_t, typename acc_t>
struct AdaptiveMargin {
  AdaptiveInputs<acc_t> in;
  acc_t thr;
  bool filter;
  __device__ AdaptiveRowOp<scalar_t, acc_t> row(int64_t r, int64_t t) const {
    return {in.row(r), thr, filter, t};
  }
};

// Block (r = blockIdx.x, c = blockIdx.y): chunk c of row r. VEC > 1: rows contiguous and 16-byte aligned
// (checked on the host), VEC elements per load; VEC == 1: any strides. STORE: the logits are written back.
template <typename scalar_t, typename acc_t, int VEC, typename Margin, bool STORE>
__global__ void __launch_bounds__(kSplitThreads)
    forward_chunk_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs, int64_t cs,
                         int64_t chunk, Margin margin, acc_t* __restrict__ partial_max,
                         acc_t* __restrict__ partial_sum, acc_t* __restrict__ target_logit,
                         acc_t* __restrict__ target_cos) {
  __shared__ acc_t scratch_max[32], scratch_sum[32];
  const int64_t r = blockIdx.x, c = blockIdx.y;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const auto op = margin.row(r, t);
  scalar_t* row = logits + r * rs;
  const int64_t j0 = c * chunk, j1 = j0 + chunk < cols ? j0 + chunk : cols;
  acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  auto visit = [&](int64_t j, scalar_t& x) {
    const acc_t cval = op.cos(static_cast<acc_t>(x));
    acc_t logit;
    const scalar_t stored = op.store(j, cval, logit);
    if constexpr (STORE) x = stored;
    if (j == t) {
      target_cos[r] = cval;
      target_logit[r] = logit;
    }
    online_add(mx, sum, logit);
  };
  if constexpr (VEC > 1) {
    for (int64_t j = j0 + static_cast<int64_t>(threadIdx.x) * VEC; j < j1; j += kSplitThreads * VEC) {
      if (j + VEC <= j1) {
        Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) visit(j + k, p.v[k]);
        if constexpr (STORE) *reinterpret_cast<Pack<scalar_t, VEC>*>(row + j) = p;
      } else {
        for (int64_t k = j; k < j1; ++k) visit(k, row[k]);
      }
    }
  } else {
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kSplitThreads) visit(j, row[j * cs]);
  }
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  warp_merge(mx, sum);
  if (lane == 0) {
    scratch_max[warp] = mx;
    scratch_sum[warp] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int warps = kSplitThreads / cuda::kWarp;
    mx = lane < warps ? scratch_max[lane] : -std::numeric_limits<acc_t>::infinity();
    sum = lane < warps ? scratch_sum[lane] : acc_t(0);
    warp_merge(mx, sum);
    if (lane == 0) {
      partial_max[r * gridDim.y + c] = mx;
      partial_sum[r * gridDim.y + c] = sum;
    }
  }
}

// One warp per row: the row's chunk pairs merged into its (max, sum-exp); rows without a local target get
// target logit and cosine 0 (the chunk holding a target wrote its own).
template <typename acc_t>
__global__ void combine_chunks_kernel(const acc_t* __restrict__ partial_max, const acc_t* __restrict__ partial_sum,
                                      const int64_t* __restrict__ labels, int64_t rows, int64_t chunks,
                                      acc_t* __restrict__ row_max, acc_t* __restrict__ sum_exp,
                                      acc_t* __restrict__ target_logit, acc_t* __restrict__ target_cos) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / cuda::kWarp;
  const int lane = threadIdx.x % cuda::kWarp;
  if (r >= rows) return;  // a whole warp leaves together
  acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  for (int64_t c = lane; c < chunks; c += cuda::kWarp) online_merge(mx, sum, partial_max[r * chunks + c],
                                                                     partial_sum[r * chunks + c]);
  warp_merge(mx, sum);
  if (lane == 0) {
    row_max[r] = mx;
    sum_exp[r] = sum;
    if (labels[r] < 0) {
      target_logit[r] = acc_t(0);
      target_cos[r] = acc_t(0);
    }
  }
}

// ---- Backward: the gradient in place, rows on grid.y ----

// One row's gradient for the fixed margins: op(j, l) is the gradient of column j whose stored logit is l.
template <typename scalar_t, typename acc_t>
struct FixedGradRow {
  acc_t shift, denom, tc, s, m1, m2, m3, scale;
  bool plain, filter;
  int64_t t;
  __device__ __forceinline__ acc_t operator()(int64_t j, acc_t l) const {
    acc_t lt = l;  // the target's logit as the forward's statistics took it (see half_precision)
    if constexpr (half_precision<scalar_t>()) {
      if (j == t) lt = margin_value(tc, m1, m2, m3, plain) * s;
    }
    const acc_t prob = m_exp(lt - shift) / denom;
    if (j == t) return (prob - acc_t(1)) * margin_derivative(tc, m1, m2, plain) * scale;
    if (filter && l == acc_t(0)) return acc_t(0);  // a dropped (filtered) logit gets no gradient
    return prob * scale;
  }
};

template <typename scalar_t, typename acc_t>
struct FixedGrad {
  acc_t s, m1, m2, m3, scale;
  bool plain, filter;
  __device__ FixedGradRow<scalar_t, acc_t> row(int64_t, int64_t t, acc_t shift, acc_t denom, acc_t tc) const {
    return {shift, denom, tc, s, m1, m2, m3, scale, plain, filter, t};
  }
};

// Adaptive margins (AdaFace, CurricularFace): each row's margin from AdaptiveInputs; a re-weighted negative's
// logit is derived from its stored value.
template <typename scalar_t, typename acc_t>
struct AdaptiveGradRow {
  AdaptiveRow<acc_t> a;
  acc_t shift, denom, tc, scale;
  bool filter;
  int64_t t;
  __device__ __forceinline__ acc_t operator()(int64_t j, acc_t l) const {
    if (j == t) {
      acc_t lt = l;  // the target's logit as the forward's statistics took it (see half_precision)
      if constexpr (half_precision<scalar_t>()) lt = a.target_value(tc) * a.s;
      return (m_exp(lt - shift) / denom - acc_t(1)) * a.target_derivative(tc) * scale;
    }
    if (filter && l == acc_t(0)) return acc_t(0);  // a dropped (filtered) logit gets no gradient
    if (a.clip && (l <= static_cast<acc_t>(static_cast<scalar_t>(a.lo * a.s)) ||
                   l >= static_cast<acc_t>(static_cast<scalar_t>(a.hi * a.s))))
      return acc_t(0);  // a clamped cosine gets no gradient
    const acc_t logit = a.hard ? static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(l))) : l;
    return m_exp(logit - shift) / denom * a.negative_slope(l) * scale;
  }
};

template <typename scalar_t, typename acc_t>
struct AdaptiveGrad {
  AdaptiveInputs<acc_t> in;
  acc_t scale;
  bool filter;
  __device__ AdaptiveGradRow<scalar_t, acc_t> row(int64_t r, int64_t t, acc_t shift, acc_t denom, acc_t tc) const {
    return {in.row(r), shift, denom, tc, scale, filter, t};
  }
};

// Max over the warp with shuffles: __reduce_max_sync needs sm_80, and the build also targets sm_75.
__device__ __forceinline__ uint32_t warp_max_bits(uint32_t v) {
#pragma unroll
  for (int offset = cuda::kWarp / 2; offset > 0; offset >>= 1) {
    const uint32_t o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Folds the block's largest abs_bits into *absmax with one atomicMax. An integer max on the bits is the
// grad_absmax order (finite < inf < NaN) because the entry value is non-negative or NaN. A block that stored
// only zeros cannot raise it and makes no atomic. Has a barrier: every thread of the block must call it.
__device__ __forceinline__ void block_absmax(uint32_t local, uint32_t* absmax) {
  constexpr int warps = kLogitThreads / cuda::kWarp;
  __shared__ uint32_t scratch[warps];
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  local = warp_max_bits(local);
  if (lane == 0) scratch[warp] = local;
  __syncthreads();
  if (warp == 0) {
    local = warp_max_bits(lane < warps ? scratch[lane] : 0u);
    if (lane == 0 && local != 0) atomicMax(reinterpret_cast<unsigned int*>(absmax), local);
  }
}

// Block (x, r = blockIdx.y): kLogitThreads * VEC consecutive logits of row r, VEC per thread. VEC > 1: rows
// contiguous and 16-byte aligned (checked on the host), one 16-byte load and store per thread, the row's last
// partial vector element by element; VEC == 1: any strides. absmax: grad_absmax's bits, or nullptr.
// FROM_COSINES: the logits hold the cosines, and `margin` (the forward's transform) gives each stored logit.
template <typename scalar_t, typename acc_t, int VEC, typename Grad, typename Margin, bool FROM_COSINES>
__global__ void __launch_bounds__(kLogitThreads)
    backward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs, int64_t cs,
                    const acc_t* __restrict__ gmax, const acc_t* __restrict__ gsum, const acc_t* __restrict__ tcos,
                    Grad grad, Margin margin, uint32_t* absmax) {
  const int64_t r = blockIdx.y;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const auto op = grad.row(r, t, gmax[r], gsum[r], tcos[r]);
  const auto forward = margin.row(r, t);
  scalar_t* row = logits + r * rs;
  const bool track = absmax != nullptr;  // uniform over the grid
  uint32_t local = 0;                    // the largest abs_bits of the gradients this thread stored
  auto visit = [&](int64_t j, scalar_t& x) {
    acc_t l = static_cast<acc_t>(x);
    if constexpr (FROM_COSINES) {
      acc_t logit;
      l = static_cast<acc_t>(forward.store(j, forward.cos(l), logit));
    }
    x = static_cast<scalar_t>(op(j, l));
    if (track) {
      const uint32_t b = abs_bits(static_cast<float>(x));  // as stored, rounded to the logits' dtype
      local = b > local ? b : local;
    }
  };
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kLogitThreads + threadIdx.x) * VEC;
  if constexpr (VEC > 1) {
    if (j + VEC <= cols) {
      Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) visit(j + k, p.v[k]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(row + j) = p;
    } else {
      for (int64_t k = j; k < cols; ++k) visit(k, row[k]);
    }
  } else if (j < cols) {
    visit(j, row[j * cs]);
  }
  // No thread has returned early, so all of them reach block_absmax's barrier.
  if (track) block_absmax(local, absmax);
}

// Launches the split forward: 16-byte loads when every row starts on a 16-byte boundary and is contiguous.
template <typename scalar_t, typename acc_t, bool STORE, typename Margin>
void launch_split_forward(at::Tensor& logits, const at::Tensor& lab, const Margin& margin, at::Tensor& row_max,
                          at::Tensor& sum_exp, at::Tensor& target_logit, at::Tensor& target_cos,
                          cudaStream_t stream) {
  constexpr int vec = 16 / sizeof(scalar_t);
  const int64_t rows = logits.size(0), cols = logits.size(1), rs = logits.stride(0), cs = logits.stride(1);
  const int64_t chunk = static_cast<int64_t>(kSplitThreads) * vec * kChunkVectors;
  const int64_t chunks = cuda::ceil_div(cols, chunk);
  TORCH_CHECK(chunks <= 65535 && rows <= std::numeric_limits<int32_t>::max(), "margin_softmax_forward: logits [",
              rows, ", ", cols, "] too large for one call on CUDA");
  const bool vectorized = cs == 1 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                          (rs * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
  at::Tensor partial = at::empty({2, rows, chunks}, row_max.options());  // [2, B, chunks]: max, sum-exp
  acc_t* pmax = partial.data_ptr<acc_t>();
  acc_t* psum = pmax + rows * chunks;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  if (vectorized) {
    forward_chunk_kernel<scalar_t, acc_t, vec, Margin, STORE><<<grid, kSplitThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, rs, cs, chunk, margin, pmax, psum,
        target_logit.data_ptr<acc_t>(), target_cos.data_ptr<acc_t>());
  } else {
    forward_chunk_kernel<scalar_t, acc_t, 1, Margin, STORE><<<grid, kSplitThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, rs, cs, chunk, margin, pmax, psum,
        target_logit.data_ptr<acc_t>(), target_cos.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_chunks_kernel<acc_t><<<static_cast<unsigned>(cuda::ceil_div(rows, kCombineWarps)),
                                 kCombineWarps * cuda::kWarp, 0, stream>>>(
      pmax, psum, lab.const_data_ptr<int64_t>(), rows, chunks, row_max.data_ptr<acc_t>(), sum_exp.data_ptr<acc_t>(),
      target_logit.data_ptr<acc_t>(), target_cos.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the backward: 16-byte vectors when every row starts on a 16-byte boundary and is contiguous.
// absmax: grad_absmax's bits, or nullptr. FROM_COSINES: see backward_kernel.
template <typename scalar_t, typename acc_t, bool FROM_COSINES, typename Grad, typename Margin>
void launch_backward(at::Tensor& logits, const at::Tensor& lab, const at::Tensor& gm, const at::Tensor& gs,
                     const at::Tensor& tc, const Grad& grad, const Margin& margin, uint32_t* absmax,
                     cudaStream_t stream) {
  constexpr int vec = 16 / sizeof(scalar_t);
  const int64_t rows = logits.size(0), cols = logits.size(1), rs = logits.stride(0), cs = logits.stride(1);
  const bool vectorized = cs == 1 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                          (rs * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
  const int64_t per_block = static_cast<int64_t>(kLogitThreads) * (vectorized ? vec : 1);
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(cols, per_block)), static_cast<unsigned>(rows));
  if (vectorized) {
    backward_kernel<scalar_t, acc_t, vec, Grad, Margin, FROM_COSINES><<<grid, kLogitThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, rs, cs, gm.const_data_ptr<acc_t>(),
        gs.const_data_ptr<acc_t>(), tc.const_data_ptr<acc_t>(), grad, margin, absmax);
  } else {
    backward_kernel<scalar_t, acc_t, 1, Grad, Margin, FROM_COSINES><<<grid, kLogitThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, rs, cs, gm.const_data_ptr<acc_t>(),
        gs.const_data_ptr<acc_t>(), tc.const_data_ptr<acc_t>(), grad, margin, absmax);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_absmax's float32 as the bits the kernels' atomicMax works on; nullptr when absent.
uint32_t* absmax_bits(const std::optional<at::Tensor>& grad_absmax) {
  return grad_absmax.has_value() ? reinterpret_cast<uint32_t*>(grad_absmax->data_ptr<float>()) : nullptr;
}

// The combined statistics come from a collective; on another device the kernel would read host or peer memory.
void check_same_device(const at::Tensor& logits, std::initializer_list<const at::Tensor*> tensors,
                       std::initializer_list<const char*> names, const char* op) {
  auto name = names.begin();
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == logits.device(), op, ": ", *name, " is on ", t->device(), ", logits on ",
                logits.device());
    ++name;
  }
}

// The dtype of the statistics, in and out: float32 for float32 and half-precision logits, float64 for float64.
at::ScalarType accumulation_type(at::ScalarType logits) { return logits == at::kDouble ? at::kDouble : at::kFloat; }

void check_logits(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [B, S], got ", logits.sizes());
  TORCH_CHECK(is_float_type(logits.scalar_type()), op, ": logits must be a floating tensor, got ", logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 [", logits.size(0), "], got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), ", logits on ",
              logits.device());
  // Checked on the host (one small sync) so a bad label raises the CPU kernels' error, never a device assert.
  cuda::check_range_cuda(labels, -1, logits.size(1), op, "labels");
}

template <typename scalar_t, typename acc_t>
FixedMargin<scalar_t, acc_t> fixed_margin(const MarginParams& mp) {
  return {static_cast<acc_t>(mp.s), static_cast<acc_t>(mp.m1), static_cast<acc_t>(mp.m2), static_cast<acc_t>(mp.m3),
          static_cast<acc_t>(mp.filter_threshold), mp.plain(), mp.filter_threshold > 0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_cuda(
    at::Tensor& logits, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double filter_threshold, bool store_logits) {
  check_logits(logits, labels, "margin_softmax_forward");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto opts = logits.options().dtype(accumulation_type(logits.scalar_type()));
  at::Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts);
  at::Tensor target_logit = at::empty({rows}, opts), target_cos = at::empty({rows}, opts);
  if (rows == 0) return {row_max, sum_exp, target_logit, target_cos};
  c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.contiguous();
  const MarginParams mp{s, m1, m2, m3, filter_threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_softmax_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(store_logits, [&](auto store) {
      constexpr bool kStore = decltype(store)::value;
      if (cols >= kSplitMinCols) {
        const auto margin = fixed_margin<scalar_t, acc_t>(mp);
        launch_split_forward<scalar_t, acc_t, kStore>(logits, lab, margin, row_max, sum_exp, target_logit, target_cos,
                                                      stream);
        return;
      }
      forward_kernel<scalar_t, acc_t, kStore><<<rows, kRowThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, logits.stride(0), logits.stride(1),
          static_cast<acc_t>(s), static_cast<acc_t>(m1), static_cast<acc_t>(m2), static_cast<acc_t>(m3),
          static_cast<acc_t>(filter_threshold), mp.plain(), filter_threshold > 0, row_max.data_ptr<acc_t>(),
          sum_exp.data_ptr<acc_t>(), target_logit.data_ptr<acc_t>(), target_cos.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {row_max, sum_exp, target_logit, target_cos};
}

void margin_softmax_backward_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& global_max,
                                  const at::Tensor& global_sum_exp, const at::Tensor& target_cos, double s, double m1,
                                  double m2, double m3, double grad_scale, double filter_threshold,
                                  const std::optional<at::Tensor>& grad_absmax, bool from_cosines) {
  const char* op = "margin_softmax_backward";
  check_logits(logits, labels, op);
  check_grad_absmax(grad_absmax, logits, op);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_vector(global_max, rows, "global_max", op);
  check_vector(global_sum_exp, rows, "global_sum_exp", op);
  check_vector(target_cos, rows, "target_cos", op);
  check_same_device(logits, {&global_max, &global_sum_exp, &target_cos}, {"global_max", "global_sum_exp", "target_cos"},
                    op);
  TORCH_CHECK(rows <= 65535, op, ": at most 65535 rows per call on CUDA, got ", rows);
  if (rows == 0 || cols == 0) return;
  c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = logits.scalar_type(), acc = accumulation_type(dtype);
  const at::Tensor gm = global_max.to(acc).contiguous(), gs = global_sum_exp.to(acc).contiguous();
  const at::Tensor tc = target_cos.to(acc).contiguous(), lab = labels.contiguous();
  const MarginParams mp{s, m1, m2, m3, filter_threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "margin_softmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FixedGrad<scalar_t, acc_t> grad{static_cast<acc_t>(s), static_cast<acc_t>(m1), static_cast<acc_t>(m2),
                                          static_cast<acc_t>(m3), static_cast<acc_t>(s * grad_scale), mp.plain(),
                                          filter_threshold > 0};
    with_flag(from_cosines, [&](auto from) {
      launch_backward<scalar_t, acc_t, decltype(from)::value>(logits, lab, gm, gs, tc, grad,
                                                              fixed_margin<scalar_t, acc_t>(mp),
                                                              absmax_bits(grad_absmax), stream);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_adaptive_cuda(
    at::Tensor& logits, const at::Tensor& labels, double s, double m1, double m2, double m3, double filter_threshold,
    const std::optional<at::Tensor>& sample_m2, const std::optional<at::Tensor>& sample_m3, double clip_eps,
    const std::optional<at::Tensor>& hard_threshold, double hard_t, bool store_logits) {
  const char* op = "margin_softmax_forward_adaptive";
  check_logits(logits, labels, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor sm2 = adaptive_vector(sample_m2, logits, "sample_m2", op);
  const at::Tensor sm3 = adaptive_vector(sample_m3, logits, "sample_m3", op);
  const at::Tensor hard = adaptive_vector(hard_threshold, logits, "hard_threshold", op);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto opts = logits.options().dtype(accumulation_type(logits.scalar_type()));
  at::Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts);
  at::Tensor target_logit = at::empty({rows}, opts), target_cos = at::empty({rows}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_softmax_forward_adaptive",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = adaptive_inputs<acc_t>(sm2, sm3, hard, s, m1, m2, m3, clip_eps, hard_t, op);
    if (rows == 0) return;
    with_flag(store_logits, [&](auto store) {
      constexpr bool kStore = decltype(store)::value;
      if (cols >= kSplitMinCols) {
        const AdaptiveMargin<scalar_t, acc_t> margin{in, static_cast<acc_t>(filter_threshold), filter_threshold > 0};
        launch_split_forward<scalar_t, acc_t, kStore>(logits, lab, margin, row_max, sum_exp, target_logit, target_cos,
                                                      stream);
        return;
      }
      adaptive_forward_kernel<scalar_t, acc_t, kStore><<<rows, kRowThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, logits.stride(0), logits.stride(1), in,
          static_cast<acc_t>(filter_threshold), filter_threshold > 0, row_max.data_ptr<acc_t>(),
          sum_exp.data_ptr<acc_t>(), target_logit.data_ptr<acc_t>(), target_cos.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {row_max, sum_exp, target_logit, target_cos};
}

void margin_softmax_backward_adaptive_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& global_max,
                                           const at::Tensor& global_sum_exp, const at::Tensor& target_cos, double s,
                                           double m1, double m2, double m3, double grad_scale, double filter_threshold,
                                           const std::optional<at::Tensor>& sample_m2,
                                           const std::optional<at::Tensor>& sample_m3, double clip_eps,
                                           const std::optional<at::Tensor>& hard_threshold, double hard_t,
                                           const std::optional<at::Tensor>& grad_absmax, bool from_cosines) {
  const char* op = "margin_softmax_backward_adaptive";
  check_logits(logits, labels, op);
  check_grad_absmax(grad_absmax, logits, op);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_vector(global_max, rows, "global_max", op);
  check_vector(global_sum_exp, rows, "global_sum_exp", op);
  check_vector(target_cos, rows, "target_cos", op);
  check_same_device(logits, {&global_max, &global_sum_exp, &target_cos}, {"global_max", "global_sum_exp", "target_cos"},
                    op);
  TORCH_CHECK(rows <= 65535, op, ": at most 65535 rows per call on CUDA, got ", rows);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor sm2 = adaptive_vector(sample_m2, logits, "sample_m2", op);
  const at::Tensor sm3 = adaptive_vector(sample_m3, logits, "sample_m3", op);
  const at::Tensor hard = adaptive_vector(hard_threshold, logits, "hard_threshold", op);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = logits.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "margin_softmax_backward_adaptive", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = adaptive_inputs<acc_t>(sm2, sm3, hard, s, m1, m2, m3, clip_eps, hard_t, op);
    if (rows == 0 || cols == 0) return;
    const auto acc = accumulation_type(dtype);
    const at::Tensor gm = global_max.to(acc).contiguous(), gs = global_sum_exp.to(acc).contiguous();
    const at::Tensor tc = target_cos.to(acc).contiguous(), lab = labels.contiguous();
    const AdaptiveGrad<scalar_t, acc_t> grad{in, static_cast<acc_t>(s * grad_scale), filter_threshold > 0};
    const AdaptiveMargin<scalar_t, acc_t> margin{in, static_cast<acc_t>(filter_threshold), filter_threshold > 0};
    with_flag(from_cosines, [&](auto from) {
      launch_backward<scalar_t, acc_t, decltype(from)::value>(logits, lab, gm, gs, tc, grad, margin,
                                                              absmax_bits(grad_absmax), stream);
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("margin_softmax_forward", &partialfc::margin_softmax_forward_cuda);
  m.impl("margin_softmax_backward", &partialfc::margin_softmax_backward_cuda);
  m.impl("margin_softmax_forward_adaptive", &partialfc::margin_softmax_forward_adaptive_cuda);
  m.impl("margin_softmax_backward_adaptive", &partialfc::margin_softmax_backward_adaptive_cuda);
}
