// CUDA margin-softmax forward (one block per row: transform + max, then sum-exp over the row, in place)
// and backward (one thread per logit, rows on grid.y).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../margin.h"
#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kRowThreads = 512;
constexpr int kLogitThreads = 256;

__device__ __forceinline__ float m_exp(float x) { return __expf(x); }
__device__ __forceinline__ double m_exp(double x) { return ::exp(x); }

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs,
                               int64_t cs, acc_t s, acc_t m1, acc_t m2, acc_t m3, acc_t thr, bool plain, bool filter,
                               scalar_t* __restrict__ row_max, scalar_t* __restrict__ sum_exp,
                               scalar_t* __restrict__ target_logit, scalar_t* __restrict__ target_cos) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  scalar_t* row = logits + r * rs;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const bool filter_row = filter && t >= 0;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  acc_t tl = 0, tc = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    acc_t v = clamp_cos(static_cast<acc_t>(row[j * cs]));
    scalar_t stored;
    if (j == t) {
      tc = v;
      stored = static_cast<scalar_t>(margin_value(v, m1, m2, m3, plain) * s);
      tl = static_cast<acc_t>(stored);
    } else {
      if (filter_row && v > thr) v = 0;  // inter-class filtering
      stored = static_cast<scalar_t>(v * s);
    }
    row[j * cs] = stored;
    const acc_t sv = static_cast<acc_t>(stored);
    mx = sv > mx || sv != sv ? sv : mx;
  }
  mx = cuda::block_max(mx, scratch, -std::numeric_limits<acc_t>::infinity());
  // Each thread re-reads only the elements it wrote itself: no barrier needed before the second sweep.
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sum += m_exp(static_cast<acc_t>(row[j * cs]) - mx);
  sum = cuda::block_sum(sum, scratch);
  // The thread that owned the target column reports it.
  if (t >= 0 && threadIdx.x == t % blockDim.x) {
    target_logit[r] = static_cast<scalar_t>(tl);
    target_cos[r] = static_cast<scalar_t>(tc);
  }
  if (threadIdx.x == 0) {
    row_max[r] = static_cast<scalar_t>(mx);
    sum_exp[r] = static_cast<scalar_t>(sum);
    if (t < 0) {
      target_logit[r] = scalar_t(0);
      target_cos[r] = scalar_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs,
                                int64_t cs, const scalar_t* __restrict__ gmax, const scalar_t* __restrict__ gsum,
                                const scalar_t* __restrict__ tcos, acc_t m1, acc_t m2, acc_t scale, bool plain,
                                bool filter) {
  const int64_t r = blockIdx.y;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  scalar_t* p = logits + r * rs + j * cs;
  const acc_t l = static_cast<acc_t>(*p);
  const acc_t prob = m_exp(l - static_cast<acc_t>(gmax[r])) / static_cast<acc_t>(gsum[r]);
  acc_t g;
  if (j == t) {
    g = (prob - acc_t(1)) * margin_derivative(static_cast<acc_t>(tcos[r]), m1, m2, plain) * scale;
  } else if (filter && t >= 0 && l == acc_t(0)) {
    g = 0;  // a dropped (filtered) logit gets no gradient
  } else {
    g = prob * scale;
  }
  *p = static_cast<scalar_t>(g);
}

// Adaptive margins (AdaFace, CurricularFace): the same sweeps with each row's margin from AdaptiveInputs; a
// re-weighted negative's logit is derived from its stored value in each sweep.
template <typename scalar_t, typename acc_t>
__global__ void adaptive_forward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols, int64_t rs,
                                        int64_t cs, AdaptiveInputs<acc_t> in, acc_t thr, bool filter,
                                        scalar_t* __restrict__ row_max, scalar_t* __restrict__ sum_exp,
                                        scalar_t* __restrict__ target_logit, scalar_t* __restrict__ target_cos) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  scalar_t* row = logits + r * rs;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const AdaptiveRow<acc_t> a = in.row(r);
  const bool filter_row = filter && t >= 0;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  acc_t tl = 0, tc = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t v = clamp_to(static_cast<acc_t>(row[j * cs]), a.lo, a.hi);
    acc_t logit;
    if (j == t) {
      tc = v;
      const scalar_t stored = static_cast<scalar_t>(a.target_value(v) * a.s);
      row[j * cs] = stored;
      logit = tl = static_cast<acc_t>(stored);
    } else {
      const scalar_t stored = static_cast<scalar_t>((filter_row && v > thr ? acc_t(0) : v) * a.s);
      row[j * cs] = stored;
      logit = static_cast<acc_t>(stored);
      if (a.hard) logit = static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(logit)));
    }
    mx = logit > mx || logit != logit ? logit : mx;
  }
  mx = cuda::block_max(mx, scratch, -std::numeric_limits<acc_t>::infinity());
  // Each thread re-reads only the elements it wrote itself: no barrier needed before the second sweep.
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    acc_t l = static_cast<acc_t>(row[j * cs]);
    if (j != t && a.hard) l = static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(l)));
    sum += m_exp(l - mx);
  }
  sum = cuda::block_sum(sum, scratch);
  if (t >= 0 && threadIdx.x == t % blockDim.x) {
    target_logit[r] = static_cast<scalar_t>(tl);
    target_cos[r] = static_cast<scalar_t>(tc);
  }
  if (threadIdx.x == 0) {
    row_max[r] = static_cast<scalar_t>(mx);
    sum_exp[r] = static_cast<scalar_t>(sum);
    if (t < 0) {
      target_logit[r] = scalar_t(0);
      target_cos[r] = scalar_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void adaptive_backward_kernel(scalar_t* logits, const int64_t* __restrict__ labels, int64_t cols,
                                         int64_t rs, int64_t cs, const scalar_t* __restrict__ gmax,
                                         const scalar_t* __restrict__ gsum, const scalar_t* __restrict__ tcos,
                                         AdaptiveInputs<acc_t> in, acc_t scale, bool filter) {
  const int64_t r = blockIdx.y;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  const int64_t t = labels[r];
  // t in [-1, cols): checked on the host before the launch
  const AdaptiveRow<acc_t> a = in.row(r);
  scalar_t* p = logits + r * rs + j * cs;
  const acc_t l = static_cast<acc_t>(*p);
  const acc_t shift = static_cast<acc_t>(gmax[r]), denom = static_cast<acc_t>(gsum[r]);
  acc_t g;
  if (j == t) {
    g = (m_exp(l - shift) / denom - acc_t(1)) * a.target_derivative(static_cast<acc_t>(tcos[r])) * scale;
  } else if (filter && t >= 0 && l == acc_t(0)) {
    g = 0;  // a dropped (filtered) logit gets no gradient
  } else if (a.clip && (l <= static_cast<acc_t>(static_cast<scalar_t>(a.lo * a.s)) ||
                        l >= static_cast<acc_t>(static_cast<scalar_t>(a.hi * a.s)))) {
    g = 0;  // a clamped cosine gets no gradient
  } else {
    const acc_t logit = a.hard ? static_cast<acc_t>(static_cast<scalar_t>(a.negative_logit(l))) : l;
    g = m_exp(logit - shift) / denom * a.negative_slope(l) * scale;
  }
  *p = static_cast<scalar_t>(g);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_cuda(
    at::Tensor& logits, const at::Tensor& labels, double s, double m1, double m2, double m3,
    double filter_threshold) {
  check_logits(logits, labels, "margin_softmax_forward");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto opts = logits.options();
  at::Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts);
  at::Tensor target_logit = at::empty({rows}, opts), target_cos = at::empty({rows}, opts);
  if (rows == 0) return {row_max, sum_exp, target_logit, target_cos};
  c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.contiguous();
  const MarginParams mp{s, m1, m2, m3, filter_threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_softmax_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<rows, kRowThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, logits.stride(0), logits.stride(1),
        static_cast<acc_t>(s), static_cast<acc_t>(m1), static_cast<acc_t>(m2), static_cast<acc_t>(m3),
        static_cast<acc_t>(filter_threshold), mp.plain(), filter_threshold > 0, row_max.data_ptr<scalar_t>(),
        sum_exp.data_ptr<scalar_t>(), target_logit.data_ptr<scalar_t>(), target_cos.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_max, sum_exp, target_logit, target_cos};
}

void margin_softmax_backward_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& global_max,
                                  const at::Tensor& global_sum_exp, const at::Tensor& target_cos, double s, double m1,
                                  double m2, double m3, double grad_scale, double filter_threshold) {
  const char* op = "margin_softmax_backward";
  check_logits(logits, labels, op);
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
  const auto dtype = logits.scalar_type();
  const at::Tensor gm = global_max.to(dtype).contiguous(), gs = global_sum_exp.to(dtype).contiguous();
  const at::Tensor tc = target_cos.to(dtype).contiguous(), lab = labels.contiguous();
  const MarginParams mp{s, m1, m2, m3, filter_threshold};
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(cols, kLogitThreads)), static_cast<unsigned>(rows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "margin_softmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t><<<grid, kLogitThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, logits.stride(0), logits.stride(1),
        gm.const_data_ptr<scalar_t>(), gs.const_data_ptr<scalar_t>(), tc.const_data_ptr<scalar_t>(),
        static_cast<acc_t>(m1), static_cast<acc_t>(m2), static_cast<acc_t>(s * grad_scale), mp.plain(),
        filter_threshold > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward_adaptive_cuda(
    at::Tensor& logits, const at::Tensor& labels, double s, double m1, double m2, double m3, double filter_threshold,
    const std::optional<at::Tensor>& sample_m2, const std::optional<at::Tensor>& sample_m3, double clip_eps,
    const std::optional<at::Tensor>& hard_threshold, double hard_t) {
  const char* op = "margin_softmax_forward_adaptive";
  check_logits(logits, labels, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor sm2 = adaptive_vector(sample_m2, logits, "sample_m2", op);
  const at::Tensor sm3 = adaptive_vector(sample_m3, logits, "sample_m3", op);
  const at::Tensor hard = adaptive_vector(hard_threshold, logits, "hard_threshold", op);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto opts = logits.options();
  at::Tensor row_max = at::empty({rows}, opts), sum_exp = at::empty({rows}, opts);
  at::Tensor target_logit = at::empty({rows}, opts), target_cos = at::empty({rows}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_softmax_forward_adaptive",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = adaptive_inputs<acc_t>(sm2, sm3, hard, s, m1, m2, m3, clip_eps, hard_t, op);
    if (rows == 0) return;
    adaptive_forward_kernel<scalar_t, acc_t><<<rows, kRowThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, logits.stride(0), logits.stride(1), in,
        static_cast<acc_t>(filter_threshold), filter_threshold > 0, row_max.data_ptr<scalar_t>(),
        sum_exp.data_ptr<scalar_t>(), target_logit.data_ptr<scalar_t>(), target_cos.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_max, sum_exp, target_logit, target_cos};
}

void margin_softmax_backward_adaptive_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& global_max,
                                           const at::Tensor& global_sum_exp, const at::Tensor& target_cos, double s,
                                           double m1, double m2, double m3, double grad_scale, double filter_threshold,
                                           const std::optional<at::Tensor>& sample_m2,
                                           const std::optional<at::Tensor>& sample_m3, double clip_eps,
                                           const std::optional<at::Tensor>& hard_threshold, double hard_t) {
  const char* op = "margin_softmax_backward_adaptive";
  check_logits(logits, labels, op);
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
    const at::Tensor gm = global_max.to(dtype).contiguous(), gs = global_sum_exp.to(dtype).contiguous();
    const at::Tensor tc = target_cos.to(dtype).contiguous(), lab = labels.contiguous();
    const dim3 grid(static_cast<unsigned>(cuda::ceil_div(cols, kLogitThreads)), static_cast<unsigned>(rows));
    adaptive_backward_kernel<scalar_t, acc_t><<<grid, kLogitThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), cols, logits.stride(0), logits.stride(1),
        gm.const_data_ptr<scalar_t>(), gs.const_data_ptr<scalar_t>(), tc.const_data_ptr<scalar_t>(), in,
        static_cast<acc_t>(s * grad_scale), filter_threshold > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
