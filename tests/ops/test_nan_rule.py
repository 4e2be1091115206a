"""The NaN rule of the margin ops (docs/kernels.md): a NaN in a row makes that row's max, sum-exp, loss and
gradients NaN on every table and device, other rows unaffected; a cosine of +-inf is clamped to +-1."""
import pytest
import torch

from partialfc.ops import (margin_softmax_backward_adaptive_ref, margin_softmax_backward_ref,
                           margin_softmax_forward_adaptive_ref, margin_softmax_forward_ref)

ops = torch.ops.partialfc
ARC = (64.0, 1.0, 0.5, 0.0)


def make(batch, cols, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    cosines = (torch.rand(batch, cols, generator=g) * 1.6 - 0.8)
    labels = torch.randint(0, cols, (batch,), generator=g)
    labels[1] = -1
    cosines[2, 7] = float("nan")  # a non-target column
    cosines[4, labels[4]] = float("nan")  # the target column
    return cosines.to(dtype).to(device), labels.to(device)


def variants():
    # (forward op, backward op, forward reference, backward reference, extra keyword arguments)
    yield "fixed", (ops.margin_softmax_forward, ops.margin_softmax_backward, margin_softmax_forward_ref,
                    margin_softmax_backward_ref, {})
    yield "adaface", (ops.margin_softmax_forward_adaptive, ops.margin_softmax_backward_adaptive,
                      margin_softmax_forward_adaptive_ref, margin_softmax_backward_adaptive_ref,
                      dict(sample_m2=torch.full((8,), 0.05), sample_m3=torch.full((8,), 0.01), clip_eps=1e-3,
                           hard_threshold=None, hard_t=0.0))
    yield "curricular", (ops.margin_softmax_forward_adaptive, ops.margin_softmax_backward_adaptive,
                         margin_softmax_forward_adaptive_ref, margin_softmax_backward_adaptive_ref,
                         dict(sample_m2=None, sample_m3=None, clip_eps=0.0, hard_threshold=torch.full((8,), 0.3),
                              hard_t=0.2))


VARIANTS = dict(variants())


def call(fn, args, kwargs, device, ref):
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    if not kwargs:
        return fn(*args)
    if ref:
        return fn(*args, **kw)
    return fn(*args, kw["sample_m2"], kw["sample_m3"], kw["clip_eps"], kw["hard_threshold"], kw["hard_t"])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cols", [37, 9000])  # 9000: the CUDA split-row forward
def test_nan_row_is_nan_everywhere_else_finite(device, variant, dtype, cols):
    fwd, bwd, fwd_ref, bwd_ref, kwargs = VARIANTS[variant]
    cosines, labels = make(8, cols, dtype, device)
    nan_rows, others = torch.tensor([2, 4]), torch.tensor([0, 1, 3, 5, 6, 7])
    results = []
    for f, b, ref in ((fwd, bwd, False), (fwd_ref, bwd_ref, True)):
        logits = cosines.clone()
        stats = call(f, (logits, labels) + ARC + (0.0,), kwargs, device, ref)
        row_max, sum_exp, target_logit, target_cos = stats
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert all(t.dtype == acc for t in stats)
        loss = row_max + torch.log(sum_exp) - target_logit
        assert torch.isnan(row_max[nan_rows]).all() and torch.isnan(sum_exp[nan_rows]).all()
        assert torch.isnan(loss[nan_rows]).all() and torch.isfinite(loss[others]).all()
        grad = logits.clone()
        call(b, (grad, labels, row_max, sum_exp, target_cos) + ARC + (1.0 / 8, 0.0), kwargs, device, ref)
        assert torch.isnan(grad[nan_rows].float()).all()
        assert torch.isfinite(grad[others].float()).all()
        results.append((row_max, sum_exp, grad))
    (a_max, a_sum, a_grad), (r_max, r_sum, r_grad) = results
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a_max, r_max, equal_nan=True, **tol)
    torch.testing.assert_close(a_sum, r_sum, equal_nan=True, **tol)
    torch.testing.assert_close(a_grad, r_grad, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infinite_cosines_clamp_to_one(device, dtype):
    """+-inf cosines are clamped to +-1 (the math of clamp), so the row stays finite and equals the row
    holding +-1 bit for bit."""
    cosines, labels = make(8, 300, dtype, device)
    cosines[2, 7] = 0.5
    cosines[4, labels[4]] = 0.5
    inf, ones = cosines.clone(), cosines.clone()
    inf[3, 10], inf[3, 11], ones[3, 10], ones[3, 11] = float("inf"), -float("inf"), 1.0, -1.0
    inf[5, labels[5]], ones[5, labels[5]] = float("inf"), 1.0
    a, b = inf.clone(), ones.clone()
    stats_a = ops.margin_softmax_forward(a, labels, *ARC, 0.0)
    stats_b = ops.margin_softmax_forward(b, labels, *ARC, 0.0)
    assert torch.equal(a, b)
    for x, y in zip(stats_a, stats_b):
        assert torch.isfinite(x).all() and torch.equal(x, y)
