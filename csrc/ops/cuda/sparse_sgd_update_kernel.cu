// CUDA sparse SGD-momentum update and its fused form with the normalize backward: one block per sampled row,
// threads over the embedding dimension. A bfloat16 / float16 table given a rounding seed is written with
// stochastic rounding (../stochastic_rounding.h), bit for bit as on CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../checks.h"
#include "../stochastic_rounding.h"
#include "common.cuh"

namespace partialfc {
namespace {

constexpr int kUpdateThreads = 128;

template <typename w_t>
constexpr bool is_low_precision() {
  return std::is_same_v<w_t, c10::BFloat16> || std::is_same_v<w_t, c10::Half>;
}

// SGD with momentum on one element. Rounded to nearest, the gradient is first rounded to the table's dtype,
// as torch.optim.SGD sees it; stochastically rounded (low-precision tables with a seed), it is used in float32
// as it comes. The products are written with __fmul_rn / __fadd_rn so that nvcc does not contract them into
// FMAs: the rounded results then match the CPU kernels and the PyTorch reference bit for bit.
template <typename w_t, typename acc_t>
__device__ __forceinline__ void sgd_element(w_t& w, w_t& m, acc_t grad, acc_t lr, acc_t mu, acc_t wd,
                                            const RowRounding& rnd, int64_t col) {
  const acc_t wv = static_cast<acc_t>(w);
  if constexpr (is_low_precision<w_t>()) {
    if (rnd.stochastic) {
      const float mv = __fadd_rn(__fmul_rn(static_cast<float>(m), mu), __fadd_rn(grad, __fmul_rn(wd, wv)));
      m = rnd.round<w_t>(mv, col, kRoundMomentum);
      w = rnd.round<w_t>(__fsub_rn(wv, __fmul_rn(lr, mv)), col, kRoundWeight);
      return;
    }
  }
  const acc_t gv = static_cast<acc_t>(static_cast<w_t>(grad)) + wd * wv;
  const acc_t mv = static_cast<acc_t>(m) * mu + gv;
  m = static_cast<w_t>(mv);
  w = static_cast<w_t>(wv - lr * mv);
}

template <typename w_t, typename g_t, typename acc_t>
__global__ void update_kernel(w_t* weight, w_t* mom, const int64_t* __restrict__ index, const g_t* __restrict__ grad,
                              int64_t dim, int64_t ws0, int64_t ws1, int64_t ms0, int64_t ms1, int64_t gs0,
                              int64_t gs1, acc_t lr, acc_t mu, acc_t wd, Rounding rounding) {
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  const RowRounding rnd(rounding.stochastic, rounding.seed, rounding.step, rounding.class_start + r);
  w_t* wr = weight + r * ws0;
  w_t* mr = mom + r * ms0;
  const g_t* gr = grad + i * gs0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x)
    sgd_element(wr[j * ws1], mr[j * ms1], static_cast<acc_t>(gr[j * gs1]), lr, mu, wd, rnd, j);
}

// The update with the gradient rows formed from the gradient of the normalized rows: the block sums
// dot = <g, w * scale> over the row, then each thread updates its elements with
// grad = (g - w * scale * dot) * scale * inv_gscale. Nothing of size [S, D] is written besides the table rows.
template <typename w_t, typename g_t, typename acc_t>
__global__ void normalize_backward_update_kernel(w_t* weight, w_t* mom, const int64_t* __restrict__ index,
                                                 const g_t* __restrict__ grad, const acc_t* __restrict__ inv_norm,
                                                 int64_t dim, int64_t ws0, int64_t ws1, int64_t ms0, int64_t ms1,
                                                 int64_t gs0, int64_t gs1, acc_t lr, acc_t mu, acc_t wd,
                                                 acc_t inv_gscale, Rounding rounding) {
  __shared__ acc_t scratch[cuda::kWarp];
  const int64_t i = blockIdx.x;
  const int64_t r = index[i];  // in range: checked on the host before the launch
  const RowRounding rnd(rounding.stochastic, rounding.seed, rounding.step, rounding.class_start + r);
  w_t* wr = weight + r * ws0;
  w_t* mr = mom + r * ms0;
  const g_t* gr = grad + i * gs0;
  const acc_t scale = inv_norm[i];
  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x)
    dot += static_cast<acc_t>(gr[j * gs1]) * (static_cast<acc_t>(wr[j * ws1]) * scale);
  // Every thread has read its weights before any is written: block_sum ends after a barrier.
  dot = cuda::block_sum(dot, scratch);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const acc_t rv = (static_cast<acc_t>(gr[j * gs1]) - static_cast<acc_t>(wr[j * ws1]) * scale * dot) * scale *
                     inv_gscale;
    sgd_element(wr[j * ws1], mr[j * ms1], rv, lr, mu, wd, rnd, j);
  }
}

void check_update_args(const at::Tensor& weight, const at::Tensor& momentum_buffer, const at::Tensor& index,
                       const at::Tensor& rows, const char* rows_name, const char* op) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_classes, D], got ", weight.sizes());
  check_rows(weight, weight.size(0), weight.size(1), "weight", op);
  check_rows(momentum_buffer, weight.size(0), weight.size(1), "momentum_buffer", op);
  TORCH_CHECK(momentum_buffer.scalar_type() == weight.scalar_type(), op, ": momentum_buffer dtype ",
              momentum_buffer.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  check_index(index, weight, op);
  check_rows(rows, index.numel(), weight.size(1), rows_name, op);
  TORCH_CHECK(momentum_buffer.device() == weight.device() && rows.device() == weight.device(), op,
              ": weight, momentum_buffer and ", rows_name, " must be on one device");
}

void sparse_sgd_update_cuda(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& index,
                            const at::Tensor& grad_rows, double lr, double momentum, double weight_decay,
                            std::optional<int64_t> rounding_seed, int64_t rounding_step, int64_t class_start) {
  const char* op = "sparse_sgd_update";
  check_update_args(weight, momentum_buffer, index, grad_rows, "grad_rows", op);
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  const int64_t rows = index.numel();
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous();
  // Before any row is written: a bad index leaves table and momentum as they were.
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_sgd_update_w", [&] {
    using w_t = scalar_t;
    using acc_t = at::opmath_type<w_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "sparse_sgd_update_g", [&] {
      update_kernel<w_t, scalar_t, acc_t><<<rows, kUpdateThreads, 0, stream>>>(
          weight.data_ptr<w_t>(), momentum_buffer.data_ptr<w_t>(), idx.const_data_ptr<int64_t>(),
          grad_rows.const_data_ptr<scalar_t>(), weight.size(1), weight.stride(0), weight.stride(1),
          momentum_buffer.stride(0), momentum_buffer.stride(1), grad_rows.stride(0), grad_rows.stride(1),
          static_cast<acc_t>(lr), static_cast<acc_t>(momentum), static_cast<acc_t>(weight_decay), rounding);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void normalize_backward_sgd_update_cuda(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& index,
                                        const at::Tensor& grad_normalized, const at::Tensor& inv_norm, double lr,
                                        double momentum, double weight_decay, double grad_scale,
                                        std::optional<int64_t> rounding_seed, int64_t rounding_step,
                                        int64_t class_start) {
  const char* op = "normalize_backward_sgd_update";
  check_update_args(weight, momentum_buffer, index, grad_normalized, "grad_normalized", op);
  check_normalize_backward_args(weight, index, inv_norm, grad_scale, op);
  const Rounding rounding = make_rounding(rounding_seed, rounding_step, class_start, op);
  const int64_t rows = index.numel();
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous(), inv_c = inv_norm.contiguous();
  cuda::check_index_range_cuda(idx, weight.size(0), op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "nb_sgd_update_w", [&] {
    using w_t = scalar_t;
    using acc_t = at::opmath_type<w_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_normalized.scalar_type(), "nb_sgd_update_g", [&] {
      // Loss scales are powers of two in practice, so multiplying by the reciprocal is exact there.
      normalize_backward_update_kernel<w_t, scalar_t, acc_t><<<rows, kUpdateThreads, 0, stream>>>(
          weight.data_ptr<w_t>(), momentum_buffer.data_ptr<w_t>(), idx.const_data_ptr<int64_t>(),
          grad_normalized.const_data_ptr<scalar_t>(), inv_c.const_data_ptr<acc_t>(), weight.size(1),
          weight.stride(0), weight.stride(1), momentum_buffer.stride(0), momentum_buffer.stride(1),
          grad_normalized.stride(0), grad_normalized.stride(1), static_cast<acc_t>(lr), static_cast<acc_t>(momentum),
          static_cast<acc_t>(weight_decay), static_cast<acc_t>(1.0 / grad_scale), rounding);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CUDA, m) {
  m.impl("sparse_sgd_update", &partialfc::sparse_sgd_update_cuda);
  m.impl("normalize_backward_sgd_update", &partialfc::normalize_backward_sgd_update_cuda);
}
