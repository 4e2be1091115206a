// CUDA class sampler: index [S] = every positive (distinct local label) + uniform distinct negatives, sorted;
// labels remapped by binary search over the index. Work is O(B log B + S log S) on the device and never a
// pass over all num_local classes.
//
//   positives  sort of the B local labels (out-of-range ones mapped to the sentinel num_local), then one block
//              compacts the distinct in-range values and writes their count num_pos to device memory;
//   negatives  output slot i >= num_pos takes rank j = i - num_pos of a keyed pseudo-random permutation of
//              [0, available = num_local - num_pos) (a Feistel network with cycle-walking, then a rotation by
//              a seeded offset), mapped to a class id by binary search over the positives. Distinct ranks by
//              construction: no rejection rounds, no deduplication;
//   index      one sort of the S slots; the remap is a binary search per label.
//
// Host syncs per call: none when the output size is known on the host without reading num_pos, that is when
// num_sample >= num_local (S = num_local, every class) or num_sample >= B (S = num_sample, since
// num_pos <= B): kernels read num_pos from device memory. When num_sample < B, one sync reads num_pos to size
// the output (S = max(num_sample, num_pos)). Never more than one. Device sorts: one of B keys and one of S
// ids (none when every class is sampled). Deterministic for a seed; everything runs on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include <algorithm>

#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kSampleThreads = 256;
constexpr int kCompactThreads = 1024;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// The negatives' permutation. Rounds alternate between the two halves of a (bits)-bit word: the high half is
// XORed with a keyed hash of the low half, then the low half with a keyed hash of the high half; each round is
// a bijection whatever the hash, so the network is a permutation of [0, 2^bits). Cycle-walking (apply it again
// until the value falls below `available`) restricts it to a permutation of [0, available). The word has at
// least kFeistelMinBits bits: on tiny domains (halves of one or two bits) the network reaches too few
// permutations for the subsets it yields to be near uniform; cycle-walking from 2^8 costs at most a few hundred
// rounds there. tests/ops/test_sample_classes_cuda.py mirrors this function in Python.
constexpr int kFeistelRounds = 8;
constexpr int kFeistelMinBits = 8;

struct NegativeKey {
  uint64_t round[kFeistelRounds];
  uint64_t rotation;  // offset = floor(rotation * available / 2^64)
};

NegativeKey negative_key(uint64_t seed) {
  NegativeKey key;
  for (int r = 0; r < kFeistelRounds; ++r) key.round[r] = cuda::mix64(seed + kGolden * static_cast<uint64_t>(r + 1));
  key.rotation = cuda::mix64(seed + kGolden * static_cast<uint64_t>(kFeistelRounds + 1));
  return key;
}

// Image of rank j < available (available >= 1) under the seed's permutation of [0, available), rotated by an
// offset drawn from the seed: whatever the permutation's quality, the rotation makes every rank's chance of being
// among the first n images exactly n / available (up to the offset draw's bias, below available / 2^64).
__device__ __forceinline__ uint64_t permute_rank(uint64_t j, uint64_t available, const NegativeKey& key) {
  int bits = available > 1 ? 64 - __clzll(static_cast<long long>(available - 1)) : 0;
  bits = bits < kFeistelMinBits ? kFeistelMinBits : bits;
  const int lo_bits = bits / 2, hi_bits = bits - lo_bits;  // hi_bits <= 32
  const uint64_t lo_mask = (uint64_t(1) << lo_bits) - 1, hi_mask = (uint64_t(1) << hi_bits) - 1;
  uint64_t x = j;
  do {
    uint64_t lo = x & lo_mask, hi = x >> lo_bits;
#pragma unroll
    for (int r = 0; r < kFeistelRounds; ++r) {
      if (r % 2 == 0) {
        hi ^= cuda::mix64(lo ^ key.round[r]) & hi_mask;
      } else {
        lo ^= cuda::mix64(hi ^ key.round[r]) & lo_mask;
      }
    }
    x = (hi << lo_bits) | lo;
  } while (x >= available);  // ends: j's cycle returns to j < available
  x += __umul64hi(key.rotation, available);  // both terms < available <= 2^63: no overflow
  return x >= available ? x - available : x;
}

// keys[b] = local label of sample b, or the sentinel num_local (after every class) when it is not local.
__global__ void local_keys_kernel(const int64_t* __restrict__ labels, int64_t batch, int64_t class_start,
                                  int64_t num_local, int64_t* __restrict__ keys) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int64_t local = labels[b] - class_start;
  keys[b] = (local >= 0 && local < num_local) ? local : num_local;
}

// One block: the distinct values below num_local of the sorted keys, in order, into positives[0, num_pos), and
// num_pos into *num_pos. Chunks of blockDim.x keys; a kept key's slot is the count of kept keys before it
// (ballot within the warp, per-warp counts through shared memory).
__global__ void compact_positives_kernel(const int64_t* __restrict__ sorted, int64_t batch, int64_t num_local,
                                         int64_t* __restrict__ positives, int64_t* __restrict__ num_pos) {
  __shared__ int warp_count[kCompactThreads / cuda::kWarp];
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  const int warps = blockDim.x / cuda::kWarp;
  int64_t base = 0;
  for (int64_t start = 0; start < batch; start += blockDim.x) {  // uniform over the block
    const int64_t i = start + threadIdx.x;
    int64_t value = 0;
    bool keep = false;
    if (i < batch) {
      value = sorted[i];
      keep = value < num_local && (i == 0 || sorted[i - 1] != value);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, chunk = 0;
    for (int w = 0; w < warps; ++w) {
      const int c = warp_count[w];
      before += w < warp ? c : 0;
      chunk += c;
    }
    if (keep) positives[base + before + __popc(ballot & ((1u << lane) - 1u))] = value;
    base += chunk;
    __syncthreads();  // warp_count is rewritten by the next chunk
  }
  if (threadIdx.x == 0) *num_pos = base;
}

// index[i] for i < total: positives[i] for i < num_pos (read from device memory), otherwise the class of
// negative rank permute_rank(i - num_pos): rank r among the non-positives is class r + #{j : positives[j] - j <= r}.
// The host guarantees total <= num_local, so i - num_pos < available.
__global__ void fill_index_kernel(const int64_t* __restrict__ positives, const int64_t* __restrict__ num_pos_ptr,
                                  int64_t total, int64_t num_local, NegativeKey key, int64_t* __restrict__ index) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t num_pos = *num_pos_ptr;
  if (i < num_pos) {
    index[i] = positives[i];
    return;
  }
  const uint64_t available = static_cast<uint64_t>(num_local - num_pos);
  const int64_t r = static_cast<int64_t>(permute_rank(static_cast<uint64_t>(i - num_pos), available, key));
  int64_t lo = 0, hi = num_pos;  // first j with positives[j] - j > r
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (positives[mid] - mid <= r) lo = mid + 1; else hi = mid;
  }
  index[i] = r + lo;
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

std::tuple<at::Tensor, at::Tensor> sample_classes_cuda(const at::Tensor& labels, int64_t class_start,
                                                       int64_t num_local, int64_t num_sample, int64_t seed) {
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
  at::Tensor remapped = at::empty({batch}, opts);

  const bool every_class = num_sample >= num_local;
  at::Tensor index;
  if (every_class) {
    index = at::arange(num_local, opts);
  } else {
    // positives: buffer [0, batch), their count at [batch].
    at::Tensor positives = at::empty({batch + 1}, opts);
    int64_t* pos = positives.mutable_data_ptr<int64_t>();
    at::Tensor sorted_keys;
    if (batch > 0) {
      at::Tensor keys = at::empty({batch}, opts);
      local_keys_kernel<<<cuda::ceil_div(batch, kSampleThreads), kSampleThreads, 0, stream>>>(
          lab.const_data_ptr<int64_t>(), batch, class_start, num_local, keys.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sorted_keys = std::get<0>(at::sort(keys)).contiguous();
    }
    compact_positives_kernel<<<1, kCompactThreads, 0, stream>>>(
        batch > 0 ? sorted_keys.const_data_ptr<int64_t>() : nullptr, batch, num_local, pos, pos + batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // S = max(num_sample, num_pos) with num_pos <= min(batch, num_local): equal to num_sample unless
    // num_sample < batch, and only then is num_pos read back (the one host sync). Either way total <= num_local.
    int64_t total = num_sample;
    if (num_sample < batch) total = std::max(num_sample, positives.narrow(0, batch, 1).item<int64_t>());
    index = at::empty({total}, opts);
    if (total > 0) {
      fill_index_kernel<<<cuda::ceil_div(total, kSampleThreads), kSampleThreads, 0, stream>>>(
          pos, pos + batch, total, num_local, negative_key(static_cast<uint64_t>(seed)),
          index.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (total > 1) index = std::get<0>(at::sort(index)).contiguous();
  }
  if (batch > 0) {
    remap_kernel<<<cuda::ceil_div(batch, kSampleThreads), kSampleThreads, 0, stream>>>(
        lab.const_data_ptr<int64_t>(), batch, class_start, num_local, index.const_data_ptr<int64_t>(), index.numel(),
        every_class, remapped.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {index, remapped};
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sample_classes", &partialfc::sample_classes_cuda);
}
