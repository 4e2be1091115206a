// CUDA class sampler. Work is O(S + B) elementwise plus sorts of at most O(S) elements on the device (never a
// pass over all num_local classes unless S is more than half of them): positives = unique local labels;
// negative ranks among the non-positives are drawn with a counter-based generator (rejection rounds of
// i.i.d. draws deduplicated by sort, or a random-key permutation in the dense regime); ranks are mapped to
// class ids by binary search over the positives; labels are remapped by binary search over the index.
// Deterministic for a seed. The positive count is read back to the host to size the outputs.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unique.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/masked_select.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kSampleThreads = 256;

// out[i] = uniform in [0, n) (n > 0), or a raw 63-bit key when n == 0.
__global__ void draw_kernel(int64_t* __restrict__ out, int64_t count, uint64_t n, uint64_t seed, uint64_t stream) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const uint64_t x = cuda::random64(seed, stream, static_cast<uint64_t>(i));
  out[i] = n == 0 ? static_cast<int64_t>(x >> 1) : static_cast<int64_t>(__umul64hi(x, n));
}

// rank r among the non-positives -> class r + #{j : positives[j] - j <= r}  (positives sorted, distinct).
__global__ void rank_to_class_kernel(const int64_t* __restrict__ ranks, int64_t count,
                                     const int64_t* __restrict__ positives, int64_t num_pos, int64_t* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const int64_t r = ranks[i];
  int64_t lo = 0, hi = num_pos;  // first j with positives[j] - j > r
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (positives[mid] - mid <= r) lo = mid + 1; else hi = mid;
  }
  out[i] = r + lo;
}

__global__ void remap_kernel(const int64_t* __restrict__ labels, int64_t batch, int64_t class_start,
                             int64_t num_local, const int64_t* __restrict__ index, int64_t num_index, bool identity,
                             int64_t* __restrict__ out) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int64_t local = labels[b] - class_start;
  if (local < 0 || local >= num_local) {
    out[b] = -1;
    return;
  }
  if (identity) {
    out[b] = local;
    return;
  }
  int64_t lo = 0, hi = num_index;  // first j with index[j] >= local
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (index[mid] < local) lo = mid + 1; else hi = mid;
  }
  out[b] = lo;
}

at::Tensor draw(int64_t count, int64_t n, uint64_t seed, uint64_t stream, const at::TensorOptions& opts,
                cudaStream_t cu_stream) {
  at::Tensor out = at::empty({count}, opts);
  if (count == 0) return out;
  draw_kernel<<<cuda::ceil_div(count, kSampleThreads), kSampleThreads, 0, cu_stream>>>(out.mutable_data_ptr<int64_t>(), count,
                                                                         static_cast<uint64_t>(n), seed, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_classes_cuda(const at::Tensor& labels, int64_t class_start,
                                                       int64_t num_local, int64_t num_sample, int64_t seed_arg) {
  TORCH_CHECK(labels.is_cuda(), "sample_classes: labels must be a CUDA tensor");
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong,
              "sample_classes: labels must be a 1-D int64 tensor, got ", labels.dim(), "-D ", labels.scalar_type());
  TORCH_CHECK(num_local >= 0, "sample_classes: num_local must be >= 0, got ", num_local);
  TORCH_CHECK(num_sample >= 0, "sample_classes: num_sample must be >= 0, got ", num_sample);
  c10::cuda::CUDAGuard guard(labels.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.contiguous();
  const auto opts = lab.options();
  const int64_t batch = lab.numel();
  const uint64_t seed = static_cast<uint64_t>(seed_arg);
  at::Tensor remapped = at::empty({batch}, opts);

  at::Tensor index;
  if (num_sample >= num_local) {
    index = at::arange(num_local, opts);
  } else {
    const at::Tensor local = lab - class_start;
    const at::Tensor positives = std::get<0>(at::_unique(at::masked_select(local, (local >= 0) & (local < num_local)),
                                                         /*sorted=*/true));
    const int64_t num_pos = positives.numel();
    const int64_t total = std::max(num_sample, num_pos);
    const int64_t num_neg = total - num_pos, available = num_local - num_pos;
    at::Tensor ranks;
    uint64_t round = 0;
    if (num_neg == 0) {
      ranks = at::empty({0}, opts);
    } else if (2 * num_neg <= available) {
      // Sparse regime: rounds of i.i.d. draws, deduplicated, until num_neg distinct ranks; then a uniform
      // num_neg-subset of them (the distinct values of i.i.d. draws are an exchangeable set).
      at::Tensor found = at::empty({0}, opts);
      while (found.numel() < num_neg) {
        const at::Tensor more = draw(num_neg + num_neg / 8 + 16, available, seed, round++, opts, stream);
        found = std::get<0>(at::_unique(at::cat({found, more}), /*sorted=*/true));
      }
      if (found.numel() > num_neg) {
        const at::Tensor keys = draw(found.numel(), 0, seed, round++, opts, stream);
        const at::Tensor order = std::get<1>(at::sort(keys)).narrow(0, 0, num_neg);
        found = found.index_select(0, order);
      }
      ranks = found;
    } else {
      // Dense regime (num_local <= 2 S + B): a random-key permutation of all available ranks.
      const at::Tensor keys = draw(available, 0, seed, round++, opts, stream);
      ranks = std::get<1>(at::sort(keys)).narrow(0, 0, num_neg).contiguous();
    }
    at::Tensor negatives = at::empty({num_neg}, opts);
    if (num_neg > 0) {
      rank_to_class_kernel<<<cuda::ceil_div(num_neg, kSampleThreads), kSampleThreads, 0, stream>>>(
          ranks.const_data_ptr<int64_t>(), num_neg, positives.const_data_ptr<int64_t>(), num_pos,
          negatives.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    index = std::get<0>(at::sort(at::cat({positives, negatives}))).contiguous();
  }
  if (batch > 0) {
    remap_kernel<<<cuda::ceil_div(batch, kSampleThreads), kSampleThreads, 0, stream>>>(
        lab.const_data_ptr<int64_t>(), batch, class_start, num_local, index.const_data_ptr<int64_t>(), index.numel(),
        num_sample >= num_local, remapped.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {index, remapped};
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sample_classes", &partialfc::sample_classes_cuda);
}
