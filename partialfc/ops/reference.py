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


def margin_softmax_forward_ref(logits, labels, s, m1, m2, m3, filter_threshold=0.0, store_logits=True):
    """In place on ``logits [B, S]`` (cosines): clamp, margin on the target column, optional inter-class
    filtering, scale by ``s``. Returns the per-row statistics the distributed combine needs:
    ``(row_max [B], sum_exp [B] relative to row_max, target_logit [B], target_cos [B])``; the last two are 0
    in rows whose target lives on another rank (``labels == -1``).

    bfloat16 / float16 logits are transformed in float32 and stored rounded once; the statistics are float32
    (float64 for float64 logits) and those of the stored values, except the target's: its logit enters the
    statistics (and ``target_logit``) unrounded, because at s = 64 a bfloat16 logit is off by up to 0.125,
    which would move every probability of the row by up to 13%; the backward recomputes it from
    ``target_cos``. NaN rule: a NaN in a row makes its row max, sum-exp (and so its loss) NaN; a cosine of
    +-inf is clamped to +-1 like any other.

    ``store_logits=False``: ``logits`` keep the cosines (the same statistics); the backward then takes
    ``from_cosines=True``.
    """
    if not store_logits:
        return margin_softmax_forward_ref(logits.clone(), labels, s, m1, m2, m3, filter_threshold)
    acc = accumulation_dtype(logits.dtype)
    cosines = logits.to(acc).clamp_(-1.0, 1.0)  # logits itself when they hold the accumulation dtype
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    target_cos = torch.zeros(labels.shape[0], dtype=acc, device=logits.device)
    target_cos[rows] = cosines[rows, cols]
    if filter_threshold > 0:
        # Non-target classes too close to the sample are probably mislabeled duplicates: drop their logit, in
        # every row (a sample whose target lives on another rank is filtered here as it is there).
        too_close = cosines > filter_threshold
        too_close[rows, cols] = False
        cosines.masked_fill_(too_close, 0.0)
    value, _ = _margin_and_derivative(target_cos[rows], m1, m2, m3)
    cosines[rows, cols] = value
    cosines.mul_(s)
    target_logit = torch.zeros_like(target_cos)
    target_logit[rows] = cosines[rows, cols]  # unrounded (the stored value itself in float32 / float64)
    if cosines is not logits:
        logits.copy_(cosines)
    values = logits.to(acc)  # the stored logits
    values[rows, cols] = target_logit[rows]
    if logits.shape[1] == 0:
        row_max = torch.full_like(target_cos, -math.inf)
        sum_exp = torch.zeros_like(target_cos)
    else:
        row_max = values.max(dim=1).values  # NaN when the row holds one
        sum_exp = torch.exp(values - row_max[:, None]).sum(dim=1)
    return row_max, sum_exp, target_logit, target_cos


def fold_grad_absmax_ref(grad_absmax, grad):
    """``grad_absmax`` (float32, one element) becomes the larger of itself and the largest ``|grad|`` as
    stored, NaN when ``grad`` holds a NaN (the margin backward's ``grad_absmax`` argument)."""
    if grad_absmax is None or grad.numel() == 0:
        return
    if grad_absmax.dtype != torch.float32 or grad_absmax.numel() != 1:
        raise RuntimeError(f"grad_absmax must be a float32 tensor of one element, got {grad_absmax.dtype} "
                           f"{list(grad_absmax.shape)}")
    largest = grad.abs().amax().to(torch.float32)  # amax propagates NaN
    grad_absmax.copy_(torch.maximum(grad_absmax.abs(), largest).reshape(grad_absmax.shape))


def margin_softmax_backward_ref(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                grad_scale, filter_threshold=0.0, grad_absmax=None, from_cosines=False):
    """In place on the scaled logits ``[B, S]`` of the forward: ``d loss_sum / d cosine * grad_scale``.

    ``grad[b, j] = (softmax[b, j] - onehot[b, j]) * s * grad_scale``, times ``df/dt`` on the target column.
    With filtering, the dropped logits (exactly 0 after the forward) get no gradient. bfloat16 / float16 logits
    are computed in float32 and the gradient stored rounded once. A row with NaN statistics gets NaN
    gradients (the dropped logits keep 0). ``grad_absmax``: see ``fold_grad_absmax_ref``. ``from_cosines``:
    ``logits`` hold the cosines (a forward with ``store_logits=False``), each logit is derived as that forward
    would have stored it.
    """
    if from_cosines:
        margin_softmax_forward_ref(logits, labels, s, m1, m2, m3, filter_threshold)
    grad = logits.to(accumulation_dtype(logits.dtype))  # logits itself when they hold the accumulation dtype
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    if filter_threshold > 0:
        dropped = grad == 0
        dropped[rows, cols] = False
    value, deriv = _margin_and_derivative(target_cos[rows], m1, m2, m3)
    grad[rows, cols] = value * s  # the target's logit unrounded, as the forward's statistics have it
    grad.sub_(global_max[:, None]).exp_().div_(global_sum_exp[:, None])
    grad[rows, cols] -= 1.0
    grad[rows, cols] *= deriv
    if filter_threshold > 0:
        grad.masked_fill_(dropped, 0.0)
    grad.mul_(s * grad_scale)
    if grad is not logits:
        logits.copy_(grad)
    fold_grad_absmax_ref(grad_absmax, logits)
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


def _hard_negatives(values, labels, s, hard_threshold, hard_t, dtype):
    """``(mask [B, S], logit values [B, S])`` of the stored entries ``values`` (in the accumulation dtype):
    re-weighted negatives get ``l * (hard_t + l / s)`` (``l = s * c``), rounded to the logits' ``dtype``; the
    target column is never one."""
    if hard_threshold is None:
        return None, values
    mask = values / s > hard_threshold.to(values.dtype)[:, None]
    rows = torch.nonzero(labels >= 0).squeeze(1)
    mask[rows, labels[rows]] = False
    return mask, torch.where(mask, (values * (hard_t + values / s)).to(dtype).to(values.dtype), values)


def margin_softmax_forward_adaptive_ref(logits, labels, s, m1, m2, m3, filter_threshold=0.0, sample_m2=None,
                                        sample_m3=None, clip_eps=0.0, hard_threshold=None, hard_t=0.0,
                                        store_logits=True):
    """``margin_softmax_forward_ref`` with sample ``b``'s target margin ``(m1, m2 + sample_m2[b], m3 +
    sample_m3[b])``, cosines clamped to ``[-1 + clip_eps, 1 - clip_eps]`` and the target angle clipped to
    ``[clip_eps, pi - clip_eps]`` when ``clip_eps > 0``, and the non-target cosines ``c > hard_threshold[b]``
    given the logit ``s * c * (hard_t + c)``. The buffer keeps ``s * c`` for those (the backward derives their
    logit from it); the statistics are over the logits. ``store_logits``: as in ``margin_softmax_forward_ref``.
    """
    if not store_logits:
        return margin_softmax_forward_adaptive_ref(logits.clone(), labels, s, m1, m2, m3, filter_threshold, sample_m2,
                                                   sample_m3, clip_eps, hard_threshold, hard_t)
    if not 0.0 <= clip_eps < 0.5:
        raise ValueError(f"margin_softmax_forward_adaptive: clip_eps must be in [0, 0.5), got {clip_eps}")
    acc = accumulation_dtype(logits.dtype)
    cosines = logits.to(acc).clamp_(-1.0 + clip_eps, 1.0 - clip_eps)  # as in margin_softmax_forward_ref
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    target_cos = torch.zeros(labels.shape[0], dtype=acc, device=logits.device)
    target_cos[rows] = cosines[rows, cols]
    if filter_threshold > 0:  # every row, as in margin_softmax_forward_ref
        too_close = cosines > filter_threshold
        too_close[rows, cols] = False
        cosines.masked_fill_(too_close, 0.0)
    value, _ = _adaptive_margin_and_derivative(target_cos[rows], m1, _per_sample(m2, sample_m2, rows, cosines),
                                               _per_sample(m3, sample_m3, rows, cosines), clip_eps)
    cosines[rows, cols] = value
    cosines.mul_(s)
    target_logit = torch.zeros_like(target_cos)
    target_logit[rows] = cosines[rows, cols]  # unrounded, as in margin_softmax_forward_ref
    if cosines is not logits:
        logits.copy_(cosines)
    stored = logits.to(acc)
    _, values = _hard_negatives(stored, labels, s, hard_threshold, hard_t, logits.dtype)
    values[rows, cols] = target_logit[rows]
    if logits.shape[1] == 0:
        row_max = torch.full_like(target_cos, -math.inf)
        sum_exp = torch.zeros_like(target_cos)
    else:
        row_max = values.max(dim=1).values
        sum_exp = torch.exp(values - row_max[:, None]).sum(dim=1)
    return row_max, sum_exp, target_logit, target_cos


def margin_softmax_backward_adaptive_ref(logits, labels, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                         grad_scale, filter_threshold=0.0, sample_m2=None, sample_m3=None,
                                         clip_eps=0.0, hard_threshold=None, hard_t=0.0, grad_absmax=None,
                                         from_cosines=False):
    """In place on the forward's buffer: ``d loss_sum / d cosine * grad_scale`` for the adaptive margins. A
    re-weighted negative's gradient has the factor ``hard_t + 2 c``; dropped (filtered) entries and, with
    ``clip_eps > 0``, cosines on the clamp get none. ``grad_absmax``, ``from_cosines``: as in
    ``margin_softmax_backward_ref``."""
    if from_cosines:
        margin_softmax_forward_adaptive_ref(logits, labels, s, m1, m2, m3, filter_threshold, sample_m2, sample_m3,
                                            clip_eps, hard_threshold, hard_t)
    acc = accumulation_dtype(logits.dtype)
    stored = logits.to(acc)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    no_grad = torch.zeros_like(logits, dtype=torch.bool)
    if filter_threshold > 0:
        no_grad |= stored == 0
    if clip_eps > 0:
        # the clamp's bounds as the forward stored them: bound * s (in the accumulation dtype), rounded
        lo, hi = ((torch.tensor(b, dtype=acc, device=logits.device) * s).to(logits.dtype).to(acc)
                  for b in (-1.0 + clip_eps, 1.0 - clip_eps))
        no_grad |= (stored <= lo) | (stored >= hi)
    no_grad[rows, cols] = False
    mask, values = _hard_negatives(stored, labels, s, hard_threshold, hard_t, logits.dtype)
    slope = None if mask is None else torch.where(mask, hard_t + 2 * (stored / s), torch.ones_like(stored))
    grad = torch.exp(values - global_max[:, None]) / global_sum_exp[:, None]
    if slope is not None:
        grad = grad * slope
    value, deriv = _adaptive_margin_and_derivative(target_cos[rows], m1, _per_sample(m2, sample_m2, rows, stored),
                                                   _per_sample(m3, sample_m3, rows, stored), clip_eps)
    # the target's logit unrounded, as the forward's statistics have it
    target_p = torch.exp(value * s - global_max[rows]) / global_sum_exp[rows]
    grad[rows, cols] = (target_p - 1.0) * deriv
    logits.copy_(grad.masked_fill(no_grad, 0.0).mul_(s * grad_scale))
    fold_grad_absmax_ref(grad_absmax, logits)
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
# Stochastic rounding of the updates' float32 results to a bfloat16 / float16 table
# (csrc/ops/stochastic_rounding.h: the same hash and rounding, bit for bit)

_MASK32 = 0xFFFFFFFF
ROUND_WEIGHT, ROUND_MOMENTUM, ROUND_EXP_AVG_SQ = 0, 1, 2  # one stream of random bits per rounded tensor


def _mul32(x, c):
    """``x * c mod 2^32`` for ``x`` in [0, 2^32) (int64 tensor or int) without leaving int64's range."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """lowbias32, a bijective 32-bit finalizer, on ints or int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_row_keys(seed, step, classes):
    """The hash of ``(seed, step, class id)`` for each of ``classes`` (int64 [S] global class ids)."""
    k = _mix32((seed & _MASK32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & _MASK32))
    k = _mix32(k ^ (step & _MASK32))
    k = _mix32((classes & _MASK32) ^ k)
    return _mix32(k ^ ((classes >> 32) & _MASK32))


def _as_float32(bits):
    """float32 tensor with the bit patterns ``bits`` (int64 holding [0, 2^32))."""
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def stochastic_round_ref(values, dtype, row_keys, stream):
    """``values`` [S, D] (float32) rounded to ``dtype`` (bfloat16 or float16) stochastically: to the next
    representable value above with probability (distance from the one below) / (their spacing), so the expected
    result is the value itself. The random bits of element (i, j) are ``mix32(row_keys[i] ^ (4 j + stream))``."""
    cols = torch.arange(values.shape[1], device=values.device, dtype=torch.int64)
    bits = _mix32(row_keys[:, None] ^ ((cols * 4 + stream) & _MASK32)[None, :])  # [S, D]
    u = values.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    mag, sign = u & 0x7FFFFFFF, u & 0x80000000
    special = mag >= 0x7F800000  # inf, NaN: converted as they are
    if dtype == torch.bfloat16:
        rounded = _as_float32((u + (bits & 0xFFFF)) & 0xFFFF0000).to(dtype)
    elif dtype == torch.float16:
        # Normal float16 range: carry over the 13 dropped mantissa bits; subnormal range: multiples of 2^-24.
        normal = _as_float32(((mag + (bits & 0x1FFF)) & ~0x1FFF) | sign)
        scaled = _as_float32(mag) * 16777216.0
        whole = torch.floor(scaled)
        draw = (bits >> 8).to(torch.float32) * (1.0 / 16777216.0)
        q = torch.where(draw < scaled - whole, whole + 1.0, whole) * (1.0 / 16777216.0)
        sub = _as_float32((q.view(torch.int32).to(torch.int64) & _MASK32) | sign)
        rounded = torch.where(mag >= 0x38800000, normal, sub).to(dtype)
    else:
        raise ValueError(f"stochastic_round_ref: dtype must be bfloat16 or float16, got {dtype}")
    return torch.where(special, values.to(dtype), rounded)


def _stochastic(weight, rounding_seed):
    return rounding_seed is not None and weight.dtype in (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Sparse SGD with momentum on the sampled rows


def sparse_sgd_update_ref(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay, rounding_seed=None,
                          rounding_step=0, class_start=0):
    """``torch.optim.SGD`` (dampening 0, no Nesterov) applied to the rows ``index`` only, in place.

    With ``rounding_seed``, a bfloat16 / float16 table takes the update in float32 (the gradient as it comes)
    and momentum and weight are written with ``stochastic_round_ref``, keyed by ``(rounding_seed,
    rounding_step, class_start + index)``; otherwise rounded to nearest."""
    if _stochastic(weight, rounding_seed):
        w = weight.index_select(0, index).float()
        mv = momentum_buffer.index_select(0, index).float() * momentum + (grad_rows.float() + weight_decay * w)
        keys = rounding_row_keys(int(rounding_seed), int(rounding_step), index + class_start)
        momentum_buffer.index_copy_(0, index, stochastic_round_ref(mv, weight.dtype, keys, ROUND_MOMENTUM))
        weight.index_copy_(0, index, stochastic_round_ref(w - lr * mv, weight.dtype, keys, ROUND_WEIGHT))
        return
    w = weight.index_select(0, index)
    g = grad_rows.to(weight.dtype)
    if weight_decay:
        g = g + weight_decay * w
    m = momentum_buffer.index_select(0, index).mul_(momentum).add_(g)
    momentum_buffer.index_copy_(0, index, m)
    weight.index_copy_(0, index, w - lr * m)


def normalize_backward_sgd_update_ref(weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum,
                                      weight_decay, grad_scale=1.0, rounding_seed=None, rounding_step=0, class_start=0):
    """``sparse_sgd_update`` of the gradient rows that ``gather_normalize_backward`` gives for
    ``grad_normalized`` [S, D] (the gradient of the normalized rows), divided by ``grad_scale``.

    The normalized rows are recomputed as ``weight[index] * inv_norm`` (in the accumulation dtype), so the
    table must be unchanged since the forward that produced ``inv_norm``.
    """
    normalized = weight.index_select(0, index).to(inv_norm.dtype) * inv_norm[:, None]
    rows = gather_normalize_backward_ref(grad_normalized, normalized, inv_norm)
    if grad_scale != 1.0:
        rows = rows / grad_scale
    sparse_sgd_update_ref(weight, momentum_buffer, index, rows, lr, momentum, weight_decay, rounding_seed,
                          rounding_step, class_start)


# ---------------------------------------------------------------------------------------------------------
# Sparse AdamW on the sampled rows


def sparse_adamw_update_ref(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, lr, beta1, beta2, eps,
                            weight_decay, rounding_seed=None, rounding_step=0, class_start=0):
    """``torch.optim.AdamW`` (no amsgrad) applied to the rows ``index`` only, in place, each row with its own
    step count ``row_step[index]`` (int64 or int32 [C]) for the bias corrections.

    For each sampled row, with ``g`` its gradient (rounded to the table's dtype) and ``t = ++row_step[r]``:
    ``w *= 1 - lr * weight_decay``; ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 * v + (1 - beta2) * g * g``;
    ``w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``. Rows not in ``index`` keep weight,
    moments and step bit for bit. ``index`` must hold distinct rows.

    A bfloat16 / float16 table keeps ``exp_avg`` in its dtype and ``exp_avg_sq`` in its dtype or float32; the
    math runs in float32, and with ``rounding_seed`` the gradient is used as it comes and the three results are
    written with ``stochastic_round_ref`` (as in ``sparse_sgd_update_ref``).
    """
    acc = accumulation_dtype(weight.dtype)
    step = row_step.index_select(0, index) + 1
    row_step.index_copy_(0, index, step)
    t = step.to(torch.float64)
    # Per-row constants in float64, as torch.optim.AdamW forms them in Python floats.
    step_size = (lr / (1 - beta1 ** t)).to(acc)[:, None]
    bc2_sqrt = (1 - beta2 ** t).sqrt().to(acc)[:, None]
    if _stochastic(weight, rounding_seed):
        # The kernels' order of operations, one float32 rounding each.
        g = grad_rows.float()
        w = weight.index_select(0, index).float() * (1 - lr * weight_decay)
        m0 = exp_avg.index_select(0, index).float()
        m = m0 + (1 - beta1) * (g - m0)
        v = exp_avg_sq.index_select(0, index).float() * beta2 + ((1 - beta2) * g) * g
        w = w - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
        keys = rounding_row_keys(int(rounding_seed), int(rounding_step), index + class_start)
        exp_avg.index_copy_(0, index, stochastic_round_ref(m, exp_avg.dtype, keys, ROUND_MOMENTUM))
        if exp_avg_sq.dtype == torch.float32:
            exp_avg_sq.index_copy_(0, index, v)
        else:
            exp_avg_sq.index_copy_(0, index, stochastic_round_ref(v, exp_avg_sq.dtype, keys, ROUND_EXP_AVG_SQ))
        weight.index_copy_(0, index, stochastic_round_ref(w, weight.dtype, keys, ROUND_WEIGHT))
        return
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
                                        beta1, beta2, eps, weight_decay, grad_scale=1.0, rounding_seed=None,
                                        rounding_step=0, class_start=0):
    """``sparse_adamw_update`` of the gradient rows that ``gather_normalize_backward`` gives for
    ``grad_normalized`` [S, D], divided by ``grad_scale``; the normalized rows are recomputed from the table
    (unchanged since the forward), as in ``normalize_backward_sgd_update_ref``."""
    normalized = weight.index_select(0, index).to(inv_norm.dtype) * inv_norm[:, None]
    rows = gather_normalize_backward_ref(grad_normalized, normalized, inv_norm)
    if grad_scale != 1.0:
        rows = rows / grad_scale
    sparse_adamw_update_ref(weight, exp_avg, exp_avg_sq, row_step, index, rows, lr, beta1, beta2, eps, weight_decay,
                            rounding_seed, rounding_step, class_start)
