"""The update with the normalize backward folded in (``normalize_backward_sgd_update``), the head's
``CenterGrad`` that feeds it, and the huge-page allocation of the CPU table's large tensors."""
import pytest
import torch

from partialfc import ops
from partialfc.ops import cpu
from partialfc.head import PartialFC, SparseSGD

from ops_testutil import TOL, noncontiguous_like

P = torch.ops.partialfc
ARCFACE = (64.0, 1.0, 0.5, 0.0)


def make(dtype, grad_dtype, num_rows=300, dim=40, rows=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_rows, dim, generator=g) * 0.05).to(dtype)
    momentum = torch.randn(num_rows, dim, generator=g).to(dtype)
    index = torch.sort(torch.randperm(num_rows, generator=g)[:rows]).values
    grad = torch.randn(rows, dim, generator=g).to(grad_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_norm = weight.index_select(0, index).to(acc).norm(dim=1).clamp_min(1e-12).reciprocal()
    return weight, momentum, index, grad, inv_norm


@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                              (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("grad_scale", [1.0, 1024.0, 3.0])
def test_kernel_matches_reference_and_composition(dtype, grad_dtype, contiguous, grad_scale):
    weight, momentum, index, grad, inv_norm = make(dtype, grad_dtype)
    if not contiguous:
        weight, momentum, grad = noncontiguous_like(weight), noncontiguous_like(momentum), noncontiguous_like(grad)
    hyper = (0.1, 0.9, 5e-4)
    w_ref, m_ref = weight.clone(), momentum.clone()
    w_two, m_two = weight.clone(), momentum.clone()
    untouched = torch.ones(weight.shape[0], dtype=torch.bool)
    untouched[index] = False
    before_w, before_m = weight[untouched].clone(), momentum[untouched].clone()

    P.normalize_backward_sgd_update(weight, momentum, index, grad, inv_norm, *hyper, grad_scale)
    ops.normalize_backward_sgd_update_ref(w_ref, m_ref, index, grad, inv_norm, *hyper, grad_scale)
    # Independent composition: normalize backward on the gathered rows, unscale, then the plain update.
    normalized = w_two.index_select(0, index).to(inv_norm.dtype) * inv_norm[:, None]
    rows = ops.gather_normalize_backward_ref(grad, normalized, inv_norm) / grad_scale
    ops.sparse_sgd_update_ref(w_two, m_two, index, rows, *hyper)

    atol, rtol = TOL[dtype]
    for w_other, m_other in ((w_ref, m_ref), (w_two, m_two)):
        torch.testing.assert_close(weight, w_other, atol=atol * 4, rtol=rtol)
        torch.testing.assert_close(momentum, m_other, atol=atol * 4, rtol=rtol)
    assert torch.equal(weight[untouched], before_w) and torch.equal(momentum[untouched], before_m)
    assert not torch.equal(weight[index], w_ref.new_zeros(()).expand_as(weight[index]))


def test_kernel_errors():
    weight, momentum, index, grad, inv_norm = make(torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="inv_norm must be a Float tensor"):
        P.normalize_backward_sgd_update(weight, momentum, index, grad, inv_norm.double(), 0.1, 0.9, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="inv_norm must be \\[70\\]"):
        P.normalize_backward_sgd_update(weight, momentum, index, grad, inv_norm[:3], 0.1, 0.9, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="grad_scale must be nonzero"):
        P.normalize_backward_sgd_update(weight, momentum, index, grad, inv_norm, 0.1, 0.9, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="grad_normalized must be \\[70, 40\\]"):
        P.normalize_backward_sgd_update(weight, momentum, index, grad[:5], inv_norm, 0.1, 0.9, 0.0, 1.0)
    bad = index.clone()
    bad[3] = 300
    with pytest.raises(RuntimeError, match="index\\[3\\] = 300 is outside \\[0, 300\\)"):
        P.normalize_backward_sgd_update(weight, momentum, bad, grad, inv_norm, 0.1, 0.9, 0.0, 1.0)


def test_opcheck():
    weight, momentum, index, grad, inv_norm = make(torch.float32, torch.float32)
    torch.library.opcheck(P.normalize_backward_sgd_update, (weight, momentum, index, grad, inv_norm, 0.1, 0.9,
                                                            5e-4, 2.0))


# ---------------------------------------------------------------------------------------------------------
# The head: deferred gradient (fused update) against the materialized gradient (plain update)


def make_head(seed=3, rate=0.3):
    pfc = PartialFC(32, 400, sample_rate=rate, margin=ARCFACE, seed=seed)
    return pfc, SparseSGD(pfc, lr=0.2, momentum=0.9, weight_decay=5e-4)


def batches(steps, batch=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 32, generator=g), torch.randint(0, 400, (batch,), generator=g))
            for _ in range(steps)]


def train(plain, steps=3, loss_scale=1.0, dtype=None):
    """``plain``: instead of ``SparseSGD.step`` (the fused normalize-backward update), apply the raw rows'
    gradient ``center_grad.rows()`` with the reference SGD update."""
    pfc, opt = make_head()
    for x, y in batches(steps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = pfc(x.requires_grad_(), y)
        (loss * loss_scale).backward()
        if plain:
            group = opt.param_groups[0]
            ops.sparse_sgd_update_ref(pfc.weight.data, opt.momentum_buffer(), pfc.sampled_index,
                                      pfc.center_grad.rows() / loss_scale, group["lr"], group["momentum"],
                                      group["weight_decay"])
        else:
            opt.step(grad_scale=loss_scale)
        opt.zero_grad()
    return pfc.weight.detach().clone(), opt.momentum_buffer().clone()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_update_equals_plain_update(dtype):
    assert isinstance(make_head()[0].ops, ops.CompiledOps)  # the fused update really runs
    w_fused, m_fused = train(False, dtype=dtype)
    w_plain, m_plain = train(True, dtype=dtype)
    w_scale, m_scale = float(w_plain.abs().max()), float(m_plain.abs().max())
    if dtype is None:
        torch.testing.assert_close(w_fused, w_plain, atol=1e-6 * w_scale, rtol=1e-5)
        torch.testing.assert_close(m_fused, m_plain, atol=1e-5 * m_scale, rtol=1e-4)
    else:
        # bf16: the plain path projects with the bf16-rounded normalized rows, the fused update with the
        # float32 ones it recomputes from the table; tolerances as in the bf16 head-vs-reference test.
        torch.testing.assert_close(w_fused, w_plain, atol=2e-2 * w_scale, rtol=5e-2)
        torch.testing.assert_close(m_fused, m_plain, atol=2e-2 * m_scale, rtol=5e-2)


def test_center_grad_finiteness_check():
    pfc, _ = make_head()
    (x, y), = batches(1)
    pfc(x.requires_grad_(), y).backward()
    assert pfc.center_grad.is_finite()
    pfc.center_grad.normalized_grad[3, 5] = float("inf")
    assert not pfc.center_grad.is_finite()
    assert not torch.isfinite(pfc.center_grad.rows()).all()  # and the raw rows' gradient agrees


def test_fused_update_with_loss_scale():
    w_scaled, m_scaled = train(False, loss_scale=256.0)
    w_plain, m_plain = train(False)
    torch.testing.assert_close(w_scaled, w_plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m_scaled, m_plain, atol=1e-5, rtol=1e-5)


def test_fused_matches_reference_path():
    """The compiled head against the pure-PyTorch reference head (same classes sampled)."""
    out = []
    for use_ext in (True, False):
        pfc = PartialFC(32, 400, sample_rate=1.0, margin=ARCFACE, use_ext=use_ext)
        assert isinstance(pfc.ops, ops.CompiledOps if use_ext else ops.ReferenceOps)
        opt = SparseSGD(pfc, lr=0.2, momentum=0.9, weight_decay=5e-4)
        for x, y in batches(3):
            pfc(x, y).backward()
            opt.step()
            opt.zero_grad()
        out.append(pfc.weight.detach().clone())
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-5)


def test_grad_readable_after_fused_step_and_second_step_reapplies():
    (x, y), = batches(1)
    a, opt_a = make_head()
    b, opt_b = make_head()
    a(x, y).backward()
    b(x, y).backward()
    grad_b = b.center_grad.rows()  # before the step
    momentum_b = opt_b.momentum_buffer()
    opt_a.step()  # fused
    group = opt_b.param_groups[0]
    plain = (group["lr"], group["momentum"], group["weight_decay"])
    ops.sparse_sgd_update_ref(b.weight.data, momentum_b, b.sampled_index, grad_b, *plain)  # plain
    torch.testing.assert_close(a.center_grad.rows(), grad_b, atol=1e-6, rtol=1e-5)  # still readable
    torch.testing.assert_close(a.weight, b.weight, atol=1e-7, rtol=1e-5)
    opt_a.step()  # no new backward: the same gradient again, as torch optimizers do
    ops.sparse_sgd_update_ref(b.weight.data, momentum_b, b.sampled_index, grad_b, *plain)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(opt_a.momentum_buffer(), momentum_b, atol=1e-6, rtol=1e-5)


def test_zero_grad_discards_the_center_gradient():
    pfc, opt = make_head()
    before = pfc.weight.detach().clone()
    (x, y), = batches(1)
    pfc(x, y).backward()
    assert pfc.center_grad.rows() is not None
    opt.zero_grad()
    assert pfc.center_grad.rows() is None
    opt.step()
    assert torch.equal(pfc.weight, before)


@pytest.mark.parametrize("use_ext", [True, False])
def test_accumulation_equals_one_big_batch(use_ext):
    """hold_sample (micro-batches): the center gradients add up; the update equals one big batch's."""
    (x, y), = batches(1, batch=24)
    big = PartialFC(32, 400, sample_rate=0.3, margin=ARCFACE, seed=3, use_ext=use_ext)
    opt_big = SparseSGD(big, lr=0.2, momentum=0.9, weight_decay=5e-4)
    big(x, y).backward()
    opt_big.step()
    acc = PartialFC(32, 400, sample_rate=0.3, margin=ARCFACE, seed=3, use_ext=use_ext)
    opt_acc = SparseSGD(acc, lr=0.2, momentum=0.9, weight_decay=5e-4)
    acc.hold_sample([y[:12], y[12:]])
    for part in (slice(0, 12), slice(12, 24)):
        (acc(x[part], y[part]) / 2).backward()
    torch.testing.assert_close(acc.center_grad.rows(), big.center_grad.rows(), atol=1e-6, rtol=1e-5)
    opt_acc.step()
    acc.hold_sample(None)
    torch.testing.assert_close(acc.weight, big.weight, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Huge pages


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def test_head_init_values_unchanged_by_huge_page_allocation():
    pfc = PartialFC(16, 70000, seed=9)  # 4.5 MB: allocated with madvise
    expected = torch.normal(0, 0.01, (70000, 16), generator=torch.Generator().manual_seed(9))
    assert torch.equal(pfc.weight.detach(), expected)


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are disabled here")
def test_empty_huge_asks_for_huge_pages_on_large_tensors():
    # Whether Linux then backs the range with huge pages depends on how much contiguous memory is free at
    # fault time, so only the request is asserted: madvise accepted on the 2 MiB-aligned part of a large
    # fresh tensor, refused for small ones, and the memory usable as usual.
    assert cpu.advise_huge_pages(torch.empty(8 << 20))
    assert not cpu.advise_huge_pages(torch.empty(10))
    t = cpu.empty_huge((8 << 20,), torch.float32)
    t.fill_(1.0)
    assert t.shape == (8 << 20,) and float(t.sum()) == float(8 << 20)


def test_load_state_dict_restores_momentum():
    pfc, opt = make_head()
    for x, y in batches(2):
        pfc(x, y).backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    fresh = SparseSGD(pfc, lr=0.5, momentum=0.0, weight_decay=0.0)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.2 and fresh.param_groups[0]["momentum"] == 0.9
    assert torch.equal(fresh.momentum_buffer(), opt.momentum_buffer())
    assert fresh.momentum_buffer().data_ptr() != opt.momentum_buffer().data_ptr()
