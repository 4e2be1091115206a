"""The PartialFC head and SparseSGD in one process, against an independent dense reference."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from _dense import dense_margin_loss
from partialfc import PartialFC, SparseSGD
from partialfc.comm import Communicator
from partialfc.head import partition_classes

MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4),
           "combined": (32.0, 0.9, 0.4, 0.15)}


def _head(num_classes, dim, sample_rate=1.0, margin="arcface", **kw):
    return PartialFC(dim, num_classes, sample_rate, MARGINS.get(margin, margin), comm=Communicator(), **kw).double()


@pytest.mark.parametrize("margin", sorted(MARGINS))
@pytest.mark.parametrize("filter_threshold", [0.0, 0.2])
def test_full_rate_equals_dense_margin_softmax(margin, filter_threshold):
    torch.manual_seed(0)
    C, D, B = 37, 12, 16
    pfc = _head(C, D, margin=margin, interclass_filtering_threshold=filter_threshold)
    # Spread the centers so that some cosines exceed the filtering threshold.
    pfc.weight.data = torch.randn(C, D, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,))
    loss = pfc(x, y)
    loss.backward()

    w_ref = pfc.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = dense_margin_loss(x_ref, w_ref, y, *MARGINS[margin], filter_threshold)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
    # The head's sparse gradient, scattered back, is the dense gradient of the centers.
    dense = torch.zeros_like(w_ref)
    dense[pfc.sampled_index] = pfc.center_grad.rows()
    torch.testing.assert_close(dense, w_ref.grad, atol=1e-10, rtol=1e-8)


def test_sampled_rows_get_the_dense_gradient_restricted_to_the_sample():
    torch.manual_seed(1)
    C, D, B = 200, 8, 10
    pfc = _head(C, D, sample_rate=0.1)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,))
    loss = pfc(x, y)
    loss.backward()
    index = pfc.sampled_index
    assert index.numel() == max(20, torch.unique(y).numel())
    # Reference: the dense margin softmax over the sampled classes only, labels remapped.
    w_ref = pfc.weight.detach()[index].clone().requires_grad_()
    remap = torch.searchsorted(index, y)
    x_ref = x.detach().clone().requires_grad_()
    ref = dense_margin_loss(x_ref, w_ref, remap, *MARGINS["arcface"])
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(pfc.center_grad.rows(), w_ref.grad)


def test_classes_are_partitioned_contiguously_when_not_divisible():
    parts = [partition_classes(10, r, 4) for r in range(4)]
    assert parts == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert [partition_classes(3, r, 5)[1] for r in range(5)] == [1, 1, 1, 0, 0]


def _sample(pfc, labels):
    index, target = pfc.sample(labels)
    return index, target


def test_sampler_keeps_positives_no_duplicates_exact_count():
    pfc = _head(1000, 4, sample_rate=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        labels = torch.randint(0, 1000, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        index, target = _sample(pfc, labels)
        positives = torch.unique(labels)
        assert index.numel() == max(50, positives.numel())
        assert torch.unique(index).numel() == index.numel()
        assert bool((index[1:] > index[:-1]).all())  # sorted
        assert set(positives.tolist()) <= set(index.tolist())
        assert torch.equal(index[target], labels)


def test_sampler_with_more_positives_than_requested_keeps_them_all():
    pfc = _head(100, 4, sample_rate=0.05)  # 5 requested
    labels = torch.arange(0, 100, 3)  # 34 positives
    index, target = _sample(pfc, labels)
    assert torch.equal(index, labels)
    assert torch.equal(target, torch.arange(34))


def test_sampler_negatives_are_uniform_chi_square():
    C, positives = 60, torch.tensor([3, 17, 42])
    pfc = _head(C, 4, sample_rate=10 / C)
    counts = np.zeros(C)
    draws = 6000
    for _ in range(draws):
        index, _ = _sample(pfc, positives)
        counts[index.numpy()] += 1
    assert (counts[positives.numpy()] == draws).all()
    negatives = np.delete(counts, positives.numpy())
    # Each of the 57 other classes is picked with probability 7/57 per draw.
    expected = np.full(negatives.shape, draws * 7 / 57)
    _, p_value = scipy.stats.chisquare(negatives, expected)
    assert p_value > 1e-3, (p_value, negatives)
    # A biased sampler (always the lowest ids) must fail this test: check the statistic can reject.
    biased = np.zeros_like(negatives)
    biased[:7] = draws
    assert scipy.stats.chisquare(biased, expected)[1] < 1e-10


def test_rank_holding_no_positive_samples_only_negatives():
    class FakeRank(Communicator):
        rank, size = 1, 2
    pfc = PartialFC(4, 100, 0.2, comm=FakeRank()).double()  # classes [50, 100)
    index, target = pfc.sample(torch.tensor([1, 2, 3]))
    assert index.numel() == 10 and bool((target == -1).all())
    assert int(index.min()) >= 0 and int(index.max()) < 50


def test_sparse_sgd_changes_only_sampled_rows_and_matches_torch_sgd():
    torch.manual_seed(4)
    C, D, B = 300, 6, 8
    pfc = _head(C, D, sample_rate=0.05)
    opt = SparseSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    dense_w = pfc.weight.detach().clone()
    dense_m = torch.zeros_like(dense_w)
    for step in range(3):
        before_w = pfc.weight.detach().clone()
        before_m = opt.momentum_buffer().clone()
        x = torch.randn(B, D, dtype=torch.float64)
        y = torch.randint(0, C, (B,))
        pfc(x, y).backward()
        index, grad = pfc.sampled_index.clone(), pfc.center_grad.rows()
        opt.step()
        opt.zero_grad()
        after_w, after_m = pfc.weight.detach(), opt.momentum_buffer()
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[index] = False
        # Unsampled rows: bit-for-bit unchanged, weight and momentum.
        assert torch.equal(after_w[untouched], before_w[untouched])
        assert torch.equal(after_m[untouched], before_m[untouched])
        assert not torch.equal(after_w[index], before_w[index])
        # Sampled rows: torch.optim.SGD's arithmetic on those rows.
        g = grad + 5e-4 * dense_w[index]
        dense_m[index] = 0.9 * dense_m[index] + g
        dense_w[index] = dense_w[index] - 0.1 * dense_m[index]
        torch.testing.assert_close(after_w, dense_w)
        torch.testing.assert_close(after_m, dense_m)


def test_sparse_sgd_follows_lr_scheduler():
    pfc = _head(10, 4)
    opt = SparseSGD(pfc, lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [-1, 10, 11])
def test_label_outside_range_is_a_clear_error(bad):
    pfc = _head(10, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"label {bad} of sample 1 on rank 0 is outside \[0, num_classes=10\)"):
        pfc(x, torch.tensor([0, bad, 2]))
    assert pfc.sampled_index is None  # nothing was sampled or half-updated


def test_shape_errors_name_the_shapes():
    pfc = _head(10, 4)
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, 4\], got \[3, 5\]"):
        pfc(torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be \[batch\] = \[3\], got \[2\]"):
        pfc(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1]))


def test_margin_presets_and_bad_margin():
    assert PartialFC(4, 10, comm=Communicator(), margin="cosface").margin == (64.0, 1.0, 0.0, 0.4)
    with pytest.raises(ValueError, match="unknown margin preset 'arc'"):
        PartialFC(4, 10, comm=Communicator(), margin="arc")
    with pytest.raises(ValueError, match="sample_rate must be in"):
        PartialFC(4, 10, 1.5, comm=Communicator())


def test_loss_at_uniform_logits_is_log_num_classes():
    # With every cosine 0 and no margin, the softmax is uniform: loss = log(C).
    pfc = _head(8, 2, margin=(10.0, 1.0, 0.0, 0.0))
    pfc.weight.data = torch.tensor([[1.0, 0.0]] * 8, dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0]] * 4, dtype=torch.float64)
    assert pfc(x, torch.tensor([0, 1, 2, 3])).item() == pytest.approx(math.log(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_all_finite_matches_isfinite_all(dtype):
    from partialfc.head.partial_fc import all_finite

    cases = [torch.zeros(0, 4), torch.randn(50, 8), torch.full((300, 300), 1000.0)]  # float16: sums past its max
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(50, 8)
        t[17, 3] = bad
        cases.append(t)
    both = torch.randn(50, 8)
    both[1, 1], both[2, 2] = float("inf"), -float("inf")  # they sum to NaN
    cases.append(both)
    for t in cases:
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    # the one way it differs: finite values whose sum overflows the accumulation dtype count as not finite
    huge = torch.full((4,), torch.finfo(torch.float32).max / 2)
    assert not all_finite(huge) and bool(torch.isfinite(huge).all())
