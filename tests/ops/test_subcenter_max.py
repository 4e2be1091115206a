"""The sub-center max op (sub-center ArcFace): kernels and reference against a float64 autograd model.

The independent model is ``torch.max`` over the ``[B, S, K]`` view of the cosines, differentiated by autograd.
Ties go to the lowest k in every implementation (CPU and CUDA kernels, reference); a NaN wins.
"""
import pytest
import torch

from partialfc.ops import subcenter_max_backward_ref, subcenter_max_ref

from ops_testutil import TOL

ops = torch.ops.partialfc
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def devices():
    out = ["cpu"]
    from partialfc.ops import extension
    if torch.cuda.is_available() and extension.with_cuda():
        out.append("cuda")
    return out


def model(cosines, k):
    """values [B, S] by torch.max over each identity's K columns (autograd sends the gradient to the max)."""
    return cosines.view(cosines.shape[0], -1, k).max(dim=2)


def layout_of(t, layout):
    """``t`` [B, N] as row-major, as the transpose of a class-major [N, B] buffer, or with an inner stride."""
    if layout == "class_major":
        return t.t().contiguous().t()
    if layout == "strided":
        wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["row_major", "class_major", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_values_argmax_and_gradient_match_torch_max(k, dtype, layout, device):
    g = torch.Generator().manual_seed(k)
    base = torch.rand(9, 7 * k, generator=g, dtype=torch.float64) * 2 - 1  # [B, S*K]
    cosines = layout_of(base.to(dtype).to(device), layout)
    exact = base.to(dtype).double().requires_grad_()  # the model sees the same rounded values, in float64
    want_values, want_arg = model(exact, k)
    grad = torch.randn(9, 7, generator=g, dtype=torch.float64)
    want_values.backward(grad.to(dtype).double())
    for fn in (ops.subcenter_max, subcenter_max_ref):
        values, argmax = fn(cosines, k)
        assert values.dtype == dtype and argmax.dtype == torch.long and values.shape == (9, 7)
        # The max is one of the inputs: exact in every dtype.
        torch.testing.assert_close(values.cpu().double(), want_values.detach(), atol=0, rtol=0)
        assert torch.equal(argmax.cpu(), want_arg)
        for bwd in (ops.subcenter_max_backward, subcenter_max_backward_ref):
            full = bwd(grad.to(dtype).to(device), argmax, k)
            assert full.dtype == dtype and full.shape == (9, 7 * k)
            torch.testing.assert_close(full.cpu().double(), exact.grad, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_of_the_op_is_the_models_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=g, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    grad = torch.randn(5, 4, generator=g, dtype=dtype)
    ops.subcenter_max(a, 3)[0].backward(grad)
    model(b, 3).values.backward(grad.double())
    torch.testing.assert_close(a.grad.double(), b.grad, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    # Well-separated values: the argmax does not flip under gradcheck's perturbation.
    x = (torch.randperm(24, generator=g).double() / 10).view(4, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: ops.subcenter_max(c, 3)[0], (x,))
    assert torch.autograd.gradcheck(lambda c: ops.subcenter_max(c, 2)[0], (x,))


def test_opcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 15, generator=g)
    torch.library.opcheck(ops.subcenter_max, (x, 3))
    torch.library.opcheck(ops.subcenter_max, (x.clone().requires_grad_(), 5))
    _, argmax = ops.subcenter_max(x, 3)
    torch.library.opcheck(ops.subcenter_max_backward, (torch.randn(6, 5, generator=g), argmax, 3))


@pytest.mark.parametrize("device", devices())
def test_ties_go_to_the_lowest_k_and_nan_wins(device):
    nan = float("nan")
    x = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.7, 0.7, 0.1, 0.1, 0.3],
                      [0.1, nan, 0.9, nan, nan, 0.2, -1.0, -1.0, -1.0]], device=device)
    for fn in (ops.subcenter_max, subcenter_max_ref):
        values, argmax = fn(x, 3)
        assert argmax.cpu().tolist() == [[0, 1, 2], [1, 0, 0]]
        torch.testing.assert_close(values.cpu(), torch.tensor([[0.5, 0.7, 0.3], [nan, nan, -1.0]]), equal_nan=True)
        # torch.max agrees where its documentation pins the result (a NaN propagates).
        assert torch.isnan(model(x.cpu(), 3).values[1, :2]).all()


def test_fused_equals_reference_on_a_large_input():
    g = torch.Generator().manual_seed(8)
    # Coarse values: many ties, and rows longer than one parallel task.
    x = torch.randint(0, 5, (64, 3 * 700), generator=g).float()
    for layout in ("row_major", "class_major"):
        values, argmax = ops.subcenter_max(layout_of(x, layout), 3)
        ref_values, ref_argmax = subcenter_max_ref(x, 3)
        assert torch.equal(values, ref_values) and torch.equal(argmax, ref_argmax)
        grad = torch.randn(64, 700, generator=g)
        assert torch.equal(ops.subcenter_max_backward(grad, argmax, 3),
                           subcenter_max_backward_ref(grad, ref_argmax, 3))


def test_bad_input_messages():
    with pytest.raises(RuntimeError, match="cosines has 7 columns, not a multiple of num_subcenters = 3"):
        ops.subcenter_max(torch.zeros(2, 7), 3)
    with pytest.raises(RuntimeError, match="num_subcenters must be at least 1, got 0"):
        ops.subcenter_max(torch.zeros(2, 6), 0)
    with pytest.raises(RuntimeError, match=r"cosines must be 2-D \[B, S\*K\]"):
        ops.subcenter_max(torch.zeros(6), 3)
    with pytest.raises(RuntimeError, match=r"argmax\[1, 0\] = 3 is outside \[0, 3\)"):
        ops.subcenter_max_backward(torch.zeros(2, 2), torch.tensor([[0, 1], [3, 0]]), 3)
    with pytest.raises(RuntimeError, match="argmax must be an int64 tensor of grad's shape"):
        ops.subcenter_max_backward(torch.zeros(2, 2), torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"cosines \[2, 7\] is not \[B, S\*K\] for num_subcenters = 3"):
        subcenter_max_ref(torch.zeros(2, 7), 3)
    with pytest.raises(ValueError, match=r"argmax holds values outside \[0, 3\)"):
        subcenter_max_backward_ref(torch.zeros(1, 1), torch.tensor([[3]]), 3)
