"""Sparse SGD-momentum update against the reference and torch.optim.SGD."""
import pytest
import torch

from partialfc.ops import sparse_sgd_update_ref

from ops_testutil import TOL, noncontiguous_like

ops = torch.ops.partialfc


def make(dtype, device, num_rows=200, dim=24, rows=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=g).to(dtype).to(device)
    momentum = torch.randn(num_rows, dim, generator=g).to(dtype).to(device)
    index = torch.sort(torch.randperm(num_rows, generator=g)[:rows]).values.to(device)
    grad = torch.randn(rows, dim, generator=g).to(device)
    return weight, momentum, index, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("hyper", [(0.1, 0.9, 5e-4), (0.5, 0.0, 0.0)])
def test_matches_reference(device, dtype, contiguous, hyper):
    weight, momentum, index, grad = make(dtype, device)
    if not contiguous:
        weight, momentum, grad = noncontiguous_like(weight), noncontiguous_like(momentum), noncontiguous_like(grad)
    w_ref, m_ref = weight.clone(), momentum.clone()
    untouched = torch.ones(weight.shape[0], dtype=torch.bool, device=device)
    untouched[index] = False
    before_w, before_m = weight[untouched].clone(), momentum[untouched].clone()
    ops.sparse_sgd_update(weight, momentum, index, grad, *hyper)
    sparse_sgd_update_ref(w_ref, m_ref, index, grad, *hyper)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(weight, w_ref, atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(momentum, m_ref, atol=atol * 4, rtol=rtol)
    # Unsampled rows are bit-for-bit untouched.
    assert torch.equal(weight[untouched], before_w) and torch.equal(momentum[untouched], before_m)


def test_equals_torch_sgd_on_sampled_rows(device):
    weight, _, index, grad = make(torch.float32, device)
    momentum = torch.zeros_like(weight)
    dense = weight.clone().requires_grad_()
    opt = torch.optim.SGD([dense], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        g = grad * (step + 1)
        ops.sparse_sgd_update(weight, momentum, index, g, 0.05, 0.9, 1e-3)
        # torch.optim.SGD on a parameter made of the sampled rows only.
        rows = dense.detach()[index].clone().requires_grad_()
        if step == 0:
            sub = torch.optim.SGD([rows], lr=0.05, momentum=0.9, weight_decay=1e-3)
        else:
            sub.param_groups[0]["params"] = [rows]
            sub.state[rows] = state
        rows.grad = g.clone()
        sub.step()
        state = sub.state[rows]
        with torch.no_grad():
            dense[index] = rows
    torch.testing.assert_close(weight, dense.detach(), atol=1e-6, rtol=1e-6)


def test_empty_and_bad_inputs(device):
    weight, momentum, _, _ = make(torch.float32, device)
    before = weight.clone()
    ops.sparse_sgd_update(weight, momentum, torch.empty(0, dtype=torch.long, device=device),
                          torch.empty(0, weight.shape[1], device=device), 0.1, 0.9, 0.0)
    assert torch.equal(weight, before)
    with pytest.raises(RuntimeError, match="grad_rows must be"):
        ops.sparse_sgd_update(weight, momentum, torch.tensor([1, 2], device=device),
                              torch.zeros(3, weight.shape[1], device=device), 0.1, 0.9, 0.0)
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match=r"index\[0\] = 500 is outside"):
            ops.sparse_sgd_update(weight, momentum, torch.tensor([500]), torch.zeros(1, weight.shape[1]), 0.1, 0.9, 0.0)


def test_opcheck():
    weight, momentum, index, grad = make(torch.float32, "cpu")
    torch.library.opcheck(ops.sparse_sgd_update, (weight, momentum, index, grad, 0.1, 0.9, 5e-4))
