"""The Partial FC ops: pure-PyTorch references, and the dispatch to the compiled ``partialfc._C`` kernels.

Every op here has a reference implementation written with plain tensor operations. The references define
the semantics: the compiled kernels are tested against them, and they run whenever the extension is not
built (or ``PARTIALFC_DISABLE_EXT=1``).

Shapes: B = global batch, S = sampled classes on this rank, D = embedding size, C = ``num_local``.

The margin. For a target cosine ``t = cos(theta)`` the margin logit is

    f(t) = cos(m1 * theta + m2) - m3            when m1 * theta + m2 <= pi
    f(t) = t - m3 - m2 * sin(m2)                otherwise (arcface_torch's fallback that keeps f monotonic)

and every logit is then multiplied by ``s``. The backward uses the exact derivative
``df/dt = m1 * sin(m1 * theta + m2) / sin(theta)`` (1 in the fallback branch, and exactly 1 for CosFace).
"""
import ctypes
import math
import sys

import torch

# ---------------------------------------------------------------------------------------------------------
# Sampling


def _sample_distinct(n, k, generator, device):
    """``k`` distinct integers drawn uniformly from ``[0, n)``, in expected O(k) time, unsorted."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if generator is not None and generator.device != torch.device(device):
        # A generator draws on its own device (e.g. the head's CPU sampler with CUDA labels).
        return _sample_distinct(n, k, generator, generator.device).to(device)
    if 2 * k >= n:
        # Dense regime: a permutation costs O(n) = O(k) here.
        return torch.randperm(n, generator=generator, device=device)[:k]
    # Sparse regime: draw with replacement until k distinct values are seen. The set of distinct values of
    # i.i.d. uniform draws is exchangeable, so a uniform k-subset of it is a uniform k-subset of [0, n).
    found = torch.empty(0, dtype=torch.long, device=device)
    while found.numel() < k:
        draw = torch.randint(0, n, (k + k // 8 + 16,), generator=generator, device=device)
        found = torch.unique(torch.cat([found, draw]))
    keep = torch.randperm(found.numel(), generator=generator, device=device)[:k]
    return found[keep]


def sample_classes_ref(labels, class_start, num_local, num_sample, generator=None):
    """Positive classes of this rank plus uniform negatives; returns ``(index [S], remapped labels [B])``.

    ``labels`` are global class ids ``[B]``. ``index`` is sorted and holds local class ids in
    ``[0, num_local)``: every positive, then negatives drawn uniformly without replacement until
    ``S = max(num_sample, num_positive)`` (all classes when ``num_sample >= num_local``). ``remapped[b]`` is
    the position of ``labels[b]`` in ``index``, or -1 when the label lives on another rank.
    """
    device = labels.device
    local = labels - class_start
    is_local = (local >= 0) & (local < num_local)
    if num_sample >= num_local:
        index = torch.arange(num_local, device=device)
    else:
        positives = torch.unique(local[is_local])  # sorted
        num_neg = num_sample - positives.numel()
        # The i-th class that is not a positive is i + #{j : positives[j] - j <= i}.
        ranks = _sample_distinct(num_local - positives.numel(), num_neg, generator, device)
        shift = positives - torch.arange(positives.numel(), device=device)
        negatives = ranks + torch.searchsorted(shift, ranks, right=True)
        index = torch.sort(torch.cat([positives, negatives])).values
    return index, remap_labels(labels, class_start, num_local, index)


def remap_labels(labels, class_start, num_local, index):
    """Position of each global label in the sorted local ``index`` ``[S]`` (which holds every local
    positive), or -1 for labels that live on another rank."""
    local = labels - class_start
    is_local = (local >= 0) & (local < num_local)
    remapped = torch.full_like(labels, -1)
    remapped[is_local] = torch.searchsorted(index, local[is_local])
    return remapped


# ---------------------------------------------------------------------------------------------------------
# Gather + normalize of the sampled class centers


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def gather_normalize_ref(weight, index, out_dtype=None):
    """``(W[index] / ||W[index]||) [S, D]`` in ``out_dtype``, and the inverse norms ``[S]`` for backward."""
    rows = weight.index_select(0, index).to(_acc_dtype(weight.dtype))  # [S, D]
    inv_norm = rows.norm(dim=1).clamp_min(1e-12).reciprocal()  # [S]
    normalized = (rows * inv_norm[:, None]).to(out_dtype or weight.dtype)
    return normalized, inv_norm


def gather_normalize_backward_ref(grad_normalized, normalized, inv_norm):
    """Gradient of the gathered raw rows ``[S, D]`` (never a dense ``[C, D]`` gradient)."""
    acc = inv_norm.dtype
    g = grad_normalized.to(acc)
    n = normalized.to(acc)
    return (g - n * (g * n).sum(dim=1, keepdim=True)) * inv_norm[:, None]


# ---------------------------------------------------------------------------------------------------------
# Margin logits and softmax statistics


def _margin_and_derivative(t, m1, m2, m3):
    """``f(t)`` and ``df/dt`` for target cosines ``t`` (see the module docstring)."""
    if m1 == 1.0 and m2 == 0.0:
        return t - m3, torch.ones_like(t)
    theta = torch.acos(t)
    angle = m1 * theta + m2
    sin_theta = torch.sqrt(torch.clamp(1.0 - t * t, min=1e-12))
    main = torch.cos(angle) - m3
    fallback = t - m3 - m2 * math.sin(m2)
    in_range = angle <= math.pi
    value = torch.where(in_range, main, fallback)
    deriv = torch.where(in_range, m1 * torch.sin(angle) / sin_theta, torch.ones_like(t))
    return value, deriv


def margin_softmax_forward_ref(logits, labels, s, m1, m2, m3, filter_threshold=0.0):
    """In place on ``logits [B, S]`` (cosines): clamp, margin on the target column, optional inter-class
    filtering, scale by ``s``. Returns the per-row statistics the distributed combine needs:
    ``(row_max [B], sum_exp [B] relative to row_max, target_logit [B], target_cos [B])``; the last two are 0
    in rows whose target lives on another rank (``labels == -1``).
    """
    logits.clamp_(-1.0, 1.0)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    target_cos = torch.zeros(labels.shape[0], dtype=logits.dtype, device=logits.device)
    target_cos[rows] = logits[rows, cols]
    if filter_threshold > 0 and rows.numel():
        # Non-target classes too close to the sample are probably mislabeled duplicates: drop their logit.
        sub = logits[rows]
        too_close = sub > filter_threshold
        too_close[torch.arange(rows.numel(), device=logits.device), cols] = False
        logits[rows] = sub.masked_fill(too_close, 0.0)
    value, _ = _margin_and_derivative(target_cos[rows], m1, m2, m3)
    logits[rows, cols] = value
    logits.mul_(s)
    target_logit = torch.zeros_like(target_cos)
    target_logit[rows] = logits[rows, cols]
    if logits.shape[1] == 0:
        row_max = torch.full_like(target_cos, -math.inf)
        sum_exp = torch.zeros_like(target_cos)
    else:
        row_max = logits.max(dim=1).values
        sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
    return row_max, sum_exp, target_logit, target_cos


def margin_softmax_backward_ref(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                grad_scale, filter_threshold=0.0):
    """In place on the scaled logits ``[B, S]`` of the forward: ``d loss_sum / d cosine * grad_scale``.

    ``grad[b, j] = (softmax[b, j] - onehot[b, j]) * s * grad_scale``, times ``df/dt`` on the target column.
    With filtering, the dropped logits (exactly 0 after the forward) get no gradient.
    """
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    if filter_threshold > 0 and rows.numel():
        dropped = logits[rows] == 0
        dropped[torch.arange(rows.numel(), device=logits.device), cols] = False
    logits.sub_(global_max[:, None]).exp_().div_(global_sum_exp[:, None])
    logits[rows, cols] -= 1.0
    _, deriv = _margin_and_derivative(target_cos[rows], m1, m2, m3)
    logits[rows, cols] *= deriv
    if filter_threshold > 0 and rows.numel():
        logits[rows] = logits[rows].masked_fill(dropped, 0.0)
    logits.mul_(s * grad_scale)
    return logits


# ---------------------------------------------------------------------------------------------------------
# Sparse SGD with momentum on the sampled rows


def sparse_sgd_update_ref(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay):
    """``torch.optim.SGD`` (dampening 0, no Nesterov) applied to the rows ``index`` only, in place."""
    w = weight.index_select(0, index)
    g = grad_rows.to(weight.dtype)
    if weight_decay:
        g = g + weight_decay * w
    m = momentum_buffer.index_select(0, index).mul_(momentum).add_(g)
    momentum_buffer.index_copy_(0, index, m)
    weight.index_copy_(0, index, w - lr * m)


def normalize_backward_sgd_update_ref(weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum,
                                      weight_decay, grad_scale=1.0):
    """``sparse_sgd_update`` of the gradient rows that ``gather_normalize_backward`` gives for
    ``grad_normalized`` [S, D] (the gradient of the normalized rows), divided by ``grad_scale``.

    The normalized rows are recomputed as ``weight[index] * inv_norm`` (in the accumulation dtype), so the
    table must be unchanged since the forward that produced ``inv_norm``.
    """
    normalized = weight.index_select(0, index).to(inv_norm.dtype) * inv_norm[:, None]
    rows = gather_normalize_backward_ref(grad_normalized, normalized, inv_norm)
    if grad_scale != 1.0:
        rows = rows / grad_scale
    sparse_sgd_update_ref(weight, momentum_buffer, index, rows, lr, momentum, weight_decay)


# ---------------------------------------------------------------------------------------------------------
# Dispatch: the compiled kernels when ``partialfc._C`` is built, the references otherwise.
#
# The ``*_fused`` functions call ``torch.ops.partialfc`` directly (same signatures and results as the
# references, up to float rounding; the sampler draws from its own seeded generator, so its negatives differ).
# The unsuffixed names pick the kernels when the extension is loaded, not disabled by PARTIALFC_DISABLE_EXT,
# and has kernels for the tensors' device; otherwise the references.

from . import _ext  # noqa: E402  (loads partialfc._C, registers fake kernels and autograd)


def _draw_seed(generator):
    """One 62-bit seed for the compiled sampler, drawn from ``generator`` (or the default generator)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (), generator=generator, device=device))


def sample_classes_fused(labels, class_start, num_local, num_sample, generator=None):
    return torch.ops.partialfc.sample_classes(labels, int(class_start), int(num_local), int(num_sample),
                                              _draw_seed(generator))


def gather_normalize_fused(weight, index, out_dtype=None):
    return torch.ops.partialfc.gather_normalize(weight, index, out_dtype or weight.dtype)


def gather_normalize_backward_fused(grad_normalized, normalized, inv_norm):
    return torch.ops.partialfc.gather_normalize_backward(grad_normalized.to(normalized.dtype), normalized, inv_norm)


def margin_softmax_forward_fused(logits, labels, s, m1, m2, m3, filter_threshold=0.0):
    return torch.ops.partialfc.margin_softmax_forward(logits, labels, float(s), float(m1), float(m2), float(m3),
                                                      float(filter_threshold or 0.0))


def margin_softmax_backward_fused(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                  grad_scale, filter_threshold=0.0):
    torch.ops.partialfc.margin_softmax_backward(logits, labels, global_max, global_sum_exp, target_cos, float(s),
                                                float(m1), float(m2), float(m3), float(grad_scale),
                                                float(filter_threshold or 0.0))
    return logits


def sparse_sgd_update_fused(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay):
    torch.ops.partialfc.sparse_sgd_update(weight, momentum_buffer, index, grad_rows, float(lr), float(momentum),
                                          float(weight_decay))


def normalize_backward_sgd_update_fused(weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum,
                                        weight_decay, grad_scale=1.0):
    torch.ops.partialfc.normalize_backward_sgd_update(weight, momentum_buffer, index, grad_normalized, inv_norm,
                                                      float(lr), float(momentum), float(weight_decay),
                                                      float(grad_scale))


def use_fused(device):
    """True when the compiled kernels serve tensors on ``device`` (loaded, enabled, built for it)."""
    return _ext.enabled() and _ext.supports(device)


def sample_classes(labels, class_start, num_local, num_sample, generator=None):
    impl = sample_classes_fused if use_fused(labels.device) else sample_classes_ref
    return impl(labels, class_start, num_local, num_sample, generator)


def gather_normalize(weight, index, out_dtype=None):
    impl = gather_normalize_fused if use_fused(weight.device) else gather_normalize_ref
    return impl(weight, index, out_dtype)


def gather_normalize_backward(grad_normalized, normalized, inv_norm):
    impl = gather_normalize_backward_fused if use_fused(normalized.device) else gather_normalize_backward_ref
    return impl(grad_normalized, normalized, inv_norm)


def margin_softmax_forward(logits, labels, s, m1, m2, m3, filter_threshold=0.0):
    impl = margin_softmax_forward_fused if use_fused(logits.device) else margin_softmax_forward_ref
    return impl(logits, labels, s, m1, m2, m3, filter_threshold)


def margin_softmax_backward(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3, grad_scale,
                            filter_threshold=0.0):
    impl = margin_softmax_backward_fused if use_fused(logits.device) else margin_softmax_backward_ref
    return impl(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3, grad_scale, filter_threshold)


def sparse_sgd_update(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay):
    impl = sparse_sgd_update_fused if use_fused(weight.device) else sparse_sgd_update_ref
    return impl(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay)


def fused_update_available(device):
    """True when ``normalize_backward_sgd_update`` has a compiled kernel for ``device`` (CPU only)."""
    return use_fused(device) and torch.device(device).type == "cpu" and hasattr(
        torch.ops.partialfc, "normalize_backward_sgd_update")


def normalize_backward_sgd_update(weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum,
                                  weight_decay, grad_scale=1.0):
    impl = (normalize_backward_sgd_update_fused if fused_update_available(weight.device)
            else normalize_backward_sgd_update_ref)
    return impl(weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum, weight_decay, grad_scale)


# ---------------------------------------------------------------------------------------------------------
# Transparent huge pages for the large CPU tensors of the head

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_libc = None


def advise_huge_pages(tensor):
    """Ask Linux to back the 2 MiB-aligned part of a CPU tensor's memory with transparent huge pages
    (``madvise(MADV_HUGEPAGE)``); returns whether the kernel accepted. Pages already touched stay small
    (until khugepaged merges them), so call it on a fresh ``torch.empty`` before filling it. No-op (False)
    elsewhere, for tensors under 4 MiB, and when THP is disabled."""
    global _libc
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < 2 * _HUGE_PAGE:
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            _libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    start = tensor.data_ptr()
    begin = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > begin and _libc.madvise(begin, end - begin, _MADV_HUGEPAGE) == 0


def empty_huge(shape, dtype=torch.float32, device="cpu"):
    """``torch.empty(shape)``, backed by transparent huge pages where the CPU and OS allow (see
    ``advise_huge_pages``): the sampled rows of a multi-GB table are scattered, one 4 KiB page each, and
    huge pages cut the TLB misses of gathering and updating them."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(out)
    return out


class _Reference:
    """The reference ops under the dispatching names (what ``implementation(False)`` returns)."""
    sample_classes = staticmethod(sample_classes_ref)
    gather_normalize = staticmethod(gather_normalize_ref)
    gather_normalize_backward = staticmethod(gather_normalize_backward_ref)
    margin_softmax_forward = staticmethod(margin_softmax_forward_ref)
    margin_softmax_backward = staticmethod(margin_softmax_backward_ref)
    sparse_sgd_update = staticmethod(sparse_sgd_update_ref)
    normalize_backward_sgd_update = staticmethod(normalize_backward_sgd_update_ref)


class _Dispatching:
    """The dispatching ops (what ``implementation(True)`` returns)."""
    sample_classes = staticmethod(sample_classes)
    gather_normalize = staticmethod(gather_normalize)
    gather_normalize_backward = staticmethod(gather_normalize_backward)
    margin_softmax_forward = staticmethod(margin_softmax_forward)
    margin_softmax_backward = staticmethod(margin_softmax_backward)
    sparse_sgd_update = staticmethod(sparse_sgd_update)
    normalize_backward_sgd_update = staticmethod(normalize_backward_sgd_update)


def implementation(use_ext=True):
    """The op set a caller should use: the dispatching ops, or the references when ``use_ext`` is false."""
    return _Dispatching if use_ext else _Reference
