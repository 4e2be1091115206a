"""The CUDA kernels of partialfc._C on a GPU: each op against its reference over the storage dtypes, tables of
more than 2^31 elements, bad indices and labels as catchable errors that leave the process usable, ops on a
non-default stream, and NaN rows. Every test skips, with the reason, when no GPU is at hand.

The references run on the CPU in float32 or float64 (an expectation computed apart from the device), except
for the sampler, whose kernel draws other negatives than the reference and is checked against its contract.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from partialfc.ops import (gather_normalize_backward_ref, gather_normalize_ref,
                           margin_softmax_backward_ref, margin_softmax_forward_ref, sparse_adamw_update_ref,
                           sparse_sgd_update_ref)

from ops_testutil import TOL, no_gpu_reason, noncontiguous_like

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ops = torch.ops.partialfc
ARCFACE = (64.0, 1.0, 0.5, 0.0)
HALF_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ADAMW = (0.01, 0.9, 0.999, 1e-8, 0.1)  # lr, beta1, beta2, eps, weight_decay


pytestmark = pytest.mark.skipif(no_gpu_reason() is not None, reason=no_gpu_reason() or "")
CUDA = torch.device("cuda")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sorted_index(num_rows, rows, seed=0):
    return torch.sort(torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))[:rows]).values


# ---------------------------------------------------------------------------------------------------------
# Each op against its reference


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gather_normalize_and_backward_match_reference(dtype, out_dtype, contiguous):
    weight, index = rand(3000, 200, dtype=dtype), sorted_index(3000, 700)
    out_dtype = out_dtype or dtype
    w = weight.to(CUDA)
    if not contiguous:
        w = noncontiguous_like(w)
    normalized, inv_norm = ops.gather_normalize(w, index.to(CUDA), out_dtype)
    ref_normalized, ref_inv = gather_normalize_ref(weight.double(), index)
    assert normalized.dtype == out_dtype and inv_norm.dtype == torch.float32
    atol, rtol = max(TOL[dtype], TOL[out_dtype])
    torch.testing.assert_close(normalized.cpu().double(), ref_normalized, atol=atol, rtol=rtol)
    torch.testing.assert_close(inv_norm.cpu().double(), ref_inv, atol=0, rtol=1e-5)

    grad = rand(700, 200, seed=1, dtype=dtype)
    rows = ops.gather_normalize_backward(grad.to(CUDA), normalized.to(dtype), inv_norm)
    ref_rows = gather_normalize_backward_ref(grad.double(), normalized.cpu().to(dtype).double(),
                                             inv_norm.cpu().double())
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows.cpu().double(), ref_rows, atol=TOL[dtype][0] * 10, rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_margin_softmax_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    batch, num_sample = 96, 1000
    cosines = ((torch.rand(batch, num_sample, generator=g) * 2 - 1) * 0.9).to(dtype)
    labels = torch.randint(0, num_sample, (batch,), generator=g)
    labels[::5] = -1  # samples whose class lives on another rank
    cosines[1, labels[1]] = -0.999  # the margin's fallback branch
    out = cosines.to(CUDA, copy=True)
    stats = ops.margin_softmax_forward(out, labels.to(CUDA), *ARCFACE, 0.0)
    # The reference in float32 on the same stored values (in half precision its clamps underflow).
    ref_out = cosines.float().clone()
    ref_stats = margin_softmax_forward_ref(ref_out, labels, *ARCFACE, 0.0)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.cpu().float(), ref_out, atol=atol * ARCFACE[0], rtol=rtol)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), stats, ref_stats):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.cpu().float(), b, atol=atol * ARCFACE[0], rtol=rtol * 4, msg=name)

    # The backward as the kernel gets its inputs: the statistics rounded to the logits' dtype.
    row_max, sum_exp, _, target_cos = (t.to(dtype).float() for t in ref_stats)
    grad = ref_out.to(dtype).to(CUDA)
    ops.margin_softmax_backward(grad, labels.to(CUDA), row_max.to(CUDA), sum_exp.to(CUDA), target_cos.to(CUDA),
                                *ARCFACE, 1.0 / batch, 0.0)
    ref_grad = margin_softmax_backward_ref(ref_out.to(dtype).float(), labels, row_max, sum_exp, target_cos, *ARCFACE,
                                           1.0 / batch, 0.0)
    torch.testing.assert_close(grad.cpu().float(), ref_grad, atol=atol * 10, rtol=rtol * 4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_sparse_sgd_update_matches_reference(dtype, grad_dtype):
    weight, momentum = rand(2000, 128, dtype=dtype), rand(2000, 128, seed=1, dtype=dtype)
    index, grad = sorted_index(2000, 500), rand(500, 128, seed=2, dtype=grad_dtype)
    w, m = weight.to(CUDA, copy=True), momentum.to(CUDA, copy=True)
    ops.sparse_sgd_update(w, m, index.to(CUDA), grad.to(CUDA), 0.1, 0.9, 5e-4)
    # float32 math on the same stored values; the kernel rounds only its results to the table's dtype.
    w_ref, m_ref = weight.float().clone(), momentum.float().clone()
    sparse_sgd_update_ref(w_ref, m_ref, index, grad.to(dtype).float(), 0.1, 0.9, 5e-4)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(w.cpu().float(), w_ref, atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(m.cpu().float(), m_ref, atol=atol * 4, rtol=rtol)
    untouched = torch.ones(2000, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(w.cpu()[untouched], weight[untouched]) and torch.equal(m.cpu()[untouched], momentum[untouched])


@pytest.mark.parametrize("grad_dtype", HALF_DTYPES)
def test_sparse_adamw_update_matches_reference(grad_dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(1500, 64, generator=g)
    exp_avg, exp_avg_sq = torch.randn(1500, 64, generator=g) * 0.1, torch.rand(1500, 64, generator=g) * 0.01
    row_step = torch.randint(0, 5, (1500,), generator=g)
    state = [t.to(CUDA, copy=True) for t in (weight, exp_avg, exp_avg_sq, row_step)]
    ref = [t.double() if t.is_floating_point() else t.clone() for t in (weight, exp_avg, exp_avg_sq, row_step)]
    for step in range(3):
        index, grad = sorted_index(1500, 400, seed=10 + step), rand(400, 64, seed=20 + step, dtype=grad_dtype)
        ops.sparse_adamw_update(*state, index.to(CUDA), grad.to(CUDA), *ADAMW)
        sparse_adamw_update_ref(*ref, index, grad.double(), *ADAMW)
    for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), state, ref):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(state[3].cpu(), ref[3])


def test_sample_classes_contract():
    g = torch.Generator().manual_seed(4)
    class_start, num_local, num_sample = 1000, 200000, 20000
    labels = torch.randint(0, 3 * num_local, (512,), generator=g)
    index, remapped = ops.sample_classes(labels.to(CUDA), class_start, num_local, num_sample, 11)
    index, remapped = index.cpu(), remapped.cpu()
    local = labels - class_start
    is_local = (local >= 0) & (local < num_local)
    assert index.numel() == num_sample
    assert torch.equal(index, torch.unique(index)), "sorted, no class twice"
    assert 0 <= int(index[0]) and int(index[-1]) < num_local
    assert set(local[is_local].tolist()) <= set(index.tolist()), "every positive is sampled"
    assert torch.equal(index[remapped[is_local]], local[is_local])
    assert bool((remapped[~is_local] == -1).all())


# ---------------------------------------------------------------------------------------------------------
# Tables of more than 2^31 elements: 64-bit offsets in the kernels

DIM = 512
BIG_ROWS = 2 ** 31 // DIM + 1024  # 2^31 + 2^19 elements


def _need_gpu_bytes(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes * 1.2:
        pytest.skip(f"needs {nbytes / 2 ** 30:.1f} GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")


def _big_table_index():
    """Rows at the start, on both sides of element 2^31 (row 2^22 is the first past it) and at the end."""
    return torch.tensor([0, 7, 2 ** 22 - 1, 2 ** 22, BIG_ROWS - 513, BIG_ROWS - 2, BIG_ROWS - 1])


def test_gather_normalize_on_a_table_of_more_than_2_31_elements():
    _need_gpu_bytes(BIG_ROWS * DIM * 4)
    index = _big_table_index()
    rows = rand(index.numel(), DIM, seed=5)
    weight = torch.zeros(BIG_ROWS, DIM, device=CUDA)
    assert weight.numel() > 2 ** 31
    weight[index.to(CUDA)] = rows.to(CUDA)
    normalized, inv_norm = ops.gather_normalize(weight, index.to(CUDA), torch.float32)
    ref_normalized, ref_inv = gather_normalize_ref(rows.double(), torch.arange(index.numel()))
    torch.testing.assert_close(normalized.cpu().double(), ref_normalized, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inv_norm.cpu().double(), ref_inv, atol=0, rtol=1e-5)
    del weight
    torch.cuda.empty_cache()


def test_sparse_sgd_update_on_a_table_of_more_than_2_31_elements():
    _need_gpu_bytes(2 * BIG_ROWS * DIM * 4)
    index = _big_table_index()
    rows, grad = rand(index.numel(), DIM, seed=6), rand(index.numel(), DIM, seed=7)
    weight = torch.zeros(BIG_ROWS, DIM, device=CUDA)
    momentum = torch.zeros(BIG_ROWS, DIM, device=CUDA)
    weight[index.to(CUDA)] = rows.to(CUDA)
    ops.sparse_sgd_update(weight, momentum, index.to(CUDA), grad.to(CUDA), 0.1, 0.9, 5e-4)
    w_ref, m_ref = rows.double(), torch.zeros(index.numel(), DIM, dtype=torch.float64)
    sparse_sgd_update_ref(w_ref, m_ref, torch.arange(index.numel()), grad.double(), 0.1, 0.9, 5e-4)
    torch.testing.assert_close(weight[index.to(CUDA)].cpu().double(), w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(momentum[index.to(CUDA)].cpu().double(), m_ref, atol=1e-6, rtol=1e-5)
    # The rows next to the sampled ones stay zero, and the momentum holds nothing but the sampled rows.
    neighbours = torch.tensor([1, 8, 2 ** 22 - 2, 2 ** 22 + 1, BIG_ROWS - 512, BIG_ROWS - 3]).to(CUDA)
    assert not bool(weight[neighbours].any()) and not bool(momentum[neighbours].any())
    assert int(torch.count_nonzero(momentum)) == int(torch.count_nonzero(grad + 5e-4 * rows))
    del weight, momentum
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Bad indices and labels: a catchable error naming the value, and the process stays usable

CHILD = textwrap.dedent("""
    import sys
    import torch
    from partialfc.ops import extension
    assert extension.available() and extension.with_cuda(), extension.LOAD_ERROR
    ops, dev = torch.ops.partialfc, torch.device("cuda")
    case = sys.argv[1]
    weight, momentum = torch.randn(64, 16, device=dev), torch.zeros(64, 16, device=dev)
    before = weight.clone()
    grad = torch.ones(3, 16, device=dev)
    bad = torch.tensor([3, 5, 64] if case != "gather_negative" else [-2, 5, 9], device=dev)
    logits, labels = torch.rand(4, 7, device=dev), torch.tensor([0, 7, -1, 2], device=dev)
    try:
        if case in ("gather", "gather_negative"):
            ops.gather_normalize(weight, bad, torch.float32)
        elif case == "gather_out":
            ops.gather_normalize_out(weight, bad, torch.empty(3, 16, device=dev), torch.empty(3, device=dev))
        elif case == "sgd":
            ops.sparse_sgd_update(weight, momentum, bad, grad, 0.1, 0.9, 0.0)
        elif case == "adamw":
            ops.sparse_adamw_update(weight, momentum, torch.zeros_like(momentum),
                                    torch.zeros(64, dtype=torch.long, device=dev), bad, grad, 0.01, 0.9, 0.999,
                                    1e-8, 0.0)
        elif case == "margin_forward":
            ops.margin_softmax_forward(logits, labels, 64.0, 1.0, 0.5, 0.0, 0.0)
        elif case == "margin_backward":
            ones = torch.ones(4, device=dev)
            ops.margin_softmax_backward(logits, labels, ones, ones, ones, 64.0, 1.0, 0.5, 0.0, 0.25, 0.0)
        torch.cuda.synchronize()
    except RuntimeError as e:
        print("CAUGHT", str(e).splitlines()[0])
    else:
        print("NO ERROR")
    # The context survived: the failed call wrote nothing, and a good op runs and gives the right answer.
    print("UNTOUCHED" if torch.equal(weight, before) and not momentum.any() else "MODIFIED")
    index = torch.tensor([0, 9, 63], device=dev)
    out, _ = ops.gather_normalize(weight, index, torch.float32)
    expected = torch.nn.functional.normalize(weight.cpu()[index.cpu()])
    torch.cuda.synchronize()
    print("USABLE" if torch.allclose(out.cpu(), expected, atol=1e-6) else "WRONG RESULT")
""")

BAD_CASES = {
    "gather": r"gather_normalize: index\[2\] = 64 is outside \[0, 64\)",
    "gather_negative": r"gather_normalize: index\[0\] = -2 is outside \[0, 64\)",
    "gather_out": r"gather_normalize: index\[2\] = 64 is outside \[0, 64\)",
    "sgd": r"sparse_sgd_update: index\[2\] = 64 is outside \[0, 64\)",
    "adamw": r"sparse_adamw_update: index\[2\] = 64 is outside \[0, 64\)",
    "margin_forward": r"margin_softmax_forward: labels\[1\] = 7 is outside \[-1, 7\)",
    "margin_backward": r"margin_softmax_backward: labels\[1\] = 7 is outside \[-1, 7\)",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_index_is_a_catchable_error_in_a_subprocess(case):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the process died (exit {proc.returncode}):\n{output[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("CAUGHT"), output[-3000:]
    assert re.search(BAD_CASES[case], lines[0]), lines[0]
    assert lines[1:] == ["UNTOUCHED", "USABLE"], output[-3000:]


# ---------------------------------------------------------------------------------------------------------
# A non-default stream: each op runs on the current stream, after the work queued there before it


def _on_busy_side_stream(prepare, run):
    """``run()`` on a side stream right after ``prepare()`` was queued there behind a ~50 ms sleep: an op that
    launched on another stream, or did not wait for the one it was called on, would read the inputs before
    ``prepare`` wrote them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        prepare()
        result = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return result


def test_ops_on_a_non_default_stream_give_the_default_streams_results():
    weight, index = rand(4000, 256, seed=8), sorted_index(4000, 900, seed=8)
    momentum, grad = rand(4000, 256, seed=9), rand(900, 256, seed=10)
    w_dev, i_dev = weight.to(CUDA), index.to(CUDA)
    expected_norm = ops.gather_normalize(w_dev, i_dev, torch.float32)
    w_expected, m_expected = w_dev.clone(), momentum.to(CUDA)
    ops.sparse_sgd_update(w_expected, m_expected, i_dev, grad.to(CUDA), 0.1, 0.9, 5e-4)
    cos = (torch.rand(64, 900, generator=torch.Generator().manual_seed(11)) * 1.8 - 0.9).to(CUDA)
    labels = torch.randint(0, 900, (64,), generator=torch.Generator().manual_seed(12)).to(CUDA)
    expected_logits = cos.clone()
    expected_stats = ops.margin_softmax_forward(expected_logits, labels, *ARCFACE, 0.0)
    torch.cuda.synchronize()

    # Inputs filled with garbage first, the real values written on the side stream behind the sleep.
    w_side, i_side = torch.full_like(w_dev, float("nan")), torch.zeros_like(i_dev)
    normalized, inv_norm = _on_busy_side_stream(lambda: (w_side.copy_(w_dev), i_side.copy_(i_dev)),
                                                lambda: ops.gather_normalize(w_side, i_side, torch.float32))
    assert torch.equal(normalized, expected_norm[0]) and torch.equal(inv_norm, expected_norm[1])

    w_upd, m_upd = torch.zeros_like(w_dev), torch.zeros_like(w_dev)
    g_side = torch.zeros(900, 256, device=CUDA)
    _on_busy_side_stream(lambda: (w_upd.copy_(w_dev), m_upd.copy_(momentum.to(CUDA)), g_side.copy_(grad.to(CUDA))),
                         lambda: ops.sparse_sgd_update(w_upd, m_upd, i_dev, g_side, 0.1, 0.9, 5e-4))
    assert torch.equal(w_upd, w_expected) and torch.equal(m_upd, m_expected)

    logits = torch.zeros_like(cos)
    stats = _on_busy_side_stream(lambda: logits.copy_(cos),
                                 lambda: ops.margin_softmax_forward(logits, labels, *ARCFACE, 0.0))
    assert torch.equal(logits, expected_logits)
    for a, b in zip(stats, expected_stats):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# NaN, zero and infinite rows


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_nan_row_normalizes_to_nan_as_on_cpu_and_in_the_reference(dtype):
    weight, index = rand(50, 32, seed=13, dtype=dtype), torch.tensor([2, 3, 4, 10, 20])
    weight[3, 7] = float("nan")
    weight[4] = 0.0
    weight[10, 1] = float("inf")
    cuda_out, cuda_inv = ops.gather_normalize(weight.to(CUDA), index.to(CUDA), torch.float32)
    cpu_out, cpu_inv = ops.gather_normalize(weight, index, torch.float32)
    ref_out, ref_inv = gather_normalize_ref(weight.float(), index)
    for out, inv in ((cpu_out, cpu_inv), (ref_out, ref_inv)):
        torch.testing.assert_close(cuda_out.cpu(), out, equal_nan=True, atol=TOL[dtype][0], rtol=TOL[dtype][1])
        torch.testing.assert_close(cuda_inv.cpu(), inv, equal_nan=True, atol=0, rtol=1e-5)
    # The NaN row: NaN everywhere, inverse norm NaN. The zero row: clamped. The infinite row: inverse norm 0.
    assert bool(cuda_out[1].isnan().all()) and bool(cuda_inv[1].isnan())
    assert float(cuda_inv[2]) == pytest.approx(1e12) and not bool(cuda_out[2].any())
    assert float(cuda_inv[3]) == 0.0 and bool(cuda_out[3, 1].isnan()) and int(cuda_out[3].isnan().sum()) == 1
    assert bool(cuda_out[[0, 4]].isfinite().all())
