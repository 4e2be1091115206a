"""bfloat16 / float16 class-center storage in the sparse updates: the kernels against the PyTorch reference bit for
bit, and stochastic rounding's unbiasedness against round-to-nearest."""
import pytest
import torch

from partialfc.ops import reference as R

P = torch.ops.partialfc
LOW = [torch.bfloat16, torch.float16]


pytestmark = pytest.mark.skipif(not hasattr(P, "sparse_sgd_update"), reason="partialfc._C is not loaded")


def _tables(dtype, g, num_rows=60, dim=48, rows=25):
    weight = (torch.randn(num_rows, dim, generator=g) * 0.05).to(dtype)
    state = (torch.randn(num_rows, dim, generator=g) * 1e-3).to(dtype)
    index = torch.sort(torch.randperm(num_rows, generator=g)[:rows]).values
    grad = torch.randn(rows, dim, generator=g) * 1e-3
    return weight, state, index, grad


@pytest.mark.parametrize("dtype", LOW)
def test_sgd_kernel_equals_reference_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    weight, momentum, index, grad = _tables(dtype, g)
    w1, m1, w2, m2 = weight.clone(), momentum.clone(), weight.clone(), momentum.clone()
    for step in range(3):
        P.sparse_sgd_update(w1, m1, index, grad, 0.1, 0.9, 5e-4, 1234, step, 1000)
        R.sparse_sgd_update_ref(w2, m2, index, grad, 0.1, 0.9, 5e-4, 1234, step, 1000)
    assert torch.equal(w1, w2) and torch.equal(m1, m2)
    assert not torch.equal(w1, weight)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("sq_dtype", ["same", torch.float32])
def test_adamw_kernel_equals_reference_bit_for_bit(dtype, sq_dtype):
    g = torch.Generator().manual_seed(2)
    weight, exp_avg, index, grad = _tables(dtype, g)
    sq = (torch.rand(weight.shape, generator=g) * 1e-6).to(dtype if sq_dtype == "same" else sq_dtype)
    steps = torch.randint(0, 5, (weight.shape[0],), generator=g)
    a = [weight.clone(), exp_avg.clone(), sq.clone(), steps.clone()]
    b = [weight.clone(), exp_avg.clone(), sq.clone(), steps.clone()]
    for step in range(3):
        P.sparse_adamw_update(*a, index, grad, 1e-3, 0.9, 0.999, 1e-8, 0.05, 99, step, 7)
        R.sparse_adamw_update_ref(*b, index, grad, 1e-3, 0.9, 0.999, 1e-8, 0.05, 99, step, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", LOW)
def test_fused_sgd_equals_reference_bit_for_bit(dtype):
    # Inputs whose dot products are exact in any summation order (few mantissa bits, a power-of-two inverse
    # norm and loss scale), so the kernel's and the reference's sums agree exactly.
    g = torch.Generator().manual_seed(3)
    num_rows, dim, rows = 40, 32, 16
    weight = (torch.randint(-8, 9, (num_rows, dim), generator=g).float() / 64).to(dtype)
    momentum = (torch.randint(-8, 9, (num_rows, dim), generator=g).float() / 4096).to(dtype)
    index = torch.sort(torch.randperm(num_rows, generator=g)[:rows]).values
    grad = torch.randint(-8, 9, (rows, dim), generator=g).float() / 1024
    inv = torch.full((rows,), 0.25)
    w1, m1, w2, m2 = weight.clone(), momentum.clone(), weight.clone(), momentum.clone()
    P.normalize_backward_sgd_update(w1, m1, index, grad, inv, 0.1, 0.9, 5e-4, 4.0, 77, 5, 300)
    R.normalize_backward_sgd_update_ref(w2, m2, index, grad, inv, 0.1, 0.9, 5e-4, 4.0, 77, 5, 300)
    assert torch.equal(w1, w2) and torch.equal(m1, m2)


@pytest.mark.parametrize("dtype", LOW)
def test_tiny_updates_move_weights_on_average(dtype):
    # Each update is a tenth of half an ulp of the weight: round-to-nearest drops every one of them,
    # stochastic rounding moves the weights by the sum in expectation.
    num_rows, dim, steps = 64, 64, 200
    weight0 = torch.ones(num_rows, dim, dtype=dtype)
    ulp = float(torch.finfo(dtype).eps)  # spacing just above 1.0
    delta = 0.05 * ulp
    index = torch.arange(num_rows)
    grad = torch.full((num_rows, dim), -delta / 0.5)  # lr 0.5, no momentum: w += delta per step
    nearest, mom_n = weight0.clone(), torch.zeros_like(weight0)
    stochastic, mom_s = weight0.clone(), torch.zeros_like(weight0)
    for step in range(steps):
        P.sparse_sgd_update(nearest, mom_n, index, grad, 0.5, 0.0, 0.0)
        P.sparse_sgd_update(stochastic, mom_s, index, grad, 0.5, 0.0, 0.0, 11, step, 0)
    assert torch.equal(nearest, weight0)
    moved = (stochastic.double() - 1.0).mean().item()
    expected = steps * delta
    assert abs(moved - expected) < 0.1 * expected, (moved, expected)


def test_same_seed_same_result_and_class_keys():
    g = torch.Generator().manual_seed(4)
    weight, momentum, index, grad = _tables(torch.bfloat16, g)
    runs = []
    for _ in range(2):
        w, m = weight.clone(), momentum.clone()
        P.sparse_sgd_update(w, m, index, grad, 0.1, 0.9, 0.0, 5, 3, 0)
        runs.append(w)
    assert torch.equal(runs[0], runs[1])
    # A shard starting at class 10 rounds its local row r as global class r + 10 does.
    full_w, full_m = weight.clone(), momentum.clone()
    P.sparse_sgd_update(full_w, full_m, index, grad, 0.1, 0.9, 0.0, 5, 3, 0)
    keep = index >= 10
    shard_w, shard_m = weight[10:].clone(), momentum[10:].clone()
    P.sparse_sgd_update(shard_w, shard_m, index[keep] - 10, grad[keep], 0.1, 0.9, 0.0, 5, 3, 10)
    assert torch.equal(shard_w, full_w[10:])


def test_float32_ignores_rounding_arguments():
    g = torch.Generator().manual_seed(5)
    weight, momentum, index, grad = _tables(torch.float32, g)
    w1, m1, w2, m2 = weight.clone(), momentum.clone(), weight.clone(), momentum.clone()
    P.sparse_sgd_update(w1, m1, index, grad, 0.1, 0.9, 5e-4)
    P.sparse_sgd_update(w2, m2, index, grad, 0.1, 0.9, 5e-4, 9, 9, 9)
    assert torch.equal(w1, w2) and torch.equal(m1, m2)


def test_float16_subnormal_rounding_is_unbiased():
    x = torch.full((8, 4096), 3.3e-7)  # between float16 subnormals (multiples of 2^-24 ~ 6e-8)
    keys = R.rounding_row_keys(3, 0, torch.arange(8))
    y = R.stochastic_round_ref(x, torch.float16, keys, R.ROUND_WEIGHT).double()
    assert set(torch.unique(y).tolist()) == {5 * 2.0 ** -24, 6 * 2.0 ** -24}
    assert abs(y.mean().item() - 3.3e-7) < 0.01 * 3.3e-7


@pytest.mark.parametrize("fused", [False, True], ids=["sparse_sgd_update", "normalize_backward_sgd_update"])
def test_bf16_contiguous_rows_equal_the_strided_path_with_non_finite_values(fused):
    # Contiguous bfloat16 rows take a lane-parallel loop, strided ones the element-wise one: the same bits,
    # NaN, infinities and values that round up to infinity included, and both equal the reference.
    g = torch.Generator().manual_seed(7)
    weight, momentum, index, grad = _tables(torch.bfloat16, g, dim=40)
    weight[index[0], :3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).bfloat16()
    weight[index[1], 0] = torch.finfo(torch.bfloat16).max
    grad[2, :2] = torch.tensor([float("nan"), 1e30])
    inv_norm = torch.rand(index.numel(), generator=g) + 0.5

    def update(w, m, op):
        if fused:
            op(w, m, index, grad, inv_norm, 0.1, 0.9, 5e-4, 2.0, 99, 4, 50)
        else:
            op(w, m, index, grad, 0.1, 0.9, 5e-4, 99, 4, 50)

    kernel = P.normalize_backward_sgd_update if fused else P.sparse_sgd_update
    ref = R.normalize_backward_sgd_update_ref if fused else R.sparse_sgd_update_ref
    wc, mc = weight.clone(), momentum.clone()
    update(wc, mc, kernel)
    wide_w = torch.empty(weight.shape[0], 2 * weight.shape[1], dtype=weight.dtype)
    wide_m = torch.empty_like(wide_w)
    ws, ms = wide_w[:, ::2], wide_m[:, ::2]  # the same rows, column stride 2
    ws.copy_(weight)
    ms.copy_(momentum)
    update(ws, ms, kernel)
    wr, mr = weight.clone(), momentum.clone()
    update(wr, mr, ref)
    same = lambda a, b: torch.equal(a.view(torch.int16), b.contiguous().view(torch.int16))
    assert same(wc, ws) and same(mc, ms)
    # the reference's NaN has another payload (its own bit arithmetic); every other value bit for bit
    for kernel_out, ref_out in ((wc, wr), (mc, mr)):
        torch.testing.assert_close(kernel_out.float(), ref_out.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(wc.float()).any()  # (an infinite weight becomes NaN: inf - lr * inf)
