"""The margin backward's ``grad_absmax`` and the head's finiteness check that reads it.

The op folds the largest ``|gradient|`` it stores into ``grad_absmax`` (NaN when one is NaN); the head bounds
the centers' gradient by it (``CenterGrad.is_finite``) instead of summing the [S, D] gradient. Checked here:
the op against the reference and against the tensor it wrote, over dtypes, layouts and both margin ops; the
head's answer against an exact check of the gradient, over loss scales that cross the bound; and that the
fast answer really skips the pass.
"""
import math

import pytest
import torch

from partialfc import ops
from partialfc.head import PartialFC, SparseSGD
from partialfc.head import partial_fc as head_module
from partialfc.ops import reference

from ops_testutil import random_cosines

P = torch.ops.partialfc
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ARCFACE = (64.0, 1.0, 0.5, 0.0)


def _backward(op_table, cosines, labels, adaptive, grad_absmax, filter_threshold=0.0):
    """The forward then the backward of one table, in place on ``cosines``; returns the gradient."""
    s, m1, m2, m3 = ARCFACE
    if adaptive:
        kw = dict(sample_m2=torch.full((cosines.shape[0],), 0.1, device=cosines.device), sample_m3=None,
                  clip_eps=1e-3, hard_threshold=None, hard_t=0.0)
        stats = op_table.margin_softmax_forward_adaptive(cosines, labels, s, m1, m2, m3, filter_threshold, **kw)
        op_table.margin_softmax_backward_adaptive(cosines, labels, stats[0], stats[1], stats[3], s, m1, m2, m3, 0.25,
                                                  filter_threshold, **kw, grad_absmax=grad_absmax)
    else:
        stats = op_table.margin_softmax_forward(cosines, labels, s, m1, m2, m3, filter_threshold)
        op_table.margin_softmax_backward(cosines, labels, stats[0], stats[1], stats[3], s, m1, m2, m3, 0.25,
                                         filter_threshold, grad_absmax)
    return cosines


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "class_major", "strided"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("filter_threshold", [0.0, 0.5])
def test_grad_absmax_is_the_largest_stored_gradient(device, dtype, layout, adaptive, filter_threshold):
    compiled = ops.op_table(device, use_ext=True)
    cosines, labels = random_cosines(7, 300, dtype, device, layout)
    plain = _backward(compiled, cosines.clone(), labels, adaptive, None, filter_threshold)
    absmax = torch.zeros(1, device=device)
    grad = _backward(compiled, cosines.clone(), labels, adaptive, absmax, filter_threshold)
    # Asking for it changes no gradient, and it is exactly the largest one stored.
    assert torch.equal(grad, plain)
    assert absmax.item() == grad.abs().max().float().item() > 0
    # The reference folds the same value from its own (equal to tolerance) gradient.
    ref_absmax = torch.zeros(1, device=device)
    ref = _backward(ops.op_table(device, use_ext=False), cosines.clone(), labels, adaptive, ref_absmax,
                    filter_threshold)
    assert ref_absmax.item() == ref.abs().max().float().item()
    assert math.isclose(absmax.item(), ref_absmax.item(), rel_tol=1e-2 if dtype.itemsize == 2 else 1e-5)


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_grad_absmax_keeps_a_larger_value_and_folds_over_calls(device, impl, adaptive):
    table = ops.op_table(device, use_ext=impl == "compiled")
    cosines, labels = random_cosines(5, 64, torch.float32, device, "rows", seed=3)
    largest = _backward(table, cosines.clone(), labels, adaptive, None).abs().max().item()
    absmax = torch.tensor([1e30], device=device)
    _backward(table, cosines.clone(), labels, adaptive, absmax)
    assert absmax.item() == pytest.approx(1e30)
    absmax = torch.tensor([largest / 2], device=device)
    _backward(table, cosines.clone(), labels, adaptive, absmax)
    assert absmax.item() == largest
    # Empty logits leave it as it was.
    _backward(table, torch.empty(0, 4, device=device), torch.empty(0, dtype=torch.long, device=device), adaptive,
              absmax)
    assert absmax.item() == largest


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("layout", ["rows", "class_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_logit_makes_grad_absmax_nan(device, impl, layout, dtype):
    table = ops.op_table(device, use_ext=impl == "compiled")
    cosines, labels = random_cosines(6, 100, dtype, device, layout, seed=1)
    cosines[2, 17] = math.nan
    absmax = torch.tensor([5.0], device=device)
    _backward(table, cosines, labels, False, absmax)
    assert math.isnan(absmax.item())
    # A NaN on entry stays NaN, whatever the gradient.
    cosines, labels = random_cosines(6, 100, dtype, device, layout, seed=1)
    _backward(table, cosines, labels, False, absmax)
    assert math.isnan(absmax.item())


@pytest.mark.parametrize("bad,message", [
    (lambda d: torch.zeros(1, dtype=torch.float64, device=d), "grad_absmax must be a float32 tensor of one element"),
    (lambda d: torch.zeros(2, device=d), "grad_absmax must be a float32 tensor of one element"),
])
def test_a_bad_grad_absmax_is_refused_by_name(device, bad, message):
    cosines, labels = random_cosines(4, 20, torch.float32, device, "rows")
    with pytest.raises(RuntimeError, match=message):
        _backward(ops.op_table(device, use_ext=True), cosines, labels, False, bad(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grad_absmax_on_cpu_for_cuda_logits_is_refused():
    cosines, labels = random_cosines(4, 20, torch.float32, "cuda", "rows")
    stats = P.margin_softmax_forward(cosines, labels, *ARCFACE, 0.0)
    with pytest.raises(RuntimeError, match="grad_absmax is on cpu, logits on cuda"):
        P.margin_softmax_backward(cosines, labels, stats[0], stats[1], stats[3], *ARCFACE, 1.0, 0.0, torch.zeros(1))


def test_opcheck_with_grad_absmax():
    cosines, labels = random_cosines(6, 10, torch.float32, "cpu", "rows")
    row_max, sum_exp, _, target_cos = reference.margin_softmax_forward_ref(cosines, labels, *ARCFACE)
    torch.library.opcheck(P.margin_softmax_backward, (cosines, labels, row_max, sum_exp, target_cos, *ARCFACE, 0.125,
                                                      0.0, torch.zeros(1)))
    cosines, labels = random_cosines(6, 10, torch.float32, "cpu", "rows")
    stats = reference.margin_softmax_forward_adaptive_ref(cosines, labels, *ARCFACE, 0.0)
    torch.library.opcheck(P.margin_softmax_backward_adaptive,
                          (cosines, labels, stats[0], stats[1], stats[3], *ARCFACE, 0.125, 0.0, None, None, 0.0, None,
                           0.0, torch.zeros(1)))


# ---------------------------------------------------------------------------------------------------------
# The head's finiteness check


def _head_step(device, use_ext, loss_scale=1.0, nan_row=None, dtype=None, center_dtype="float32", seed=0):
    pfc = PartialFC(16, 50, sample_rate=0.5, use_ext=use_ext, center_dtype=center_dtype).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 50, (8,), generator=g).to(device)
    if nan_row is not None:
        with torch.no_grad():
            pfc.weight[int(y[nan_row])] = math.nan
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        loss = pfc(x, y)
    (loss * loss_scale).backward()
    return pfc


def _exactly_finite(pfc):
    return bool(torch.isfinite(pfc.center_grad.normalized_grad.float()).all())


@pytest.mark.parametrize("use_ext", [True, False], ids=["compiled", "reference"])
@pytest.mark.parametrize("loss_scale", [1.0, 1e30, 1e35, 1e36, 1e37, 3e38])
def test_is_finite_agrees_with_an_exact_check_across_the_bound(device, use_ext, loss_scale):
    pfc = _head_step(device, use_ext, loss_scale)
    assert pfc.center_grad.is_finite() == _exactly_finite(pfc)
    if loss_scale <= 1e30:
        assert pfc.center_grad.bounded_below_overflow(pfc.center_grad.normalized_grad)


@pytest.mark.parametrize("use_ext", [True, False], ids=["compiled", "reference"])
def test_is_finite_is_false_for_a_nan_center(device, use_ext):
    pfc = _head_step(device, use_ext, nan_row=3)
    assert not _exactly_finite(pfc)
    assert not pfc.center_grad.bounded_below_overflow(pfc.center_grad.normalized_grad)
    assert not pfc.center_grad.is_finite()


def test_a_bounded_gradient_is_not_read_again(monkeypatch):
    pfc = _head_step("cpu", True)

    def no_pass(tensor):
        raise AssertionError("the finiteness check read the [S, D] gradient")

    monkeypatch.setattr(head_module, "all_finite", no_pass)
    assert pfc.center_grad.is_finite()


def test_a_gradient_added_without_grad_absmax_is_read(monkeypatch):
    """Another caller of CenterGrad.add (no grad_absmax): the bound is not trusted, the gradient is read."""
    pfc = _head_step("cpu", True)
    grad = pfc.center_grad
    grad.add(torch.zeros(8, grad.index.numel()), torch.ones(8, 16))
    read = []
    monkeypatch.setattr(head_module, "all_finite", lambda t: read.append(t) or True)
    assert grad.is_finite() and len(read) == 1


def test_a_gradient_written_after_the_backward_is_read_again():
    """The bound is of what the backward wrote: an in-place change since (a hook, a test) makes the check read
    the gradient."""
    pfc = _head_step("cpu", True)
    grad = pfc.center_grad
    assert grad.bounded_below_overflow(grad.normalized_grad)
    grad.normalized_grad[3, 5] = math.inf
    assert not grad.bounded_below_overflow(grad.normalized_grad)
    assert not grad.is_finite()


def test_micro_batches_fold_into_one_bound():
    pfc = PartialFC(16, 50, sample_rate=0.5)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 16, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 50, (8,), generator=g) for _ in range(2)]
    pfc.hold_sample(ys)
    largest = []
    for x, y in zip(xs, ys):
        pfc(x, y).backward()
        largest.append(pfc.center_grad.grad_absmax.item())
    assert largest[1] >= largest[0] > 0
    assert pfc.center_grad._bound_rows == 16 and pfc.center_grad.is_finite()
    pfc.center_grad.clear()
    assert pfc.center_grad.grad_absmax is None and pfc.center_grad.is_finite()


# ---------------------------------------------------------------------------------------------------------
# A low-precision compute dtype holds the centers' gradient over the centers


@pytest.mark.parametrize("use_ext", [True, False], ids=["compiled", "reference"])
def test_autocast_holds_the_gradient_in_bf16_with_the_same_update(device, use_ext):
    """Under bf16 autocast one backward's gradient is held in bf16 (the GEMM's output), where hold_sample keeps
    a float32 sum: the same values, so the same table after the step, bit for bit."""
    def step(hold):
        pfc = PartialFC(16, 50, sample_rate=0.5, use_ext=use_ext).to(device)
        opt = SparseSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(7)
        x, y = torch.randn(8, 16, generator=g).to(device), torch.randint(0, 50, (8,), generator=g).to(device)
        if hold:
            pfc.hold_sample([y])
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = pfc(x, y)
        loss.backward()
        grad = pfc.center_grad
        held, rows = grad.normalized_grad, grad.rows()
        # The raw rows' gradient in float64 from the table: (g - w (w . g)) / |w| with w the normalized row.
        w = pfc.weight.detach()[grad.index].double()
        w = w / w.norm(dim=1, keepdim=True)
        g = held.double()
        expected = (g - w * (w * g).sum(dim=1, keepdim=True)) * grad.inv_norm.double()[:, None]
        opt.step()
        return held, rows, expected, pfc.weight.detach().clone()

    held, rows, expected, weight = step(False)
    summed, _, _, summed_weight = step(True)
    assert held.dtype == torch.bfloat16 and summed.dtype == torch.float32
    assert torch.equal(held.float(), summed)
    assert torch.equal(weight, summed_weight)
    # rows() recomputes the normalized rows from the table (the centers hold the gradient now).
    torch.testing.assert_close(rows.double(), expected, rtol=1e-4, atol=1e-6)


def test_autocast_writes_the_gradient_over_the_gathered_centers():
    pfc = PartialFC(16, 50, sample_rate=0.5)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 50, (8,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(x, y)
    loss.backward()
    assert "grad_centers" not in pfc.ops.buffers
    assert pfc.center_grad.normalized_grad.data_ptr() == pfc.ops.buffers["centers"].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_step_workspace_is_the_centers_and_the_logits():
    """The bf16 step on CUDA holds the bf16 centers [S, D] and the bf16 logits [B, S], and no other [S, D]
    buffer: the gradient goes over the centers, the margin runs on the logits in place."""
    dim, classes, batch = 512, 200_000, 256
    pfc = PartialFC(dim, classes, sample_rate=0.5).cuda()
    opt = SparseSGD(pfc, lr=0.1, momentum=0.9)
    x = torch.randn(batch, dim, device="cuda", requires_grad=True)
    y = torch.randint(0, classes, (batch,), device="cuda")
    for _ in range(2):  # the second step runs with the first one's allocations settled
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pfc(x, y)
        loss.backward()
        assert pfc.center_grad.is_finite()
        opt.step()
        opt.zero_grad()
        peak = torch.cuda.max_memory_allocated() - before
    num_sample = pfc.num_sample
    centers, logits = num_sample * dim * 2, batch * num_sample * 2
    assert peak <= centers + logits + 16 * 2 ** 20, (peak, centers + logits)
