// Helpers shared by the CUDA kernels: block reductions, a counter-based random generator, launch sizes, and
// the host-side range check of index tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>

namespace partialfc {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A NaN in any lane is every lane's result (fmaxf would drop it, and lanes would disagree).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (o > v || o != o) ? o : v;
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 values; the call begins and ends with a barrier so scratch can be reused.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  v = warp_sum(v);
  return v;
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* scratch, T lowest) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : lowest;
  v = warp_max(v);
  return v;
}

// splitmix64 finalizer: a bijective 64-bit mixer; mix(seed, stream, i) gives independent-looking draws.
__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t random64(uint64_t seed, uint64_t stream, uint64_t i) {
  return mix64(mix64(seed + 0x9E3779B97F4A7C15ULL * (stream + 1)) ^ (i * 0xD1B54A32D192ED03ULL + stream));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks that every entry of the int64 CUDA tensor `values` lies in [lo, hi), raising the CPU kernels' error
// (`op: name[i] = v is outside [lo, hi)`) otherwise. A device assert would leave a sticky error that ends the
// process; this costs one small reduction and one synchronizing copy of two values per call instead. Only
// on failure is the whole tensor copied back, to name the first bad entry.
inline void check_range_cuda(const at::Tensor& values, int64_t lo, int64_t hi, const char* op, const char* name) {
  if (values.numel() == 0) return;
  const auto bounds = at::aminmax(values);
  const at::Tensor host = at::stack({std::get<0>(bounds), std::get<1>(bounds)}).cpu();
  const int64_t smallest = host.const_data_ptr<int64_t>()[0], largest = host.const_data_ptr<int64_t>()[1];
  if (smallest >= lo && largest < hi) return;
  const at::Tensor all = values.cpu().contiguous();
  const int64_t* p = all.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < all.numel(); ++i)
    TORCH_CHECK(p[i] >= lo && p[i] < hi, op, ": ", name, "[", i, "] = ", p[i], " is outside [", lo, ", ", hi, ")");
}

// Row indices into a table of `num_rows` rows.
inline void check_index_range_cuda(const at::Tensor& index, int64_t num_rows, const char* op) {
  check_range_cuda(index, 0, num_rows, op, "index");
}

}  // namespace cuda
}  // namespace partialfc
