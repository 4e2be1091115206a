"""The reference ops: the semantics of every Partial FC op, in plain PyTorch.

The compiled kernels of ``partialfc._C`` are tested against these functions, and the reference op table
(``partialfc.ops.op_table(device, use_ext=False)``) runs the head on them. Each op that the compiled
extension offers in an ``_out`` or in-place form has the same form here, so that the head's step is one
code over either table.

Shapes: B = global batch, S = sampled classes on this rank, D = embedding size, C = ``num_local``.

The margin. For a target cosine ``t = cos(theta)`` the margin logit is

    f(t) = cos(m1 * theta + m2) - m3            when m1 * theta + m2 <= pi
    f(t) = t - m3 - m2 * sin(m2)                otherwise (arcface_torch's fallback that keeps f monotonic)

and every logit is then multiplied by ``s``. The backward uses the exact derivative
``df/dt = m1 * sin(m1 * theta + m2) / sin(theta)`` (1 in the fallback branch, and exactly 1 for CosFace).

The adaptive margin ops (``margin_softmax_*_adaptive_ref``; AdaFace and CurricularFace, docs/margins.md) add
per-sample terms to ``m2`` and ``m3``, optionally clamp the cosines to ``[-1 + eps, 1 - eps]`` and clip the
target angle to ``[eps, pi - eps]`` instead of the fallback, and optionally re-weight hard negatives.
"""
import math

import torch

from .dtypes import accumulation_dtype

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


def gather_normalize_ref(weight, index, out_dtype=None):
    """``(W[index] / ||W[index]||) [S, D]`` in ``out_dtype``, and the inverse norms ``[S]`` for backward."""
    rows = weight.index_select(0, index).to(accumulation_dtype(weight.dtype))  # [S, D]
    inv_norm = rows.norm(dim=1).clamp_min(1e-12).reciprocal()  # [S]
    normalized = (rows * inv_norm[:, None]).to(out_dtype or weight.dtype)
    return normalized, inv_norm


def gather_normalize_out_ref(weight, index, out, inv_norm):
    """``gather_normalize_ref`` into preallocated ``out`` [S, D] (its dtype is the output dtype) and
    ``inv_norm`` [S]."""
    normalized, norms = gather_normalize_ref(weight, index, out.dtype)
    out.copy_(normalized)
    inv_norm.copy_(norms)


def gather_normalize_backward_ref(grad_normalized, normalized, inv_norm):
    """Gradient of the gathered raw rows ``[S, D]`` (never a dense ``[C, D]`` gradient)."""
    acc = inv_norm.dtype
    g = grad_normalized.to(acc)
    n = normalized.to(acc)
    return (g - n * (g * n).sum(dim=1, keepdim=True)) * inv_norm[:, None]


def gather_normalize_backward_out_ref(grad_normalized, normalized, inv_norm, out):
    """``gather_normalize_backward_ref`` into ``out`` [S, D] (which may be ``grad_normalized`` itself)."""
    out.copy_(gather_normalize_backward_ref(grad_normalized, normalized, inv_norm))


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
# Adaptive margins: per-sample margins (AdaFace) and re-weighted hard negatives (CurricularFace)


def _adaptive_margin_and_derivative(t, m1, m2, m3, clip_eps):
    """``f(t)`` and ``df/dt`` with per-sample ``m2``, ``m3`` (tensors like ``t``). With ``clip_eps > 0`` the
    angle is clipped to ``[eps, pi - eps]`` (derivative 0 where the clip or the cosine clamp holds);
    otherwise the fallback branch of ``_margin_and_derivative`` applies."""
    theta = torch.acos(t)
    angle = m1 * theta + m2
    sin_theta = torch.sqrt(torch.clamp(1.0 - t * t, min=1e-12))
    if clip_eps > 0:
        lo, hi = clip_eps, math.pi - clip_eps
        value = torch.cos(angle.clamp(lo, hi)) - m3
        inside = (angle >= lo) & (angle <= hi) & (t > -1.0 + clip_eps) & (t < 1.0 - clip_eps)
        deriv = torch.where(inside, m1 * torch.sin(angle) / sin_theta, torch.zeros_like(t))
        return value, deriv
    plain = (m2 == 0) if m1 == 1.0 else torch.zeros_like(t, dtype=torch.bool)
    in_range = angle <= math.pi
    value = torch.where(in_range, torch.cos(angle) - m3, t - m3 - m2 * torch.sin(m2))
    deriv = torch.where(in_range, m1 * torch.sin(angle) / sin_theta, torch.ones_like(t))
    return torch.where(plain, t - m3, value), torch.where(plain, torch.ones_like(t), deriv)


def _per_sample(base, sample, rows, like):
    if sample is None:
        return torch.full((rows.numel(),), base, dtype=like.dtype, device=like.device)
    return base + sample.to(like.dtype)[rows]


def _hard_negatives(logits, labels, s, hard_threshold, hard_t):
    """``(mask [B, S], logit values [B, S])`` of the stored entries: re-weighted negatives get
    ``l * (hard_t + l / s)`` (``l = s * c``), rounded to the logits' dtype; the target column is never one."""
    if hard_threshold is None:
        return None, logits
    mask = logits / s > hard_threshold.to(logits.dtype)[:, None]
    rows = torch.nonzero(labels >= 0).squeeze(1)
    mask[rows, labels[rows]] = False
    return mask, torch.where(mask, logits * (hard_t + logits / s), logits)


def margin_softmax_forward_adaptive_ref(logits, labels, s, m1, m2, m3, filter_threshold=0.0, sample_m2=None,
                                        sample_m3=None, clip_eps=0.0, hard_threshold=None, hard_t=0.0):
    """``margin_softmax_forward_ref`` with sample ``b``'s target margin ``(m1, m2 + sample_m2[b], m3 +
    sample_m3[b])``, cosines clamped to ``[-1 + clip_eps, 1 - clip_eps]`` and the target angle clipped to
    ``[clip_eps, pi - clip_eps]`` when ``clip_eps > 0``, and the non-target cosines ``c > hard_threshold[b]``
    given the logit ``s * c * (hard_t + c)``. The buffer keeps ``s * c`` for those (the backward derives their
    logit from it); the statistics are over the logits.
    """
    if not 0.0 <= clip_eps < 0.5:
        raise ValueError(f"margin_softmax_forward_adaptive: clip_eps must be in [0, 0.5), got {clip_eps}")
    logits.clamp_(-1.0 + clip_eps, 1.0 - clip_eps)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    target_cos = torch.zeros(labels.shape[0], dtype=logits.dtype, device=logits.device)
    target_cos[rows] = logits[rows, cols]
    if filter_threshold > 0 and rows.numel():
        sub = logits[rows]
        too_close = sub > filter_threshold
        too_close[torch.arange(rows.numel(), device=logits.device), cols] = False
        logits[rows] = sub.masked_fill(too_close, 0.0)
    value, _ = _adaptive_margin_and_derivative(target_cos[rows], m1, _per_sample(m2, sample_m2, rows, logits),
                                               _per_sample(m3, sample_m3, rows, logits), clip_eps)
    logits[rows, cols] = value
    logits.mul_(s)
    target_logit = torch.zeros_like(target_cos)
    target_logit[rows] = logits[rows, cols]
    _, values = _hard_negatives(logits, labels, s, hard_threshold, hard_t)
    if logits.shape[1] == 0:
        row_max = torch.full_like(target_cos, -math.inf)
        sum_exp = torch.zeros_like(target_cos)
    else:
        row_max = values.max(dim=1).values
        sum_exp = torch.exp(values - row_max[:, None]).sum(dim=1)
    return row_max, sum_exp, target_logit, target_cos


def margin_softmax_backward_adaptive_ref(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                         grad_scale, filter_threshold=0.0, sample_m2=None, sample_m3=None,
                                         clip_eps=0.0, hard_threshold=None, hard_t=0.0):
    """In place on the forward's buffer: ``d loss_sum / d cosine * grad_scale`` for the adaptive margins. A
    re-weighted negative's gradient has the factor ``hard_t + 2 c``; dropped (filtered) entries and, with
    ``clip_eps > 0``, cosines on the clamp get none."""
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    no_grad = torch.zeros_like(logits, dtype=torch.bool)
    if filter_threshold > 0 and rows.numel():
        no_grad[rows] = logits[rows] == 0
    if clip_eps > 0:
        # the clamp's bounds as the forward stored them: (bound in the logits' dtype) * s
        lo, hi = (torch.tensor(b, dtype=logits.dtype, device=logits.device) * s for b in (-1.0 + clip_eps,
                                                                                          1.0 - clip_eps))
        no_grad |= (logits <= lo) | (logits >= hi)
    no_grad[rows, cols] = False
    mask, values = _hard_negatives(logits, labels, s, hard_threshold, hard_t)
    slope = None if mask is None else torch.where(mask, hard_t + 2 * (logits / s), torch.ones_like(logits))
    grad = torch.exp(values - global_max[:, None]) / global_sum_exp[:, None]
    if slope is not None:
        grad = grad * slope
    target_p = torch.exp(logits[rows, cols] - global_max[rows]) / global_sum_exp[rows]
    _, deriv = _adaptive_margin_and_derivative(target_cos[rows], m1, _per_sample(m2, sample_m2, rows, logits),
                                               _per_sample(m3, sample_m3, rows, logits), clip_eps)
    grad[rows, cols] = (target_p - 1.0) * deriv
    logits.copy_(grad.masked_fill(no_grad, 0.0).mul_(s * grad_scale))
    return logits


# ---------------------------------------------------------------------------------------------------------
# Sub-centers (sub-center ArcFace): an identity's cosine is the max over its K sub-centers


def subcenter_max_ref(cosines, num_subcenters):
    """``(values [B, S], argmax [B, S] int64)`` of ``cosines`` [B, S*K], identity ``s`` owning the columns
    ``s*K .. s*K+K-1``: the max over each identity's K columns and the k that holds it. A tie goes to the
    lowest k; a NaN wins (the first NaN of the K), as in ``torch.max``."""
    k = int(num_subcenters)
    if k < 1 or cosines.dim() != 2 or cosines.shape[1] % k:
        raise ValueError(f"subcenter_max: cosines {list(cosines.shape)} is not [B, S*K] for num_subcenters = {k}")
    view = cosines.unflatten(1, (cosines.shape[1] // k, k))  # [B, S, K]
    values = view[:, :, 0].clone()
    argmax = torch.zeros(values.shape, dtype=torch.long, device=cosines.device)
    for j in range(1, k):
        x = view[:, :, j]
        # Strictly greater keeps the lowest k on a tie; once a NaN is held nothing replaces it.
        take = ~torch.isnan(values) & ((x > values) | torch.isnan(x))
        values = torch.where(take, x, values)
        argmax.masked_fill_(take, j)
    return values, argmax


def subcenter_max_backward_ref(grad, argmax, num_subcenters):
    """``[B, S*K]`` in grad's dtype: ``grad[b, s]`` at column ``s*K + argmax[b, s]``, zero elsewhere."""
    k = int(num_subcenters)
    if bool(((argmax < 0) | (argmax >= k)).any()):
        raise ValueError(f"subcenter_max_backward: argmax holds values outside [0, {k})")
    out = torch.zeros(grad.shape[0], grad.shape[1], k, dtype=grad.dtype, device=grad.device)
    out.scatter_(2, argmax.unsqueeze(2), grad.unsqueeze(2))
    return out.flatten(1)


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
# Sparse AdamW on the sampled rows


def sparse_adamw_update_ref(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, lr, beta1, beta2, eps,
                            weight_decay):
    """``torch.optim.AdamW`` (no amsgrad) applied to the rows ``index`` only, in place, each row with its own
    step count ``row_step[index]`` (int64 or int32 [C]) for the bias corrections.

    For each sampled row, with ``g`` its gradient (rounded to the table's dtype) and ``t = ++row_step[r]``:
    ``w *= 1 - lr * weight_decay``; ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 * v + (1 - beta2) * g * g``;
    ``w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``. Rows not in ``index`` keep weight,
    moments and step bit for bit. ``index`` must hold distinct rows.
    """
    acc = accumulation_dtype(weight.dtype)
    step = row_step.index_select(0, index) + 1
    row_step.index_copy_(0, index, step)
    t = step.to(torch.float64)
    # Per-row constants in float64, as torch.optim.AdamW forms them in Python floats.
    step_size = (lr / (1 - beta1 ** t)).to(acc)[:, None]
    bc2_sqrt = (1 - beta2 ** t).sqrt().to(acc)[:, None]
    g = grad_rows.to(weight.dtype).to(acc)
    w = weight.index_select(0, index).to(acc)
    if weight_decay:
        w = w * (1 - lr * weight_decay)
    m = exp_avg.index_select(0, index).to(acc).lerp_(g, 1 - beta1)
    v = exp_avg_sq.index_select(0, index).to(acc).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    w = w - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
    exp_avg.index_copy_(0, index, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, index, v.to(exp_avg_sq.dtype))
    weight.index_copy_(0, index, w.to(weight.dtype))


def normalize_backward_adamw_update_ref(weight, exp_avg, exp_avg_sq, row_step, index, grad_normalized, inv_norm, lr,
                                        beta1, beta2, eps, weight_decay, grad_scale=1.0):
    """``sparse_adamw_update`` of the gradient rows that ``gather_normalize_backward`` gives for
    ``grad_normalized`` [S, D], divided by ``grad_scale``; the normalized rows are recomputed from the table
    (unchanged since the forward), as in ``normalize_backward_sgd_update_ref``."""
    normalized = weight.index_select(0, index).to(inv_norm.dtype) * inv_norm[:, None]
    rows = gather_normalize_backward_ref(grad_normalized, normalized, inv_norm)
    if grad_scale != 1.0:
        rows = rows / grad_scale
    sparse_adamw_update_ref(weight, exp_avg, exp_avg_sq, row_step, index, rows, lr, beta1, beta2, eps, weight_decay)
