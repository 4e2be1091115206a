"""Margin-softmax forward statistics and in-place backward against the references."""
import pytest
import torch

from partialfc.ops import margin_softmax_backward_ref, margin_softmax_forward_ref

from ops_testutil import TOL, noncontiguous_like

ops = torch.ops.partialfc
MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4), "sphere": (30.0, 1.35, 0.0, 0.0),
           "combined": (64.0, 1.0, 0.3, 0.2), "big_m2": (16.0, 1.0, 2.5, 0.0)}


def make(batch, num_sample, dtype, device, seed=0, local_fraction=0.7):
    g = torch.Generator().manual_seed(seed)
    cosines = (torch.rand(batch, num_sample, generator=g) * 2 - 1) * 0.9
    labels = torch.randint(0, max(num_sample, 1), (batch,), generator=g)
    labels[torch.rand(batch, generator=g) > local_fraction] = -1
    if num_sample:
        # Targets near both ends of the cosine range exercise the fallback branch and the clamp.
        rows = torch.nonzero(labels >= 0).squeeze(1)
        cosines[rows[::3], labels[rows[::3]]] = -0.999
        cosines[rows[1::3], labels[rows[1::3]]] = 1.2
    return cosines.to(dtype).to(device), labels.to(device)


def run_forward(fn, logits, labels, margin, threshold):
    out = logits.clone()
    stats = fn(out, labels, *margin, threshold)
    return out, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("threshold", [0.0, 0.5])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forward_backward_match_reference(device, dtype, margin, threshold, contiguous):
    margin = MARGINS[margin]
    cosines, labels = make(24, 67, dtype, device)
    if threshold:
        cosines[0, 5] = 0.0  # an exact zero that the backward must treat like the reference does
    if not contiguous:
        cosines = noncontiguous_like(cosines)
    out, stats = run_forward(ops.margin_softmax_forward, cosines, labels, margin, threshold)
    # Half-precision storage: the reference runs in float32 on the same values (in float16 itself, its
    # 1e-12 clamp of sin^2 underflows to 0 and a target cosine of exactly 1 gives 0/0).
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref_out, ref_stats = run_forward(margin_softmax_forward_ref, cosines.to(ref_dtype), labels, margin, threshold)
    ref_out, ref_stats = ref_out.to(dtype), [t.to(dtype) for t in ref_stats]
    atol, rtol = TOL[dtype]
    scale = margin[0]
    torch.testing.assert_close(out, ref_out, atol=atol * scale, rtol=rtol)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), stats, ref_stats):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol * 4, msg=name)

    # Backward on the reference's forward output with global statistics = local ones (one rank).
    row_max, sum_exp, _, target_cos = ref_stats
    grad_scale = 1.0 / labels.numel()
    grad = ref_out.clone()
    ops.margin_softmax_backward(grad, labels, row_max, sum_exp, target_cos, *margin, grad_scale, threshold)
    ref_grad = margin_softmax_backward_ref(ref_out.to(ref_dtype), labels, row_max.to(ref_dtype),
                                           sum_exp.to(ref_dtype), target_cos.to(ref_dtype), *margin, grad_scale,
                                           threshold).to(dtype)
    torch.testing.assert_close(grad, ref_grad, atol=atol * 10, rtol=rtol * 4)


def test_degenerate_shapes(device):
    margin = MARGINS["arcface"]
    # No local target in any row.
    cosines, labels = make(5, 9, torch.float32, device, local_fraction=-1.0)
    out, stats = run_forward(ops.margin_softmax_forward, cosines, labels, margin, 0.0)
    ref_out, ref_stats = run_forward(margin_softmax_forward_ref, cosines, labels, margin, 0.0)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(stats, ref_stats):
        torch.testing.assert_close(a, b)
    # No sampled class (S = 0): row max -inf, sum 0.
    empty = torch.empty(4, 0, device=device)
    labels = torch.full((4,), -1, dtype=torch.long, device=device)
    row_max, sum_exp, target_logit, target_cos = ops.margin_softmax_forward(empty, labels, *margin, 0.0)
    assert torch.isinf(row_max).all() and (row_max < 0).all() and (sum_exp == 0).all()
    ops.margin_softmax_backward(empty, labels, row_max, sum_exp, target_cos, *margin, 1.0, 0.0)
    # Empty batch.
    none = torch.empty(0, 7, device=device)
    stats = ops.margin_softmax_forward(none, torch.empty(0, dtype=torch.long, device=device), *margin, 0.0)
    assert all(t.shape == (0,) for t in stats)


class _MarginLoss(torch.autograd.Function):
    """Mean margin cross-entropy from the two ops, so gradcheck compares the backward op with the forward op."""

    @staticmethod
    def forward(ctx, cosines, labels, margin, threshold):
        logits = cosines.detach().clone()
        row_max, sum_exp, target_logit, target_cos = ops.margin_softmax_forward(logits, labels, *margin, threshold)
        ctx.save_for_backward(logits, labels, row_max, sum_exp, target_cos)
        ctx.margin, ctx.threshold = margin, threshold
        return (row_max + torch.log(sum_exp) - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, row_max, sum_exp, target_cos = ctx.saved_tensors
        grad = logits.clone()
        ops.margin_softmax_backward(grad, labels, row_max, sum_exp, target_cos, *ctx.margin,
                                    float(grad_loss) / labels.numel(), ctx.threshold)
        return grad, None, None, None


@pytest.mark.parametrize("margin", ["arcface", "cosface", "sphere", "big_m2"])
def test_gradcheck_float64(device, margin):
    g = torch.Generator().manual_seed(3)
    cosines = ((torch.rand(6, 11, generator=g) * 1.6 - 0.8).double()).to(device).requires_grad_()
    labels = torch.tensor([0, 3, 10, 5, 7, 2], device=device)  # every row local: no -1 (its grad is exact too)
    scaled = (MARGINS[margin][0] / 16.0,) + MARGINS[margin][1:]  # a smaller scale keeps the softmax smooth
    assert torch.autograd.gradcheck(lambda c: _MarginLoss.apply(c, labels, scaled, 0.0), (cosines,))


def test_bad_input_messages():
    logits = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 3 is outside \[-1, 3\)"):
        ops.margin_softmax_forward(logits, torch.tensor([0, 3]), 64.0, 1.0, 0.5, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.margin_softmax_forward(logits, torch.tensor([0, 1], dtype=torch.int32), 64.0, 1.0, 0.5, 0.0, 0.0)


def test_opcheck():
    cosines, labels = make(6, 10, torch.float32, "cpu")
    torch.library.opcheck(ops.margin_softmax_forward, (cosines.clone(), labels, 64.0, 1.0, 0.5, 0.0, 0.0))
    logits = cosines.clone()
    row_max, sum_exp, _, target_cos = margin_softmax_forward_ref(logits, labels, 64.0, 1.0, 0.5, 0.0)
    torch.library.opcheck(ops.margin_softmax_backward, (logits, labels, row_max, sum_exp, target_cos,
                                                        64.0, 1.0, 0.5, 0.0, 0.125, 0.0))
