"""The CUDA margin backwards' grad_absmax and their 16-byte-vector path, against the references.

grad_absmax (float32, one element) must become the larger of its entry value and the largest |gradient| as the
kernel stored it; the gradients themselves are checked against the references run on the CPU (the fixed margin
in float64, then rounded to the logits' dtype). The layouts cover the vectorized path (16-byte aligned rows,
with and without a partial last vector, one block and several per row) and the element-by-element path
(unaligned row lengths, strided, misaligned). Every test skips without a GPU.
"""
import pytest
import torch

from partialfc.ops import (margin_softmax_backward_adaptive_ref, margin_softmax_backward_ref,
                           margin_softmax_forward_adaptive_ref, margin_softmax_forward_ref)

from ops_testutil import TOL, no_gpu_reason, noncontiguous_like

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(no_gpu_reason() is not None, reason=no_gpu_reason() or "")]

ops = torch.ops.partialfc
CUDA = torch.device("cuda")
ARCFACE = (64.0, 1.0, 0.5, 0.0)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (rows, cols): one partial block per row; several blocks per row element by element, and (padded) a partial
# last vector for every VEC; several blocks per row for every VEC
SHAPES = [(7, 100), (33, 1003), (5, 5000)]
LAYOUTS = ["contiguous", "padded", "strided", "misaligned"]
PAD = -3.0  # what the padding of the padded layout holds, and must still hold after the op


def layout_of(t, layout):
    """``t`` on the GPU in the given layout: contiguous (16-byte aligned rows when the row length allows),
    padded (the rows of a wider tensor whose rows are 16-byte aligned: the vectorized path, with a partial last
    vector when the row length is no multiple of the vector), strided (inner stride 2) or misaligned (contiguous
    rows starting one element past a 16-byte boundary)."""
    t = t.to(CUDA)
    if layout == "contiguous":
        return t.clone()
    if layout == "padded":
        wide = torch.full((t.shape[0], (t.shape[1] // 8 + 2) * 8), PAD, dtype=t.dtype, device=CUDA)
        view = wide[:, :t.shape[1]]
        view.copy_(t)
        assert view.data_ptr() % 16 == 0 and view.stride(0) * view.element_size() % 16 == 0
        return view
    if layout == "strided":
        return noncontiguous_like(t)
    wide = torch.empty(t.shape[0] * t.shape[1] + 1, dtype=t.dtype, device=CUDA)
    view = wide[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def cosines_and_labels(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cosines = ((torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) * 0.9)
    labels = torch.randint(0, cols, (rows,), generator=g)
    labels[::4] = -1  # samples whose class lives on another rank
    cosines[1, labels[1]] = 0.95  # a confident target: the row's largest gradient can be a negative's
    return cosines.to(dtype), labels


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fixed_case(rows, cols, dtype, filter_threshold=0.0, seed=0):
    """The stored logits of the forward (in ``dtype``) and the statistics as the backward gets them (in the
    accumulation dtype), from the reference forward in float64."""
    cosines, labels = cosines_and_labels(rows, cols, dtype, seed)
    logits = cosines.double()
    stats = margin_softmax_forward_ref(logits, labels, *ARCFACE, filter_threshold)
    row_max, sum_exp, _, target_cos = (t.to(acc_dtype(dtype)) for t in stats)
    return logits.to(dtype), labels, row_max, sum_exp, target_cos


def run_fixed(stored, labels, row_max, sum_exp, target_cos, layout, grad_absmax, filter_threshold=0.0,
              grad_scale=0.125):
    grad = layout_of(stored, layout)
    ops.margin_softmax_backward(grad, labels.to(CUDA), row_max.to(CUDA), sum_exp.to(CUDA), target_cos.to(CUDA),
                                *ARCFACE, grad_scale, filter_threshold, grad_absmax)
    return grad


def stored_absmax(grad):
    """The largest |g| over the gradient as stored, as float32 (NaN when one is NaN)."""
    return grad.abs().amax().float().cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("filter_threshold", [0.0, 0.5])
def test_fixed_backward_gradients_and_absmax(dtype, shape, layout, filter_threshold):
    stored, labels, row_max, sum_exp, target_cos = fixed_case(*shape, dtype, filter_threshold)
    absmax = torch.zeros(1, device=CUDA)
    grad = run_fixed(stored, labels, row_max, sum_exp, target_cos, layout, absmax, filter_threshold)
    ref = margin_softmax_backward_ref(stored.double(), labels, row_max.double(), sum_exp.double(),
                                      target_cos.double(), *ARCFACE, 0.125, filter_threshold).to(dtype)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(grad.cpu().double(), ref.double(), atol=atol * 10, rtol=rtol * 4)
    if layout == "padded":
        assert (grad._base[:, shape[1]:] == PAD).all()  # nothing written past a row's end
    # exactly the largest stored |gradient|, and close to the reference's
    assert absmax.dtype == torch.float32 and absmax.shape == (1,)
    assert torch.equal(absmax.cpu(), stored_absmax(grad).reshape(1)), (absmax, stored_absmax(grad))
    torch.testing.assert_close(absmax.cpu(), ref.abs().amax().float().reshape(1), atol=atol * 10, rtol=rtol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixed_backward_without_absmax_is_the_same(dtype, layout):
    case = fixed_case(33, 1003, dtype)
    with_absmax = run_fixed(*case, layout, torch.zeros(1, device=CUDA))
    without = run_fixed(*case, layout, None)
    assert torch.equal(with_absmax.cpu(), without.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorized_and_elementwise_paths_agree_bitwise(dtype):
    case = fixed_case(9, 3001, dtype, filter_threshold=0.5)
    grads = [run_fixed(*case, layout, None, filter_threshold=0.5).cpu() for layout in LAYOUTS]
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_absmax_keeps_a_larger_entry_and_folds_over_calls():
    case = fixed_case(33, 1003, torch.float32)
    largest = stored_absmax(run_fixed(*case, "contiguous", None)).item()
    absmax = torch.full((1,), 2 * largest, device=CUDA)
    run_fixed(*case, "contiguous", absmax)
    assert absmax.item() == 2 * largest
    absmax.fill_(largest / 2)
    run_fixed(*case, "contiguous", absmax)
    assert absmax.item() == largest
    # a 0-d tensor and a view into a larger buffer: the element itself is updated, its neighbours are not
    scalar = torch.zeros((), device=CUDA)
    run_fixed(*case, "contiguous", scalar)
    assert scalar.item() == largest
    buffer = torch.full((3,), -7.0, device=CUDA)
    middle = buffer[1:2]
    middle.zero_()
    run_fixed(*case, "contiguous", middle)
    assert buffer.cpu().tolist() == [-7.0, largest, -7.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_absmax_is_nan_with_a_nan_gradient_and_inf_with_an_inf_one(dtype, layout):
    stored, labels, row_max, sum_exp, target_cos = fixed_case(5, 5000, dtype)
    nan_max = row_max.clone()
    nan_max[3] = float("nan")  # NaN statistics: the row's gradients are NaN
    absmax = torch.full((1,), float("inf"), device=CUDA)
    grad = run_fixed(stored, labels, nan_max, sum_exp, target_cos, layout, absmax)
    assert grad[3].isnan().all() and absmax.isnan().all()
    # an infinite gradient beats every finite one, and an infinite entry is kept by finite gradients
    inf_max = row_max.clone()
    inf_max[2] = -float("inf")  # every probability of the row is inf
    absmax = torch.zeros(1, device=CUDA)
    grad = run_fixed(stored, labels, inf_max, sum_exp, target_cos, layout, absmax)
    assert grad[2].isinf().all() and absmax.item() == float("inf")
    absmax = torch.full((1,), float("inf"), device=CUDA)
    run_fixed(stored, labels, row_max, sum_exp, target_cos, layout, absmax)
    assert absmax.item() == float("inf")


def test_absmax_unchanged_on_empty_input():
    for rows, cols in ((0, 10), (4, 0)):
        absmax = torch.full((1,), 0.25, device=CUDA)
        logits = torch.zeros(rows, cols, device=CUDA)
        labels = torch.full((rows,), -1, dtype=torch.long, device=CUDA)
        stats = torch.zeros(rows, device=CUDA)
        ops.margin_softmax_backward(logits, labels, stats, stats, stats, *ARCFACE, 1.0, 0.0, absmax)
        assert absmax.item() == 0.25


def test_absmax_is_checked():
    stored, labels, row_max, sum_exp, target_cos = fixed_case(4, 10, torch.float32)
    for bad, match in ((torch.zeros(1, device=CUDA, dtype=torch.float64), "float32"),
                       (torch.zeros(2, device=CUDA), "one element"),
                       (torch.zeros(1), "grad_absmax is on cpu")):
        with pytest.raises(RuntimeError, match=match):
            run_fixed(stored, labels, row_max, sum_exp, target_cos, "contiguous", bad)


# ---- adaptive margins (AdaFace's per-sample margin and clip, CurricularFace's hard negatives) ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adaptive_backward_gradients_and_absmax(dtype, layout):
    rows, cols = 33, 3001
    cosines, labels = cosines_and_labels(rows, cols, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    sample_m2 = torch.rand(rows, generator=g) * 0.2 - 0.1
    hard = torch.rand(rows, generator=g) * 0.5
    margin, extra = (64.0, 1.0, 0.4, 0.0), (sample_m2, None, 1e-3, hard, 0.3)
    # The references in the logits' dtype (their own accumulation, and the roundings of the kernels: a hard
    # negative's logit is rounded to the logits' dtype as the forward stored it).
    stored = cosines.clone()
    stats = margin_softmax_forward_adaptive_ref(stored, labels, *margin, 0.0, *extra)
    row_max, sum_exp, _, target_cos = (t.to(acc_dtype(dtype)) for t in stats)
    grad = layout_of(stored, layout)
    absmax = torch.zeros(1, device=CUDA)
    on_gpu = [sample_m2.to(CUDA), None, 1e-3, hard.to(CUDA), 0.3]
    ops.margin_softmax_backward_adaptive(grad, labels.to(CUDA), row_max.to(CUDA), sum_exp.to(CUDA),
                                         target_cos.to(CUDA), *margin, 0.125, 0.0, *on_gpu, absmax)
    ref = margin_softmax_backward_adaptive_ref(stored.clone(), labels, row_max, sum_exp, target_cos, *margin, 0.125,
                                               0.0, *extra)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(grad.cpu().double(), ref.double(), atol=atol * 10, rtol=rtol * 4)
    assert torch.equal(absmax.cpu(), stored_absmax(grad).reshape(1)), (absmax, stored_absmax(grad))
    torch.testing.assert_close(absmax.cpu(), ref.abs().amax().float().reshape(1), atol=atol * 10, rtol=rtol * 4)
    without = layout_of(stored, layout)
    ops.margin_softmax_backward_adaptive(without, labels.to(CUDA), row_max.to(CUDA), sum_exp.to(CUDA),
                                         target_cos.to(CUDA), *margin, 0.125, 0.0, *on_gpu)
    assert torch.equal(grad.cpu(), without.cpu())
