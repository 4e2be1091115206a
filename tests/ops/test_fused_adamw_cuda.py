"""The CUDA kernel of ``normalize_backward_adamw_update`` (the AdamW update with the normalize backward folded in):
against the PyTorch reference and the CPU kernel over the table and gradient dtypes, with and without
stochastic rounding (bit for bit where the sums are exact), per-row step counts, bad indices as catchable errors
raised before any row is written, and no [S, D] buffer allocated by the step. Every test skips, with the
reason, when no GPU is at hand.

The references and the CPU kernel run on copies of the same inputs on the CPU.
"""
import pytest
import torch

from partialfc.ops import CompiledOps, normalize_backward_adamw_update_ref, op_table

from ops_testutil import TOL, no_gpu_reason, noncontiguous_like

P = torch.ops.partialfc
HYPER = (0.01, 0.9, 0.999, 1e-8, 0.1)  # lr, beta1, beta2, eps, weight_decay
TABLE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_DTYPES = [torch.float32, torch.bfloat16]

pytestmark = pytest.mark.skipif(no_gpu_reason() is not None, reason=no_gpu_reason() or "")
CUDA = torch.device("cuda")


def sq_dtype_for(dtype):
    # As the head stores it: float16's range cannot hold the squares of small gradients.
    return torch.float32 if dtype == torch.float16 else dtype


def make_state(dtype, num_rows, dim, gen, step_dtype=torch.int64):
    weight = (torch.randn(num_rows, dim, generator=gen) * 0.05).to(dtype)
    exp_avg = (torch.randn(num_rows, dim, generator=gen) * 0.1).to(dtype)
    exp_avg_sq = (torch.rand(num_rows, dim, generator=gen) * 0.01).to(sq_dtype_for(dtype))
    row_step = torch.randint(0, 5, (num_rows,), generator=gen).to(step_dtype)
    return [weight, exp_avg, exp_avg_sq, row_step]


def step_inputs(weight, rows, grad_dtype, gen):
    """A sampled index, the gradient of the normalized rows and the rows' inverse norms (from the table as it
    is now, as the forward computes them)."""
    index = torch.sort(torch.randperm(weight.shape[0], generator=gen)[:rows]).values
    grad = torch.randn(rows, weight.shape[1], generator=gen).to(grad_dtype)
    inv_norm = weight.index_select(0, index).float().norm(dim=1).clamp_min(1e-12).reciprocal()
    return index, grad, inv_norm


def to_cuda(tensors):
    return [t.to(CUDA, copy=True) for t in tensors]


def assert_state_close(got, want, dtype, msg):
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), got[:3], want[:3]):
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=atol * 4, rtol=rtol * 4, msg=f"{msg}: {name}")
    assert torch.equal(got[3].cpu(), want[3]), f"{msg}: row_step"


# ---------------------------------------------------------------------------------------------------------
# Against the reference and the CPU kernel


@pytest.mark.parametrize("dtype", TABLE_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("rounding_seed", [None, 1234], ids=["nearest", "stochastic"])
def test_matches_reference_and_cpu_kernel_over_steps(dtype, grad_dtype, rounding_seed):
    gen = torch.Generator().manual_seed(11)
    state = make_state(dtype, 1500, 96, gen)
    start_step = state[3].clone()
    dev, ref, cpu = to_cuda(state), [t.clone() for t in state], [t.clone() for t in state]
    counts = torch.zeros_like(start_step)
    for step in range(3):
        index, grad, inv_norm = step_inputs(ref[0], 400 + 50 * step, grad_dtype, gen)
        grad_scale = (1.0, 1024.0, 3.0)[step]
        rounding = (rounding_seed, step, 70)
        untouched = torch.ones(state[0].shape[0], dtype=torch.bool)
        untouched[index] = False
        before = [t[untouched].clone() for t in dev]
        P.normalize_backward_adamw_update(*dev, index.to(CUDA), grad.to(CUDA), inv_norm.to(CUDA), *HYPER,
                                          grad_scale, *rounding)
        normalize_backward_adamw_update_ref(*ref, index, grad, inv_norm, *HYPER, grad_scale, *rounding)
        P.normalize_backward_adamw_update(*cpu, index, grad, inv_norm, *HYPER, grad_scale, *rounding)
        counts[index] += 1
        assert_state_close(dev, ref, dtype, f"step {step} vs reference")
        assert_state_close(dev, cpu, dtype, f"step {step} vs CPU kernel")
        # Unsampled rows: weight, both moments and step bit for bit.
        untouched_dev = untouched.to(CUDA)
        for got, was in zip(dev, before):
            assert torch.equal(got[untouched_dev], was)
    # Each row's own step count, bumped once per step that sampled it.
    assert torch.equal(dev[3].cpu(), start_step + counts)
    assert int(counts.max()) > int(counts[counts > 0].min())  # rows at different step counts
    assert not torch.equal(dev[0].cpu(), state[0])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("step_dtype", [torch.int64, torch.int32])
def test_float32_layouts_and_step_dtypes_against_cpu_kernel(contiguous, step_dtype):
    gen = torch.Generator().manual_seed(12)
    state = make_state(torch.float32, 700, 130, gen, step_dtype)  # a dimension that is no multiple of 128
    index, grad, inv_norm = step_inputs(state[0], 300, torch.float32, gen)
    cpu = [t.clone() for t in state]
    dev = to_cuda(state)
    dev_grad = grad.to(CUDA)
    if not contiguous:
        dev[:3] = [noncontiguous_like(t) for t in dev[:3]]
        dev_grad = noncontiguous_like(dev_grad)
    P.normalize_backward_adamw_update(*dev, index.to(CUDA), dev_grad, inv_norm.to(CUDA), *HYPER, 2.0)
    P.normalize_backward_adamw_update(*cpu, index, grad, inv_norm, *HYPER, 2.0)
    for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), dev[:3], cpu[:3]):
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=1e-5, msg=name)
    assert dev[3].dtype == step_dtype and torch.equal(dev[3].cpu(), cpu[3])
    assert torch.equal(cpu[3][index], state[3][index] + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq", ["same", "float32"])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_stochastic_rounding_equals_cpu_kernel_and_reference_bit_for_bit(dtype, sq, grad_dtype):
    # Inputs whose dot products and gradient rows are exact in any summation order (few mantissa bits, a
    # power-of-two inverse norm and loss scale), so that the rounding keys (seed, step, class_start + row,
    # column) alone decide the stored bits.
    gen = torch.Generator().manual_seed(13)
    num_rows, dim, rows = 80, 64, 30
    weight = (torch.randint(-8, 9, (num_rows, dim), generator=gen).float() / 64).to(dtype)
    exp_avg = (torch.randint(-8, 9, (num_rows, dim), generator=gen).float() / 4096).to(dtype)
    exp_avg_sq = (torch.rand(num_rows, dim, generator=gen) * 1e-6).to(dtype if sq == "same" else torch.float32)
    row_step = torch.randint(0, 5, (num_rows,), generator=gen)
    state = [weight, exp_avg, exp_avg_sq, row_step]
    dev, ref, cpu = to_cuda(state), [t.clone() for t in state], [t.clone() for t in state]
    inv = torch.full((rows,), 0.25)
    for step in range(3):
        index = torch.sort(torch.randperm(num_rows, generator=gen)[:rows]).values
        grad = (torch.randint(-8, 9, (rows, dim), generator=gen).float() / 1024).to(grad_dtype)
        args = (*HYPER, 4.0, 99, step, 300)
        P.normalize_backward_adamw_update(*dev, index.to(CUDA), grad.to(CUDA), inv.to(CUDA), *args)
        P.normalize_backward_adamw_update(*cpu, index, grad, inv, *args)
        normalize_backward_adamw_update_ref(*ref, index, grad, inv, *args)
        for name, a, b, c in zip(("weight", "exp_avg", "exp_avg_sq", "row_step"), dev, cpu, ref):
            assert torch.equal(b, c), f"step {step}: CPU kernel vs reference, {name}"
            assert torch.equal(a.cpu(), b), f"step {step}: CUDA vs CPU kernel, {name}"
    assert not torch.equal(dev[0].cpu(), weight)
    # Another seed rounds differently.
    other = to_cuda(state)
    P.normalize_backward_adamw_update(*other, index.to(CUDA), grad.to(CUDA), inv.to(CUDA), *HYPER, 4.0, 100, 0,
                                      300)
    again = to_cuda(state)
    P.normalize_backward_adamw_update(*again, index.to(CUDA), grad.to(CUDA), inv.to(CUDA), *HYPER, 4.0, 99, 0,
                                      300)
    assert not torch.equal(other[0], again[0])


def test_float32_table_ignores_the_rounding_seed():
    gen = torch.Generator().manual_seed(14)
    state = make_state(torch.float32, 300, 64, gen)
    index, grad, inv_norm = step_inputs(state[0], 100, torch.float32, gen)
    a, b = to_cuda(state), to_cuda(state)
    args = (index.to(CUDA), grad.to(CUDA), inv_norm.to(CUDA), *HYPER, 1.0)
    P.normalize_backward_adamw_update(*a, *args)
    P.normalize_backward_adamw_update(*b, *args, 5, 3, 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------
# Arguments


def test_empty_input_and_bad_index():
    gen = torch.Generator().manual_seed(15)
    state = to_cuda(make_state(torch.float32, 300, 40, gen))
    before = [t.clone() for t in state]
    P.normalize_backward_adamw_update(*state, torch.empty(0, dtype=torch.long, device=CUDA),
                                      torch.empty(0, 40, device=CUDA), torch.empty(0, device=CUDA), *HYPER, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(state, before))
    index, grad, inv_norm = (t.to(CUDA) for t in step_inputs(before[0].cpu(), 70, torch.float32, gen))
    bad = index.clone()
    bad[3] = 300
    # Raised on the host before the launch: catchable, nothing written, the device still usable.
    with pytest.raises(RuntimeError,
                       match=r"normalize_backward_adamw_update: index\[3\] = 300 is outside \[0, 300\)"):
        P.normalize_backward_adamw_update(*state, bad, grad, inv_norm, *HYPER, 1.0)
    bad[3] = -2
    with pytest.raises(RuntimeError, match=r"index\[3\] = -2 is outside \[0, 300\)"):
        P.normalize_backward_adamw_update(*state, bad, grad, inv_norm, *HYPER, 1.0)
    torch.cuda.synchronize()
    assert all(torch.equal(t, b) for t, b in zip(state, before))
    P.normalize_backward_adamw_update(*state, index, grad, inv_norm, *HYPER, 1.0)
    assert torch.equal(state[3][index], before[3][index] + 1)


def test_argument_checks_as_on_cpu():
    gen = torch.Generator().manual_seed(16)
    state = to_cuda(make_state(torch.float32, 300, 40, gen))
    index, grad, inv_norm = (t.to(CUDA) for t in step_inputs(state[0].cpu(), 70, torch.float32, gen))
    with pytest.raises(RuntimeError, match="normalize_backward_adamw_update: inv_norm must be a Float tensor"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm.double(), *HYPER, 1.0)
    with pytest.raises(RuntimeError, match=r"inv_norm must be \[70\], got \[3\]"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm[:3], *HYPER, 1.0)
    with pytest.raises(RuntimeError, match="grad_scale must be nonzero"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm, *HYPER, 0.0)
    with pytest.raises(RuntimeError, match=r"grad_normalized must be \[70, 40\], got \[5, 40\]"):
        P.normalize_backward_adamw_update(*state, index, grad[:5], inv_norm, *HYPER, 1.0)
    with pytest.raises(RuntimeError, match=r"beta1 must be in \[0, 1\), got 1"):
        P.normalize_backward_adamw_update(*state, index, grad, inv_norm, 0.01, 1.0, 0.999, 1e-8, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="must be on one device"):
        P.normalize_backward_adamw_update(*state, index, grad.cpu(), inv_norm, *HYPER, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Memory


def test_no_sd_buffer_is_allocated():
    """The gradient rows are formed in registers: the step's peak allocation stays far below one float32
    [S, D] buffer (the composed update it replaces allocated two), through the op and the compiled table."""
    num_rows, dim, rows = 80_000, 512, 65_536
    weight = torch.randn(num_rows, dim, device=CUDA) * 0.05
    state = [weight, torch.zeros_like(weight), torch.zeros_like(weight),
             torch.zeros(num_rows, dtype=torch.int64, device=CUDA)]
    index = torch.randperm(num_rows, device=CUDA)[:rows].sort().values
    grad = torch.randn(rows, dim, device=CUDA)
    inv_norm = weight.index_select(0, index).norm(dim=1).reciprocal()
    table = op_table(CUDA)
    assert isinstance(table, CompiledOps)
    bound = rows * dim * 4
    for update in (P.normalize_backward_adamw_update, table.normalize_backward_adamw_update):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        update(*state, index, grad, inv_norm, *HYPER, 1.0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < bound // 8, f"{update}: peak {peak} bytes, one [S, D] float32 buffer is {bound}"
    assert torch.equal(state[3][index], torch.full_like(index, 2))
