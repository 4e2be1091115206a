// CPU sub-center max over the K columns of each identity, and its backward (a scatter into the argmax
// column). Either logits layout is read at its own strides: a [B, S*K] row-major tensor, or the transpose of
// a class-major [S*K, B] buffer (partialfc/ops/cpu.py), walked class by class so each read is contiguous.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"

namespace partialfc {
namespace {

constexpr int64_t kSubcenterGrain = 2048;  // (b, s) pairs per task

template <typename scalar_t>
void subcenter_max_rows(const at::Tensor& cosines, int64_t k, at::Tensor& values, at::Tensor& argmax) {
  const int64_t batch = cosines.size(0), num_id = cosines.size(1) / k;
  const int64_t cs0 = cosines.stride(0), cs1 = cosines.stride(1);
  const scalar_t* c = cosines.const_data_ptr<scalar_t>();
  scalar_t* v = values.mutable_data_ptr<scalar_t>();
  int64_t* a = argmax.mutable_data_ptr<int64_t>();
  // Walk the pairs in the order of the input's memory: row by row, or identity by identity (class-major).
  const bool class_major = cs0 < cs1;
  at::parallel_for(0, batch * num_id, kSubcenterGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = class_major ? p % batch : p / num_id, s = class_major ? p / batch : p % num_id;
      const scalar_t* src = c + b * cs0 + s * k * cs1;
      scalar_t best = src[0];
      int64_t arg = 0;
      // Strictly greater keeps the lowest k on a tie; the first NaN wins and stays.
      for (int64_t j = 1; j < k && !std::isnan(static_cast<double>(best)); ++j) {
        const scalar_t x = src[j * cs1];
        if (x > best || std::isnan(static_cast<double>(x))) {
          best = x;
          arg = j;
        }
      }
      v[b * num_id + s] = best;
      a[b * num_id + s] = arg;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> subcenter_max_cpu(const at::Tensor& cosines, int64_t k) {
  const char* op = "subcenter_max";
  check_subcenter_input(cosines, k, op);
  const int64_t batch = cosines.size(0), num_id = cosines.size(1) / k;
  at::Tensor values = at::empty({batch, num_id}, cosines.options());
  at::Tensor argmax = at::empty({batch, num_id}, cosines.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cosines.scalar_type(), "subcenter_max", [&] {
    subcenter_max_rows<scalar_t>(cosines, k, values, argmax);
  });
  return {values, argmax};
}

template <typename scalar_t>
void subcenter_scatter_rows(const at::Tensor& grad, const at::Tensor& argmax, int64_t k, at::Tensor& out) {
  const int64_t batch = grad.size(0), num_id = grad.size(1);
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t* a = argmax.const_data_ptr<int64_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, batch * num_id, kSubcenterGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / num_id, s = p % num_id, arg = a[p];
      TORCH_CHECK(arg >= 0 && arg < k, "subcenter_max_backward: argmax[", b, ", ", s, "] = ", arg,
                  " is outside [0, ", k, ")");
      o[b * num_id * k + s * k + arg] = g[b * gs0 + s * gs1];
    }
  });
}

at::Tensor subcenter_max_backward_cpu(const at::Tensor& grad, const at::Tensor& argmax, int64_t k) {
  const char* op = "subcenter_max_backward";
  check_subcenter_grad(grad, argmax, k, op);
  at::Tensor out = at::zeros({grad.size(0), grad.size(1) * k}, grad.options());
  if (grad.numel() == 0) return out;
  const at::Tensor arg = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "subcenter_max_backward", [&] {
    subcenter_scatter_rows<scalar_t>(grad, arg, k, out);
  });
  return out;
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("subcenter_max", &partialfc::subcenter_max_cpu);
  m.impl("subcenter_max_backward", &partialfc::subcenter_max_backward_cpu);
}
