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


def class_major(t):
    """The same values as ``t`` [B, S] held class by class: the transpose of a contiguous [S, B] buffer, the
    layout of the fused head's logits on CPU."""
    view = t.t().clone(memory_format=torch.contiguous_format).t()  # always a copy
    assert view.stride() == (1, t.shape[0])
    return view


def copy_layout(t):
    """A copy of ``t`` in the same layout (contiguous, class-major or strided); ``clone`` would make a strided
    view contiguous."""
    if t.is_contiguous():
        return t.clone()
    if t.dim() == 2 and t.stride() == (1, t.shape[0]):
        return class_major(t)
    return noncontiguous_like(t)


def run_forward(fn, logits, labels, margin, threshold):
    out = copy_layout(logits)
    stats = fn(out, labels, *margin, threshold)
    return out, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("threshold", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "class_major"])
def test_forward_backward_match_reference(device, dtype, margin, threshold, layout):
    margin = MARGINS[margin]
    cosines, labels = make(24, 67, dtype, device)
    if threshold:
        cosines[0, 5] = 0.0  # an exact zero that the backward must treat like the reference does
    if layout == "strided":
        cosines = noncontiguous_like(cosines)
    elif layout == "class_major":
        cosines = class_major(cosines)
    out, stats = run_forward(ops.margin_softmax_forward, cosines, labels, margin, threshold)
    assert out.stride() == cosines.stride()  # the layout's kernel ran
    # Half-precision storage: the reference runs in float32 on the same values (in float16 itself, its
    # 1e-12 clamp of sin^2 underflows to 0 and a target cosine of exactly 1 gives 0/0).
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref_out, ref_stats = run_forward(margin_softmax_forward_ref, cosines.to(ref_dtype), labels, margin, threshold)
    ref_out = ref_out.to(dtype)
    # The statistics are float32 for half-precision logits (float64 for float64).
    ref_stats = [t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in ref_stats]
    atol, rtol = TOL[dtype]
    scale = margin[0]
    torch.testing.assert_close(out, ref_out, atol=atol * scale, rtol=rtol)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), stats, ref_stats):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol * 4, msg=name)

    # Backward on the reference's forward output with global statistics = local ones (one rank).
    row_max, sum_exp, _, target_cos = ref_stats
    grad_scale = 1.0 / labels.numel()
    grad = copy_layout(cosines).copy_(ref_out)  # the reference's values in the layout under test
    ops.margin_softmax_backward(grad, labels, row_max, sum_exp, target_cos, *margin, grad_scale, threshold)
    assert grad.stride() == cosines.stride()
    ref_grad = margin_softmax_backward_ref(ref_out.to(ref_dtype), labels, row_max.to(ref_dtype),
                                           sum_exp.to(ref_dtype), target_cos.to(ref_dtype), *margin, grad_scale,
                                           threshold).to(dtype)
    torch.testing.assert_close(grad, ref_grad, atol=atol * 10, rtol=rtol * 4)


@pytest.mark.parametrize("batch", [13, 128])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_class_major_equals_row_major_over_many_blocks(batch, threshold):
    """The class-major kernels (blocks of class rows, per-sample statistics combined across blocks) give the
    row-major kernels' results; 9000 classes span several blocks, a batch of 13 leaves a partial vector."""
    margin = MARGINS["arcface"]
    cosines, labels = make(batch, 9000, torch.float32, "cpu", seed=batch)
    # make() puts targets at the clamp (|cos| ~ 1), where float32 (p - 1) * dm/dcos cancels to 0 in either
    # layout; here the float64 reference is compared too, so keep them inside
    cosines[cosines.abs() > 0.95] = 0.3
    labels[0], labels[1], labels[2] = 0, 8999, 5041  # first and last class, a block boundary for batch 13
    if threshold:
        cosines[3, 17] = 0.0
    rows_out, rows_stats = run_forward(ops.margin_softmax_forward, cosines, labels, margin, threshold)
    cols_out, cols_stats = run_forward(ops.margin_softmax_forward, class_major(cosines), labels, margin, threshold)
    torch.testing.assert_close(cols_out, rows_out, atol=0, rtol=0)  # elementwise: the same float operations
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), cols_stats, rows_stats):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)  # sums in another order
    ref_out, ref_stats = run_forward(margin_softmax_forward_ref, cosines.double(), labels, margin, threshold)
    torch.testing.assert_close(cols_stats[1].double(), ref_stats[1], rtol=1e-5, atol=0)
    row_max, sum_exp, _, target_cos = rows_stats
    grads = []
    for out in (rows_out, cols_out):
        grad = out.clone()
        ops.margin_softmax_backward(grad, labels, row_max, sum_exp, target_cos, *margin, 1.0 / batch, threshold)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-9, rtol=1e-6)
    ref_grad = margin_softmax_backward_ref(ref_out, labels, *(t.double() for t in (row_max, sum_exp)),
                                           target_cos.double(), *margin, 1.0 / batch, threshold)
    torch.testing.assert_close(grads[1].double(), ref_grad, atol=1e-8, rtol=1e-5)


def test_class_major_nan_reaches_the_sum():
    """A NaN logit makes its sample's max and sum NaN (the NaN rule), in both layouts (the trainer then skips
    the step); the other samples stay finite."""
    cosines, labels = make(16, 6000, torch.float32, "cpu", seed=4)
    cosines[5, 5500] = float("nan")
    others = torch.arange(16) != 5
    for logits in (cosines.clone(), class_major(cosines)):
        row_max, sum_exp, _, _ = ops.margin_softmax_forward(logits, labels, *MARGINS["cosface"], 0.0)
        assert torch.isnan(row_max[5]) and torch.isfinite(row_max[others]).all()
        assert torch.isnan(sum_exp[5]) and torch.isfinite(sum_exp[others]).all()


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
    # the class-major kernels (clone keeps the layout of the input)
    assert torch.autograd.gradcheck(lambda c: _MarginLoss.apply(class_major(c), labels, scaled, 0.0), (cosines,))


def test_bad_input_messages():
    logits = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 3 is outside \[-1, 3\)"):
        ops.margin_softmax_forward(logits, torch.tensor([0, 3]), 64.0, 1.0, 0.5, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.margin_softmax_forward(logits, torch.tensor([0, 1], dtype=torch.int32), 64.0, 1.0, 0.5, 0.0, 0.0)


@pytest.mark.parametrize("layout", ["contiguous", "class_major"])
def test_opcheck(layout):
    cosines, labels = make(6, 10, torch.float32, "cpu")
    if layout == "class_major":
        cosines = class_major(cosines)
    torch.library.opcheck(ops.margin_softmax_forward, (cosines.clone(), labels, 64.0, 1.0, 0.5, 0.0, 0.0))
    logits = cosines.clone()
    row_max, sum_exp, _, target_cos = margin_softmax_forward_ref(logits, labels, 64.0, 1.0, 0.5, 0.0)
    torch.library.opcheck(ops.margin_softmax_backward, (logits, labels, row_max, sum_exp, target_cos,
                                                        64.0, 1.0, 0.5, 0.0, 0.125, 0.0))


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("layout", ["rows", "class_major"])
def test_filtering_drops_close_logits_in_rows_whose_target_is_elsewhere(impl, layout):
    # A row whose target another rank holds (label -1) is filtered too, as one process over all classes filters
    # it: its too-close cosines become logit 0 and get no gradient; a local target's own column is never dropped.
    forward = ops.margin_softmax_forward if impl == "compiled" else margin_softmax_forward_ref
    backward = ops.margin_softmax_backward if impl == "compiled" else margin_softmax_backward_ref
    cos = torch.tensor([[0.1, 0.8, -0.2, 0.6], [0.7, 0.1, 0.9, -0.3]])
    labels = torch.tensor([-1, 1])
    logits = cos.clone() if layout == "rows" else class_major(cos)
    row_max, sum_exp, _, target_cos = forward(logits, labels, 64.0, 1.0, 0.0, 0.0, 0.5)
    expected = torch.tensor([[0.1, 0.0, -0.2, 0.0], [0.0, 0.1, 0.0, -0.3]]) * 64.0
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(row_max, expected.max(dim=1).values)
    backward(logits, labels, row_max, sum_exp, target_cos, 64.0, 1.0, 0.0, 0.0, 1.0, 0.5)
    assert logits[0, 1] == 0 and logits[0, 3] == 0 and logits[1, 0] == 0 and logits[1, 2] == 0
    assert logits[0, 0] > 0 and logits[1, 1] < 0 and logits[1, 3] > 0


_AVX512_SCRIPT = r"""
import sys, torch
import partialfc.ops  # registers the ops
sys.path.insert(0, sys.argv[2])
from test_margin_softmax import class_major, make
out = []
for batch, threshold in ((128, 0.0), (37, 0.2), (16, 0.0)):
    cosines, labels = make(batch, 9000, torch.float32, "cpu", seed=batch)
    logits = class_major(cosines)
    row_max, sum_exp, target_logit, target_cos = torch.ops.partialfc.margin_softmax_forward(
        logits, labels, 64.0, 1.0, 0.5, 0.0, threshold)
    torch.ops.partialfc.margin_softmax_backward(logits, labels, row_max, sum_exp, target_cos, 64.0, 1.0, 0.5, 0.0,
                                                1.0 / batch, threshold)
    out.append((row_max, sum_exp, target_logit, logits.contiguous()))
torch.save(out, sys.argv[1])
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


@pytest.mark.skipif(not {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= set(_cpu_flags()),
                    reason="this CPU has no AVX-512: the kernels run their AVX2 build only")
def test_class_major_avx512_build_equals_the_avx2_build(tmp_path):
    # The class-major backward has an AVX-512 build; its lanes are samples, so it must give the AVX2 build's bits
    # (PARTIALFC_CPU_AVX512=0 selects the AVX2 build at start-up). Batches of 128, 37 (a partial vector) and 16.
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    results = []
    for flag in ("1", "0"):
        path = tmp_path / f"avx512_{flag}.pt"
        env = dict(os.environ, PARTIALFC_CPU_AVX512=flag)
        subprocess.run([sys.executable, "-c", _AVX512_SCRIPT, str(path), here], env=env, check=True, timeout=300)
        results.append(torch.load(path))
    for wide, narrow in zip(*results):
        for a, b in zip(wide, narrow):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
