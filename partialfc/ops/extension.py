"""Loading of the compiled kernels ``partialfc._C`` and their Python-side registrations.

Importing this module loads the extension (when built), then registers for the ``torch.ops.partialfc`` ops
their fake (meta) kernels, used by ``torch.compile`` / FakeTensor tracing, and the autograd formula of
``gather_normalize``. When the extension cannot be loaded the package keeps working on the pure-PyTorch
reference ops, and one ``RuntimeWarning`` names the cause. ``PARTIALFC_DISABLE_EXT=1`` selects the
reference ops even when the extension is built (no warning then).
"""
import os
import warnings

import torch

from .dtypes import accumulation_dtype

_C = None
LOAD_ERROR = None
try:
    from .. import _C
except Exception as exc:  # ImportError (not built), OSError (ABI / missing library), ...
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def disabled_by_env():
    """True when ``PARTIALFC_DISABLE_EXT`` asks for the reference ops."""
    return os.environ.get("PARTIALFC_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def available():
    """True when ``partialfc._C`` is loaded (regardless of ``PARTIALFC_DISABLE_EXT``)."""
    return _C is not None


def with_cuda():
    """True when the loaded extension carries CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", 0))


def enabled():
    """True when the fused kernels are to be used: loaded and not disabled by the environment."""
    return _C is not None and not disabled_by_env()


def supports(device):
    """True when the extension has kernels for tensors on ``device``: for a GPU, kernels built for its
    architecture (machine code of its generation, or PTX the driver can compile for it)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not with_cuda():
        return False
    return cuda_kernels_for(torch.cuda.get_device_capability(device))


_WARNED_ARCH = set()


def cuda_kernels_for(capability, arch_list=None):
    """True when the build serves a GPU of ``capability``; warns once per capability when it does not (the
    run then uses the reference ops). A build that did not record its architectures is trusted."""
    from .cuda_archs import built_arch_list, covers
    arch_list = built_arch_list() if arch_list is None else arch_list
    if arch_list is None or covers(capability, arch_list):
        return True
    if tuple(capability) not in _WARNED_ARCH:
        _WARNED_ARCH.add(tuple(capability))
        warnings.warn(f"partialfc: the compiled kernels were built for CUDA architectures {arch_list!r}, which "
                      f"cannot run on this GPU (compute capability {capability[0]}.{capability[1]}); using the "
                      f"pure-PyTorch reference ops. Rebuild with TORCH_CUDA_ARCH_LIST="
                      f"\"{capability[0]}.{capability[1]}\" python setup.py build_ext --inplace", RuntimeWarning,
                      stacklevel=3)
    return False


if _C is None and not disabled_by_env():
    warnings.warn(f"partialfc: the compiled kernels partialfc._C could not be loaded ({LOAD_ERROR}); training "
                  "runs on the slower pure-PyTorch reference ops. Build them with `python setup.py build_ext "
                  "--inplace` (or set PARTIALFC_DISABLE_EXT=1 to silence this warning).", RuntimeWarning,
                  stacklevel=2)


if _C is not None:
    lib = "partialfc::"

    @torch.library.register_fake(lib + "sample_classes")
    def _sample_classes_fake(labels, class_start, num_local, num_sample, seed):
        if num_sample >= num_local:
            size = num_local
        else:
            size = torch.library.get_ctx().new_dynamic_size()  # max(num_sample, #positives)
        return labels.new_empty((size,)), torch.empty_like(labels)

    @torch.library.register_fake(lib + "gather_normalize")
    def _gather_normalize_fake(weight, index, out_dtype):
        return (weight.new_empty((index.shape[0], weight.shape[1]), dtype=out_dtype),
                weight.new_empty((index.shape[0],), dtype=accumulation_dtype(weight.dtype)))

    @torch.library.register_fake(lib + "gather_normalize_out")
    def _gather_normalize_out_fake(weight, index, out, inv_norm):
        return None

    @torch.library.register_fake(lib + "gather_normalize_backward")
    def _gather_normalize_backward_fake(grad, normalized, inv_norm):
        return grad.new_empty(grad.shape, dtype=inv_norm.dtype)

    @torch.library.register_fake(lib + "gather_normalize_backward_out")
    def _gather_normalize_backward_out_fake(grad, normalized, inv_norm, out):
        return None

    def _row_statistics_fake(logits):
        # The per-row statistics are float32 for bf16/fp16 logits (float64 for float64), as the kernels give.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return tuple(logits.new_empty((logits.shape[0],), dtype=dtype) for _ in range(4))

    @torch.library.register_fake(lib + "margin_softmax_forward")
    def _margin_softmax_forward_fake(logits, labels, s, m1, m2, m3, filter_threshold, store_logits=True):
        return _row_statistics_fake(logits)

    @torch.library.register_fake(lib + "margin_softmax_backward")
    def _margin_softmax_backward_fake(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                      grad_scale, filter_threshold, grad_absmax=None, from_cosines=False):
        return None

    # The adaptive margin ops (AdaFace, CurricularFace) exist in extensions built from these sources; an older
    # build lacks them and the head's adaptive margins then need use_ext=False.
    if hasattr(torch.ops.partialfc, "margin_softmax_forward_adaptive"):
        @torch.library.register_fake(lib + "margin_softmax_forward_adaptive")
        def _margin_softmax_forward_adaptive_fake(logits, labels, s, m1, m2, m3, filter_threshold, sample_m2,
                                                  sample_m3, clip_eps, hard_threshold, hard_t, store_logits=True):
            return _row_statistics_fake(logits)

        @torch.library.register_fake(lib + "margin_softmax_backward_adaptive")
        def _margin_softmax_backward_adaptive_fake(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2,
                                                   m3, grad_scale, filter_threshold, sample_m2, sample_m3, clip_eps,
                                                   hard_threshold, hard_t, grad_absmax=None, from_cosines=False):
            return None

    @torch.library.register_fake(lib + "sparse_sgd_update")
    def _sparse_sgd_update_fake(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay,
                                rounding_seed=None, rounding_step=0, class_start=0):
        return None

    @torch.library.register_fake(lib + "normalize_backward_sgd_update")
    def _normalize_backward_sgd_update_fake(weight, momentum_buffer, index, grad_normalized, inv_norm, lr,
                                            momentum, weight_decay, grad_scale, rounding_seed=None,
                                            rounding_step=0, class_start=0):
        return None

    @torch.library.register_fake(lib + "sparse_adamw_update")
    def _sparse_adamw_update_fake(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, lr, beta1, beta2, eps,
                                  weight_decay, rounding_seed=None, rounding_step=0, class_start=0):
        return None

    @torch.library.register_fake(lib + "normalize_backward_adamw_update")
    def _normalize_backward_adamw_update_fake(weight, exp_avg, exp_avg_sq, row_step, index, grad_normalized, inv_norm,
                                              lr, beta1, beta2, eps, weight_decay, grad_scale, rounding_seed=None,
                                              rounding_step=0, class_start=0):
        return None

    # Autograd of the functional gather_normalize w.r.t. the whole table. The Partial FC head does not use
    # it (its table never requires grad; it calls gather_normalize_backward and gets only the [S, D] rows);
    # it exists so that the op is a complete differentiable op (gradcheck, other callers).
    def _gather_normalize_setup(ctx, inputs, output):
        weight, index, _ = inputs
        normalized, inv_norm = output
        ctx.save_for_backward(index, normalized, inv_norm)
        ctx.table = (weight.shape, weight.dtype)

    def _gather_normalize_backward(ctx, grad_normalized, grad_inv_norm):
        index, normalized, inv_norm = ctx.saved_tensors
        shape, dtype = ctx.table
        rows = None
        if grad_normalized is not None:
            rows = torch.ops.partialfc.gather_normalize_backward(grad_normalized.to(normalized.dtype), normalized,
                                                                 inv_norm)
        if grad_inv_norm is not None:
            # d(1/||w||)/dw = -w / ||w||^3 = -inv_norm^2 * normalized
            extra = -(grad_inv_norm * inv_norm * inv_norm)[:, None] * normalized.to(inv_norm.dtype)
            rows = extra if rows is None else rows + extra
        if rows is None:
            return None, None, None
        grad_weight = torch.zeros(shape, dtype=dtype, device=rows.device).index_add_(0, index, rows.to(dtype))
        return grad_weight, None, None

    torch.library.register_autograd(lib + "gather_normalize", _gather_normalize_backward,
                                    setup_context=_gather_normalize_setup)
