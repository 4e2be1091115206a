"""Sparse AdamW for the class centers: the kernel against the reference, the optimizer over PartialFC against
torch.optim.AdamW over the dense table, untouched unsampled rows, and the state_dict round trip."""
import math

import pytest
import torch
import torch.nn.functional as F

from partialfc.head import PartialFC, SparseAdamW, SparseSGD, center_optimizer
from partialfc.ops import (gather_normalize_backward_ref, normalize_backward_adamw_update_ref,
                           sparse_adamw_update_ref)

from ops_testutil import TOL, noncontiguous_like

P = torch.ops.partialfc
HYPER = (0.01, 0.9, 0.999, 1e-8, 0.1)  # lr, beta1, beta2, eps, weight_decay
ARCFACE = (64.0, 1.0, 0.5, 0.0)


def make(dtype, device, num_rows=200, dim=24, seed=0, step_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=g).to(dtype).to(device)
    exp_avg = (torch.randn(num_rows, dim, generator=g) * 0.1).to(dtype).to(device)
    exp_avg_sq = (torch.rand(num_rows, dim, generator=g) * 0.01).to(dtype).to(device)
    row_step = torch.randint(0, 5, (num_rows,), generator=g).to(step_dtype).to(device)
    return weight, exp_avg, exp_avg_sq, row_step


def random_index(num_rows, rows, generator, device):
    return torch.sort(torch.randperm(num_rows, generator=generator)[:rows]).values.to(device)


def adamw_rows_by_hand(w, m, v, t, g, lr, beta1, beta2, eps, wd):
    """One AdamW step of a few rows in float64, written from the update rule (an expectation independent of
    the reference's tensor ops): t is each row's step count after the step."""
    w, m, v, g = (x.double() for x in (w, m, v, g))
    t = t.double()[:, None]
    w = w * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
    return w - lr * m_hat / (v_hat.sqrt() + eps), m, v


# ---------------------------------------------------------------------------------------------------------
# The op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("step_dtype", [torch.int64, torch.int32])
def test_kernel_matches_reference_over_steps(device, dtype, contiguous, step_dtype):
    weight, exp_avg, exp_avg_sq, row_step = make(dtype, device, step_dtype=step_dtype)
    if not contiguous:
        weight, exp_avg, exp_avg_sq = (noncontiguous_like(t) for t in (weight, exp_avg, exp_avg_sq))
    ref = [t.clone() for t in (weight, exp_avg, exp_avg_sq, row_step)]
    gen = torch.Generator().manual_seed(1)
    start_step = row_step.clone()
    counts = torch.zeros_like(row_step)
    atol, rtol = TOL[dtype]
    for step in range(5):
        index = random_index(weight.shape[0], 60 + 10 * step, gen, device)
        grad = torch.randn(index.numel(), weight.shape[1], generator=gen).to(dtype).to(device)
        if not contiguous:
            grad = noncontiguous_like(grad)
        untouched = torch.ones(weight.shape[0], dtype=torch.bool, device=device)
        untouched[index] = False
        before = [t[untouched].clone() for t in (weight, exp_avg, exp_avg_sq, row_step)]
        P.sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index, grad, *HYPER)
        sparse_adamw_update_ref(*ref, index, grad, *HYPER)
        counts[index] += 1
        for got, want in zip((weight, exp_avg, exp_avg_sq), ref):
            torch.testing.assert_close(got, want, atol=atol * 4, rtol=rtol)
        assert torch.equal(row_step, ref[3]) and row_step.dtype == step_dtype
        # Unsampled rows: weight, both moments and step bit for bit.
        for got, was in zip((weight, exp_avg, exp_avg_sq, row_step), before):
            assert torch.equal(got[untouched], was)
    assert torch.equal(row_step, start_step + counts)
    assert not torch.equal(weight, make(dtype, device)[0])


def test_reference_and_kernel_follow_the_adamw_rule(device):
    """Both against the update rule written out by hand, rows at different step counts."""
    weight, exp_avg, exp_avg_sq, row_step = make(torch.float64, device)
    row_step[:4] = torch.tensor([0, 1, 7, 1000])
    index = torch.tensor([0, 1, 2, 3, 50], device=device)
    grad = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad = grad.to(device)
    want_w, want_m, want_v = adamw_rows_by_hand(weight[index], exp_avg[index], exp_avg_sq[index],
                                                row_step[index] + 1, grad, *HYPER)
    for update in (P.sparse_adamw_update, sparse_adamw_update_ref):
        w, m, v, t = (x.clone() for x in (weight, exp_avg, exp_avg_sq, row_step))
        update(w, m, v, t, index, grad, *HYPER)
        torch.testing.assert_close(w[index], want_w, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(m[index], want_m, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(v[index], want_v, atol=1e-12, rtol=1e-12)
        assert t[index].tolist() == (row_step[index] + 1).tolist()


def test_equals_torch_adamw_when_every_row_is_sampled(device):
    weight = torch.randn(50, 16, generator=torch.Generator().manual_seed(5)).to(device)
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    row_step = torch.zeros(50, dtype=torch.int64, device=device)
    dense = weight.clone().requires_grad_()
    opt = torch.optim.AdamW([dense], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    index = torch.arange(50, device=device)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        grad = torch.randn(50, 16, generator=gen).to(device)
        P.sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index, grad, *HYPER)
        dense.grad = grad.clone()
        opt.step()
    state = opt.state[dense]
    torch.testing.assert_close(weight, dense.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(exp_avg, state["exp_avg"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    assert row_step.tolist() == [4] * 50


def test_empty_and_bad_inputs(device):
    weight, exp_avg, exp_avg_sq, row_step = make(torch.float32, device)
    state = (weight, exp_avg, exp_avg_sq, row_step)
    before = [t.clone() for t in state]
    dim = weight.shape[1]
    P.sparse_adamw_update(*state, torch.empty(0, dtype=torch.long, device=device),
                          torch.empty(0, dim, device=device), *HYPER)
    assert all(torch.equal(t, b) for t, b in zip(state, before))
    two = torch.tensor([1, 2], device=device)
    with pytest.raises(RuntimeError, match=r"sparse_adamw_update: grad_rows must be \[2, 24\], got \[3, 24\]"):
        P.sparse_adamw_update(*state, two, torch.zeros(3, dim, device=device), *HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq must be \[200, 24\], got \[200, 23\]"):
        P.sparse_adamw_update(weight, exp_avg, exp_avg_sq[:, 1:], row_step, two, torch.zeros(2, dim, device=device),
                              *HYPER)
    with pytest.raises(RuntimeError, match=r"row_step must be \[200\], got \[199\]"):
        P.sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step[1:], two, torch.zeros(2, dim, device=device),
                              *HYPER)
    with pytest.raises(RuntimeError, match="row_step must be int64 or int32, got Float"):
        P.sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step.float(), two,
                              torch.zeros(2, dim, device=device), *HYPER)
    with pytest.raises(RuntimeError, match="exp_avg and exp_avg_sq must have the weight's dtype Float, got Double"):
        P.sparse_adamw_update(weight, exp_avg.double(), exp_avg_sq, row_step, two,
                              torch.zeros(2, dim, device=device), *HYPER)
    with pytest.raises(RuntimeError, match="index must be a 1-D int64 tensor, got 1-D Int"):
        P.sparse_adamw_update(*state, two.int(), torch.zeros(2, dim, device=device), *HYPER)
    with pytest.raises(RuntimeError, match=r"beta2 must be in \[0, 1\), got 1"):
        P.sparse_adamw_update(*state, two, torch.zeros(2, dim, device=device), 0.01, 0.9, 1.0, 1e-8, 0.0)
    # A bad row is named, raised as a catchable error on every device, and nothing is written.
    bad = torch.tensor([3, 500, 7], device=device)
    with pytest.raises(RuntimeError, match=r"sparse_adamw_update: index\[1\] = 500 is outside \[0, 200\)"):
        P.sparse_adamw_update(*state, bad, torch.ones(3, dim, device=device), *HYPER)
    with pytest.raises(RuntimeError, match=r"index\[0\] = -1 is outside \[0, 200\)"):
        P.sparse_adamw_update(*state, torch.tensor([-1], device=device), torch.ones(1, dim, device=device), *HYPER)
    assert all(torch.equal(t, b) for t, b in zip(state, before))
    # The device is still usable after the error.
    P.sparse_adamw_update(*state, two, torch.ones(2, dim, device=device), *HYPER)
    assert row_step[1:3].tolist() == (before[3][1:3] + 1).tolist()


def test_opcheck():
    weight, exp_avg, exp_avg_sq, row_step = make(torch.float32, "cpu")
    index = random_index(200, 60, torch.Generator().manual_seed(2), "cpu")
    grad = torch.randn(60, 24)
    torch.library.opcheck(P.sparse_adamw_update, (weight, exp_avg, exp_avg_sq, row_step, index, grad, *HYPER))


# ---------------------------------------------------------------------------------------------------------
# The update with the normalize backward folded in (CPU kernel)


def make_fused(dtype, grad_dtype, num_rows=300, dim=40, rows=70, seed=0):
    weight, exp_avg, exp_avg_sq, row_step = make(dtype, "cpu", num_rows, dim, seed)
    weight.mul_(0.05)
    g = torch.Generator().manual_seed(seed + 1)
    index = random_index(num_rows, rows, g, "cpu")
    grad = torch.randn(rows, dim, generator=g).to(grad_dtype)
    inv_norm = weight.index_select(0, index).norm(dim=1).clamp_min(1e-12).reciprocal()
    return (weight, exp_avg, exp_avg_sq, row_step), index, grad, inv_norm


@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                              (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("grad_scale", [1.0, 1024.0, 3.0])
def test_fused_kernel_matches_reference_and_composition(dtype, grad_dtype, contiguous, grad_scale):
    state, index, grad, inv_norm = make_fused(dtype, grad_dtype)
    if not contiguous:
        state = tuple(noncontiguous_like(t) for t in state[:3]) + (state[3],)
        grad = noncontiguous_like(grad)
    ref = [t.clone() for t in state]
    two = [t.clone() for t in state]
    untouched = torch.ones(state[0].shape[0], dtype=torch.bool)
    untouched[index] = False
    before = [t[untouched].clone() for t in state]

    P.normalize_backward_adamw_update(*state, index, grad, inv_norm, *HYPER, grad_scale)
    normalize_backward_adamw_update_ref(*ref, index, grad, inv_norm, *HYPER, grad_scale)
    # Independent composition: normalize backward on the gathered rows, unscale, then the plain update.
    normalized = two[0].index_select(0, index) * inv_norm[:, None]
    rows = gather_normalize_backward_ref(grad, normalized, inv_norm) / grad_scale
    sparse_adamw_update_ref(*two, index, rows, *HYPER)

    atol, rtol = TOL[dtype]
    for other in (ref, two):
        for got, want in zip(state[:3], other[:3]):
            torch.testing.assert_close(got, want, atol=atol * 4, rtol=rtol * 4)
        assert torch.equal(state[3], other[3])
    for got, was in zip(state, before):
        assert torch.equal(got[untouched], was)


def test_fused_kernel_errors():
    state, index, grad, inv_norm = make_fused(torch.float32, torch.float32)
    hyper = (*HYPER, 1.0)
    with pytest.raises(RuntimeError, match="normalize_backward_adamw_update: inv_norm must be a Float tensor"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm.double(), *hyper)
    with pytest.raises(RuntimeError, match=r"inv_norm must be \[70\], got \[3\]"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm[:3], *hyper)
    with pytest.raises(RuntimeError, match="grad_scale must be nonzero"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm, *HYPER, 0.0)
    with pytest.raises(RuntimeError, match=r"grad_normalized must be \[70, 40\], got \[5, 40\]"):
        P.normalize_backward_adamw_update(*state, index, grad[:5], inv_norm, *hyper)
    before = [t.clone() for t in state]
    bad = index.clone()
    bad[3] = 300
    with pytest.raises(RuntimeError,
                       match=r"normalize_backward_adamw_update: index\[3\] = 300 is outside \[0, 300\)"):
        P.normalize_backward_adamw_update(*state, bad, grad, inv_norm, *hyper)
    assert all(torch.equal(t, b) for t, b in zip(state, before))


def test_fused_opcheck():
    state, index, grad, inv_norm = make_fused(torch.float32, torch.float32)
    torch.library.opcheck(P.normalize_backward_adamw_update, (*state, index, grad, inv_norm, *HYPER, 2.0))


# ---------------------------------------------------------------------------------------------------------
# SparseAdamW over PartialFC


def dense_arcface_loss(x, weight, labels, s, m1, m2, m3):
    """The full-softmax ArcFace loss of one process over all classes, written out: cosines, the margin on
    the target column (with the fallback past pi), scale, cross-entropy."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()  # [B, C]
    rows = torch.arange(labels.shape[0])
    theta = torch.acos(cos[rows, labels].clamp(-1, 1))
    angle = m1 * theta + m2
    target = torch.where(angle <= math.pi, torch.cos(angle) - m3, cos[rows, labels] - m3 - m2 * math.sin(m2))
    logits = cos.clone()
    logits[rows, labels] = target
    return F.cross_entropy(s * logits, labels)


def make_head(use_ext, num_classes=40, dim=12, sample_rate=1.0, dtype=torch.float64, device="cpu"):
    pfc = PartialFC(dim, num_classes, sample_rate, ARCFACE, use_ext=use_ext).to(device=device, dtype=dtype)
    return pfc, SparseAdamW(pfc, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def batch(step, batch_size=10, dim=12, num_classes=40, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(batch_size, dim, generator=gen, dtype=dtype).to(device),
            torch.randint(0, num_classes, (batch_size,), generator=gen).to(device))


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
def test_full_sample_equals_dense_torch_adamw_float64(device, use_ext):
    pfc, opt = make_head(use_ext, device=device)
    dense = pfc.weight.detach().clone().requires_grad_()
    dense_opt = torch.optim.AdamW([dense], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                  foreach=False)
    for step in range(5):
        x, labels = batch(step, device=device)
        loss = pfc(x, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dense_opt.zero_grad()
        ref = dense_arcface_loss(x, dense, labels, *ARCFACE)
        ref.backward()
        dense_opt.step()
        assert abs(loss.item() - ref.item()) < 1e-10
    state = opt.state[pfc.weight]
    torch.testing.assert_close(pfc.weight.detach(), dense.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state["exp_avg"], dense_opt.state[dense]["exp_avg"], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(state["exp_avg_sq"], dense_opt.state[dense]["exp_avg_sq"], atol=1e-14, rtol=1e-10)
    assert state["row_step"].tolist() == [5] * 40
    # The centers did move by AdamW steps of about lr, not by a decayed SGD step.
    assert (pfc.weight.detach() - make_head(use_ext, device=device)[0].weight.detach()).abs().max() > 0.02


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
def test_unsampled_rows_keep_weight_moments_and_step(use_ext):
    pfc, opt = make_head(use_ext, num_classes=200, sample_rate=0.1, dtype=torch.float32)
    counts = torch.zeros(200, dtype=torch.int64)
    for step in range(4):
        x, labels = batch(step, num_classes=200, dtype=torch.float32)
        state = opt.materialize_state()
        before = [t.clone() for t in (pfc.weight.detach(), state["exp_avg"], state["exp_avg_sq"], state["row_step"])]
        pfc(x, labels).backward()
        opt.step()
        opt.zero_grad()
        sampled = torch.zeros(200, dtype=torch.bool)
        sampled[pfc.sampled_index] = True
        assert int(sampled.sum()) == pfc.num_sample < 200
        counts[sampled] += 1
        after = (pfc.weight.detach(), state["exp_avg"], state["exp_avg_sq"], state["row_step"])
        for got, was in zip(after, before):
            assert torch.equal(got[~sampled], was[~sampled])
        assert not torch.equal(after[0][sampled], before[0][sampled])
    assert torch.equal(opt.state[pfc.weight]["row_step"], counts)
    assert counts.max() > counts[counts > 0].min()  # rows at different step counts


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
def test_kernels_and_reference_heads_agree_with_sampling(use_ext):
    """The same sampled run on both tables (the kernel's sampler differs, so each table is checked against
    the reference update of its own sample)."""
    pfc, opt = make_head(use_ext, num_classes=200, sample_rate=0.2, dtype=torch.float32)
    ref_state = None
    for step in range(3):
        x, labels = batch(step, num_classes=200, dtype=torch.float32)
        pfc(x, labels).backward()
        state = opt.materialize_state()
        if ref_state is None:
            ref_state = [pfc.weight.detach().clone()] + [t.clone() for t in (state["exp_avg"], state["exp_avg_sq"],
                                                                            state["row_step"])]
        rows = pfc.center_grad.rows()
        sparse_adamw_update_ref(*ref_state, pfc.sampled_index, rows, 0.01, 0.9, 0.999, 1e-8, 0.1)
        opt.step()
        opt.zero_grad()
        got = (pfc.weight.detach(), state["exp_avg"], state["exp_avg_sq"])
        for g, want in zip(got, ref_state[:3]):
            torch.testing.assert_close(g, want, atol=2e-6, rtol=1e-5)
        assert torch.equal(state["row_step"], ref_state[3])


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
def test_state_dict_round_trip_mid_run_equals_uninterrupted(use_ext):
    def run(steps, pfc, opt, schedule):
        for step in steps:
            x, labels = batch(step, num_classes=200, dtype=torch.float32)
            pfc(x, labels).backward()
            opt.step(grad_scale=4.0)  # as under a loss scale: both runs divide the same gradient
            opt.zero_grad()
            schedule.step()

    straight, straight_opt = make_head(use_ext, num_classes=200, sample_rate=0.3, dtype=torch.float32)
    straight_lr = torch.optim.lr_scheduler.LambdaLR(straight_opt, lambda s: 1.0 / (1 + s))
    run(range(6), straight, straight_opt, straight_lr)

    first, first_opt = make_head(use_ext, num_classes=200, sample_rate=0.3, dtype=torch.float32)
    first_lr = torch.optim.lr_scheduler.LambdaLR(first_opt, lambda s: 1.0 / (1 + s))
    run(range(3), first, first_opt, first_lr)
    saved = {"weight": first.weight.detach().clone(), "opt": first_opt.state_dict(), "lr": first_lr.state_dict(),
             "sampler": first.sampler.get_state()}
    assert saved["opt"]["state"][0]["row_step"].dtype == torch.int64

    resumed, resumed_opt = make_head(use_ext, num_classes=200, sample_rate=0.3, dtype=torch.float32)
    resumed_lr = torch.optim.lr_scheduler.LambdaLR(resumed_opt, lambda s: 1.0 / (1 + s))
    with torch.no_grad():
        resumed.weight.copy_(saved["weight"])
    resumed.sampler.set_state(saved["sampler"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_lr.load_state_dict(saved["lr"])
    state = resumed_opt.state[resumed.weight]
    assert state["row_step"].dtype == torch.int64  # not cast to the table's dtype by torch.optim
    assert state["exp_avg"].data_ptr() != saved["opt"]["state"][0]["exp_avg"].data_ptr()  # re-backed
    run(range(3, 6), resumed, resumed_opt, resumed_lr)

    assert resumed_opt.param_groups[0]["lr"] == straight_opt.param_groups[0]["lr"]
    assert torch.equal(resumed.weight, straight.weight)
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(state[key], straight_opt.state[straight.weight][key]), key


def test_load_state_dict_rejects_a_state_of_another_shard():
    pfc, opt = make_head(False, num_classes=40, dtype=torch.float32)
    other, other_opt = make_head(False, num_classes=30, dtype=torch.float32)
    other_opt.materialize_state()
    with pytest.raises(ValueError, match=r"exp_avg is \[30, 12\], but the class-center shard needs \[40, 12\]"):
        opt.load_state_dict(other_opt.state_dict())
    sgd = SparseSGD(pfc, lr=0.1)
    sgd.materialize_state()
    with pytest.raises(ValueError, match=r"lacks \['exp_avg', 'exp_avg_sq', 'row_step'\]"):
        opt.load_state_dict(sgd.state_dict())


def test_materialize_state_and_factory():
    pfc, opt = make_head(False, num_classes=40, dtype=torch.float32)
    assert len(opt.state) == 0
    state = opt.materialize_state()
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (40, 12)
    assert state["row_step"].shape == (40,) and state["row_step"].dtype == torch.int64
    assert not state["exp_avg"].any() and not state["row_step"].any()
    assert opt.materialize_state() is state and opt.materialize_state()["exp_avg"] is state["exp_avg"]
    sgd = SparseSGD(pfc, lr=0.1)
    assert sgd.materialize_state()["momentum_buffer"] is sgd.momentum_buffer()
    assert sgd.momentum_buffer().shape == (40, 12) and not sgd.momentum_buffer().any()

    made = center_optimizer(pfc, "adamw", 0.001, 0.9, 0.1, betas=(0.8, 0.99), eps=1e-6)
    assert isinstance(made, SparseAdamW)
    assert made.param_groups[0]["betas"] == (0.8, 0.99) and made.param_groups[0]["eps"] == 1e-6
    assert made.param_groups[0]["lr"] == 0.001 and made.param_groups[0]["weight_decay"] == 0.1
    made = center_optimizer(pfc, "sgd", 0.1, 0.9, 5e-4)
    assert isinstance(made, SparseSGD) and made.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw', got 'adam'"):
        center_optimizer(pfc, "adam", 0.1, 0.9, 5e-4)
    with pytest.raises(ValueError, match=r"betas must be two values in \[0, 1\), got \(0.9, 1.0\)"):
        SparseAdamW(pfc, betas=(0.9, 1.0))


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
def test_second_step_on_the_same_gradient_and_hold_sample(use_ext):
    """A second step() reapplies the held gradient from rows() (the table has moved); micro-batches under
    hold_sample add up to the one-batch gradient."""
    pfc, opt = make_head(use_ext, num_classes=60, sample_rate=0.5, dtype=torch.float64)
    x, labels = batch(0, num_classes=60)
    pfc(x, labels).backward()
    rows = pfc.center_grad.rows()
    index = pfc.sampled_index
    state = opt.materialize_state()
    want = [pfc.weight.detach().clone()] + [state[k].clone() for k in ("exp_avg", "exp_avg_sq", "row_step")]
    sparse_adamw_update_ref(*want, index, rows, 0.01, 0.9, 0.999, 1e-8, 0.1)
    sparse_adamw_update_ref(*want, index, rows, 0.01, 0.9, 0.999, 1e-8, 0.1)
    opt.step()
    opt.step()
    torch.testing.assert_close(pfc.weight.detach(), want[0], atol=1e-12, rtol=1e-12)
    assert torch.equal(state["row_step"], want[3]) and int(want[3].max()) == 2

    whole, whole_opt = make_head(use_ext, num_classes=60, sample_rate=0.5, dtype=torch.float64)
    held, held_opt = make_head(use_ext, num_classes=60, sample_rate=0.5, dtype=torch.float64)
    x, labels = batch(1, num_classes=60)
    held.hold_sample([labels[:5], labels[5:]])
    whole.hold_sample([labels])
    whole(x, labels).backward()
    # Each micro-batch's loss is the mean over its half; halve it to sum to the whole batch's mean.
    for part in (slice(0, 5), slice(5, 10)):
        (held(x[part], labels[part]) * 0.5).backward()
    held.hold_sample(None)
    whole.hold_sample(None)
    assert torch.equal(held.sampled_index, whole.sampled_index)
    whole_opt.step()
    held_opt.step()
    torch.testing.assert_close(held.weight, whole.weight, atol=1e-12, rtol=1e-12)
