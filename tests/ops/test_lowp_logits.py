"""Margin softmax in place on bfloat16 / float16 logits: the result equals the float32 computation on the
same (rounded) cosines, the target's logit included, so running the margin on the GEMM's low-precision output
loses nothing against a float32 copy of it.

The float32 run on the upcast cosines is the independent reference: with s = 64 (a power of two) every stored
non-target logit is exact in the low-precision dtype, so the only rounding the in-place run may add is the
final rounding of the gradient (checked to one unit in the last place), and the statistics must equal the
float32 ones (the target's logit is taken unrounded; rounded, it would be off by up to 0.125 at s = 64).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from partialfc import PartialFC
from partialfc.ops import margin_softmax_backward_ref, margin_softmax_forward_ref
from partialfc.ops import reference
from partialfc.ops.tables import OpTable

ops = torch.ops.partialfc
ARCFACE = (64.0, 1.0, 0.5, 0.0)
LOWP = (torch.bfloat16, torch.float16)
IMPLS = {"compiled": (ops.margin_softmax_forward, ops.margin_softmax_backward),
         "reference": (margin_softmax_forward_ref, margin_softmax_backward_ref)}
ADAPTIVE = {"compiled": (ops.margin_softmax_forward_adaptive, ops.margin_softmax_backward_adaptive),
            "reference": (reference.margin_softmax_forward_adaptive_ref,
                          reference.margin_softmax_backward_adaptive_ref)}


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def cosines(batch, cols, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos = ((torch.rand(batch, cols, generator=g) * 2 - 1) * 0.6).to(dtype)
    labels = torch.randint(0, cols, (batch,), generator=g)
    labels[::5] = -1  # samples whose class lives on another rank
    cos[torch.arange(batch), labels.clamp(min=0)] = torch.linspace(0.2, 0.95, batch).to(dtype)
    return cos.to(device), labels.to(device)


def ulp_diff(a, b):
    """Largest difference of ``a`` (low precision) from ``b`` (float32) in units of ``a``'s last place, over
    the entries above 1e-6 of the largest (the compiled float32 kernels' vector exp is accurate to float32's
    precision relative to the row, not on probabilities far below it); below the smallest normal number the
    unit is the subnormals' spacing."""
    info = torch.finfo(a.dtype)
    keep = b.abs() >= 1e-6 * b.abs().max()
    unit = b.abs()[keep].clamp(min=info.tiny) * info.eps
    return float(((a.float() - b)[keep] / unit).abs().max())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("layout", ["rows", "class_major"])
def test_in_place_equals_float32_on_the_same_cosines(device, impl, dtype, layout):
    forward, backward = IMPLS[impl]
    cos, labels = cosines(48, 3000, dtype, device)
    low = cos.clone() if layout == "rows" else cos.t().contiguous().t()
    full = cos.float()
    stats_low = forward(low, labels, *ARCFACE, 0.0)
    stats_full = forward(full, labels, *ARCFACE, 0.0)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), stats_low, stats_full):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # summation order only
    # The stored logits are the float32 ones rounded once (exactly equal off the target: s is a power of two).
    off_target = torch.ones_like(full, dtype=torch.bool)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    off_target[rows, labels[rows]] = False
    assert torch.equal(low.float()[off_target], full[off_target])
    _, gmax, gsum = (None, stats_full[0], stats_full[1])
    backward(low, labels, gmax, gsum, stats_full[3], *ARCFACE, 1.0 / 48, 0.0)
    backward(full, labels, gmax, gsum, stats_full[3], *ARCFACE, 1.0 / 48, 0.0)
    assert ulp_diff(low, full) <= 1.0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", list(ADAPTIVE))
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_adaptive_target_logit_is_unrounded(device, impl, dtype):
    # AdaFace-like per-sample margins: the target's logit and the target column's gradient as in float32.
    forward, backward = ADAPTIVE[impl]
    cos, labels = cosines(32, 2000, dtype, device, seed=1)
    g = torch.Generator().manual_seed(2)
    m2 = (torch.rand(32, generator=g) * 0.2 - 0.1).to(device)
    m3 = (torch.rand(32, generator=g) * 0.1).to(device)
    extra = dict(sample_m2=m2, sample_m3=m3, clip_eps=0.001, hard_threshold=None, hard_t=0.0)
    low, full = cos.clone(), cos.float()
    stats_low = forward(low, labels, 64.0, 1.0, 0.4, 0.0, 0.0, **extra)
    stats_full = forward(full, labels, 64.0, 1.0, 0.4, 0.0, 0.0, **extra)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), stats_low, stats_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # summation order only
    backward(low, labels, stats_full[0], stats_full[1], stats_full[3], 64.0, 1.0, 0.4, 0.0, 1.0 / 32, 0.0, **extra)
    backward(full, labels, stats_full[0], stats_full[1], stats_full[3], 64.0, 1.0, 0.4, 0.0, 1.0 / 32, 0.0, **extra)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    assert ulp_diff(low[rows, labels[rows]], full[rows, labels[rows]]) <= 1.0
    assert ulp_diff(low, full) <= 1.0


def dense_arcface_grad(x, w, y, s=64.0, m=0.5):
    """d loss / d (normalized centers) [C, D] in float64 from the bf16-rounded normalized inputs, the GEMM's
    inputs of a bf16 step."""
    xn = F.normalize(x.double(), dim=1).to(torch.bfloat16).double()
    wn = F.normalize(w.double(), dim=1).to(torch.bfloat16).double().requires_grad_(True)
    cos = xn @ wn.t()
    t = cos.gather(1, y[:, None]).clamp(-1, 1)
    theta = torch.acos(t) + m
    target = torch.where(theta <= math.pi, torch.cos(theta), t - m * math.sin(m))
    F.cross_entropy(cos.scatter(1, y[:, None], target) * s, y).backward()
    return wn.grad


@pytest.mark.parametrize("use_ext", [True, False], ids=["compiled", "reference"])
def test_head_in_place_step_is_as_accurate_as_the_float32_copy(monkeypatch, use_ext):
    # The head under bf16 autocast, its margin once on a float32 copy of the logits and once in place: the
    # centers' gradient of both equals the float64 model's to the same accuracy, and they agree closely.
    C, B, D = 3000, 48, 64
    grads = {}
    for in_place in (False, True):
        monkeypatch.setattr(OpTable, "margin_in_compute_dtype", property(lambda self, v=in_place: v))
        pfc = PartialFC(D, C, 1.0, ARCFACE, use_ext=use_ext)
        with torch.no_grad():
            pfc.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pfc(x, y)
        loss.backward()
        grads[in_place] = pfc.center_grad.normalized_grad.double()
    ref = dense_arcface_grad(x.detach(), pfc.weight.detach(), y)
    err = {k: float((g - ref).norm() / ref.norm()) for k, g in grads.items()}
    assert err[True] <= 1.05 * err[False] + 1e-6, err
    assert float((grads[True] - grads[False]).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_opcheck_on_low_precision_logits(dtype):
    # Schema, fake (meta) kernels and the float32 statistics of bfloat16/float16 logits, with filtering on.
    cos, labels = cosines(6, 40, dtype, "cpu", seed=3)
    stats = ops.margin_softmax_forward(cos.clone(), labels, *ARCFACE, 0.3)
    torch.library.opcheck(ops.margin_softmax_forward, (cos.clone(), labels, *ARCFACE, 0.3))
    logits = cos.clone()
    ops.margin_softmax_forward(logits, labels, *ARCFACE, 0.3)
    torch.library.opcheck(ops.margin_softmax_backward, (logits, labels, stats[0], stats[1], stats[3], *ARCFACE,
                                                        0.5, 0.3))
