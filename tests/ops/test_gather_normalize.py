"""Fused gather + L2-normalize and its backward against the references."""
import pytest
import torch

from partialfc.ops import gather_normalize_backward_ref, gather_normalize_ref

from ops_testutil import TOL, noncontiguous_like

ops = torch.ops.partialfc
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make(num_rows, dim, rows, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=g).to(dtype).to(device)
    index = torch.sort(torch.randperm(num_rows, generator=g)[:rows]).values.to(device)
    return weight, index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_forward_matches_reference(device, dtype, contiguous, out_dtype):
    weight, index = make(300, 40, 70, dtype, device)
    if not contiguous:
        weight = noncontiguous_like(weight)
    out_dtype = out_dtype or dtype
    normalized, inv_norm = ops.gather_normalize(weight, index, out_dtype)
    ref_normalized, ref_inv = gather_normalize_ref(weight, index, out_dtype)
    assert normalized.dtype == out_dtype and inv_norm.dtype == ref_inv.dtype
    atol, rtol = TOL[dtype] if TOL[dtype] > TOL[out_dtype] else TOL[out_dtype]
    torch.testing.assert_close(normalized, ref_normalized, atol=atol, rtol=rtol)
    torch.testing.assert_close(inv_norm, ref_inv, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_out_variant_and_zero_rows(device):
    weight, index = make(50, 8, 10, torch.float32, device)
    weight[index[3]] = 0.0  # a zero row: inverse norm clamps at 1e12, the row stays 0
    out = torch.full((10, 8), float("nan"), device=device)
    inv = torch.empty(10, device=device)
    ops.gather_normalize_out(weight, index, out, inv)
    ref_out, ref_inv = gather_normalize_ref(weight, index)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(inv, ref_inv)
    assert float(inv[3]) == pytest.approx(1e12) and bool((out[3] == 0).all())
    # Empty index.
    empty = torch.empty(0, dtype=torch.long, device=device)
    normalized, inv_norm = ops.gather_normalize(weight, empty, torch.float32)
    assert normalized.shape == (0, 8) and inv_norm.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_backward_matches_reference(device, dtype, contiguous):
    weight, index = make(300, 40, 70, dtype, device)
    normalized, inv_norm = gather_normalize_ref(weight, index)
    grad = torch.randn(normalized.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    if not contiguous:
        grad, normalized = noncontiguous_like(grad), noncontiguous_like(normalized)
    rows = ops.gather_normalize_backward(grad, normalized, inv_norm)
    ref = gather_normalize_backward_ref(grad, normalized, inv_norm)
    assert rows.shape == (70, 40) and rows.dtype == ref.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(rows, ref, atol=atol * 10, rtol=rtol)
    # In place: out aliases grad (same dtype as inv_norm).
    if dtype in (torch.float32, torch.float64):
        buf = grad.clone()
        ops.gather_normalize_backward_out(buf, normalized, inv_norm, buf)
        torch.testing.assert_close(buf, ref, atol=atol * 10, rtol=rtol)


def test_gradcheck_float64(device):
    weight, index = make(30, 6, 7, torch.float64, device)
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ops.gather_normalize(w, index, torch.float64), (weight,))
    # The backward op alone: the gradient of the gathered raw rows.
    rows = weight.detach().index_select(0, index).requires_grad_()
    all_rows = torch.arange(7, device=device)

    def normalize_rows(r):
        normalized, _ = ops.gather_normalize(r, all_rows, torch.float64)
        return normalized

    assert torch.autograd.gradcheck(normalize_rows, (rows,))


def test_bad_input_messages():
    weight = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 10 is outside \[0, 10\)"):
        ops.gather_normalize(weight, torch.tensor([0, 10]), torch.float32)
    with pytest.raises(RuntimeError, match="index must be a 1-D int64"):
        ops.gather_normalize(weight, torch.tensor([0, 1], dtype=torch.int32), torch.float32)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.gather_normalize_backward(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64), torch.ones(2))


def test_opcheck():
    weight, index = make(40, 8, 9, torch.float32, "cpu")
    torch.library.opcheck(ops.gather_normalize, (weight.requires_grad_(), index, torch.float32))
    normalized, inv_norm = gather_normalize_ref(weight.detach(), index)
    torch.library.opcheck(ops.gather_normalize_out, (weight.detach(), index, torch.empty(9, 8), torch.empty(9)))
    grad = torch.randn(9, 8)
    torch.library.opcheck(ops.gather_normalize_backward, (grad, normalized, inv_norm))
    torch.library.opcheck(ops.gather_normalize_backward_out, (grad, normalized, inv_norm, torch.empty(9, 8)))


@pytest.mark.parametrize("dim", [512, 40])
def test_bf16_rows_into_aligned_and_unaligned_float32_rows_agree(dim):
    # On CPU a bfloat16 table gathered into 64-byte aligned float32 rows (dim a multiple of 16) takes a path with
    # streaming stores; other destinations take the plain row loop. Both must give the same bits, and the
    # reference's values.
    weight, index = make(3000, dim, 700, torch.bfloat16, "cpu", seed=5)
    aligned, inv_aligned = torch.empty(700, dim), torch.empty(700)
    ops.gather_normalize_out(weight, index, aligned, inv_aligned)
    spare = torch.empty(700 * dim + 1)
    unaligned, inv_unaligned = spare[1:].view(700, dim), torch.empty(700)
    assert aligned.data_ptr() % 64 == 0 and unaligned.data_ptr() % 64 != 0
    ops.gather_normalize_out(weight, index, unaligned, inv_unaligned)
    assert torch.equal(aligned, unaligned) and torch.equal(inv_aligned, inv_unaligned)
    ref, ref_inv = gather_normalize_ref(weight, index, torch.float32)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(aligned, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(inv_aligned, ref_inv, atol=atol, rtol=rtol)
