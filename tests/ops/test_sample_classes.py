"""The compiled class sampler against the sampling contract of ``sample_classes_ref``."""
import math

import pytest
import torch

from partialfc import ops
from partialfc.ops import sample_classes_ref

sample = torch.ops.partialfc.sample_classes


def check_contract(labels, class_start, num_local, num_sample, index, remapped):
    labels = labels.cpu()
    index, remapped = index.cpu(), remapped.cpu()
    local = labels - class_start
    is_local = (local >= 0) & (local < num_local)
    positives = set(local[is_local].tolist())
    expected_size = num_local if num_sample >= num_local else max(num_sample, len(positives))
    assert index.dtype == torch.long and remapped.dtype == torch.long
    assert index.numel() == expected_size
    assert torch.equal(index, torch.sort(index).values), "index must be sorted"
    assert torch.unique(index).numel() == index.numel(), "index must not repeat a class"
    if index.numel():
        assert 0 <= int(index.min()) and int(index.max()) < num_local
    assert positives <= set(index.tolist()), "every positive must be sampled"
    # remapped points at the label's position in index, -1 elsewhere.
    assert torch.equal(remapped[~is_local], torch.full_like(remapped[~is_local], -1))
    assert torch.equal(index[remapped[is_local]], local[is_local])


# (1000, 100) and (100000, 10000): sparse regime on a bitmap (num_local <= 64 S); (100000, 1000): sparse regime
# on a hash set; (1000, 600): dense regime (complement).
@pytest.mark.parametrize("num_local,num_sample,batch", [(1000, 100, 32), (1000, 600, 32), (50, 10, 64),
                                                        (100000, 10000, 128), (100000, 1000, 128), (10, 10, 8),
                                                        (10, 50, 8)])
def test_contract(device, num_local, num_sample, batch):
    g = torch.Generator().manual_seed(num_local + batch)
    class_start = 500
    labels = torch.randint(0, class_start + num_local + 500, (batch,), generator=g).to(device)
    index, remapped = sample(labels, class_start, num_local, num_sample, 7)
    assert index.device == labels.device
    check_contract(labels, class_start, num_local, num_sample, index, remapped)


def test_degenerate_inputs(device):
    # No local positive at all.
    labels = torch.tensor([0, 1, 2], device=device)
    index, remapped = sample(labels, 100, 50, 5, 1)
    check_contract(labels, 100, 50, 5, index, remapped)
    assert remapped.tolist() == [-1, -1, -1]
    # Every class sampled: index is arange and labels keep their local id.
    labels = torch.tensor([3, 7, 7, 12], device=device)
    index, remapped = sample(labels, 2, 8, 8, 1)
    assert index.tolist() == list(range(8)) and remapped.tolist() == [1, 5, 5, -1]
    # num_sample equal to, and below, the positive count: S is exactly the positives.
    labels = torch.tensor([4, 9, 4, 1, 6], device=device)
    for num_sample in (4, 2, 0):
        index, remapped = sample(labels, 0, 100, num_sample, 3)
        assert index.tolist() == [1, 4, 6, 9] and remapped.tolist() == [1, 3, 1, 0, 2]
    # Empty batch and empty shard.
    empty = torch.empty(0, dtype=torch.long, device=device)
    index, remapped = sample(empty, 0, 100, 10, 3)
    check_contract(empty, 0, 100, 10, index, remapped)
    index, remapped = sample(labels, 0, 0, 0, 3)
    assert index.numel() == 0 and remapped.tolist() == [-1] * 5


def test_deterministic_per_seed(device):
    labels = torch.randint(0, 5000, (64,), generator=torch.Generator().manual_seed(0)).to(device)
    a = sample(labels, 0, 5000, 400, 123)
    b = sample(labels, 0, 5000, 400, 123)
    c = sample(labels, 0, 5000, 400, 124)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# sparse regime with a bitmap (200, 40) and with a hash set (1000, 12: num_local > 64 S), dense regime (200, 150)
@pytest.mark.parametrize("num_local,num_sample", [(200, 40), (1000, 12), (200, 150)])
def test_negatives_uniform(device, num_local, num_sample):
    """Chi-square test: every non-positive class is drawn equally often."""
    trials = 1500
    labels = torch.tensor([3, 50, 51, 199, 3], device=device)
    positives = {3, 50, 51, 199}
    counts = torch.zeros(num_local, dtype=torch.float64)
    for seed in range(trials):
        index, _ = sample(labels, 0, num_local, num_sample, seed)
        counts[index.cpu()] += 1
    assert all(counts[p] == trials for p in positives)
    mask = torch.ones(num_local, dtype=torch.bool)
    mask[list(positives)] = False
    observed = counts[mask]
    n = observed.numel()
    p = (num_sample - len(positives)) / n  # inclusion probability of each non-positive class per draw
    # Each count is Binomial(trials, p); their total is fixed, so the normalized sum of squares is
    # chi-square with n - 1 degrees of freedom after the n / (n - 1) correction.
    chi2 = float(((observed - trials * p) ** 2).sum() / (trials * p * (1 - p))) * (n - 1) / n
    dof = n - 1
    z = (chi2 - dof) / math.sqrt(2 * dof)
    assert abs(z) < 4.0, f"chi2={chi2:.1f} for {dof} degrees of freedom"


def test_compiled_table_draws_its_seed_from_the_generator():
    labels = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = ops.CompiledOps.sample_classes(labels, 0, 1000, 100, g1)
    b = ops.CompiledOps.sample_classes(labels, 0, 1000, 100, g2)
    assert torch.equal(a[0], b[0])
    c = ops.CompiledOps.sample_classes(labels, 0, 1000, 100, g1)  # the generator advanced
    assert not torch.equal(a[0], c[0])
    # Same contract as the reference on the same inputs.
    ref_index, ref_remapped = sample_classes_ref(labels, 0, 1000, 100, torch.Generator().manual_seed(5))
    assert ref_index.numel() == a[0].numel()
    assert torch.equal(ref_remapped >= 0, a[1] >= 0)


def test_bad_input_messages():
    with pytest.raises(RuntimeError, match="labels must be a 1-D int64"):
        sample(torch.zeros(3, dtype=torch.int32), 0, 10, 5, 0)
    with pytest.raises(RuntimeError, match="num_local must be >= 0"):
        sample(torch.zeros(3, dtype=torch.long), 0, -1, 5, 0)


def test_opcheck():
    labels = torch.tensor([1, 5, 9, 300])
    torch.library.opcheck(sample, (labels, 0, 100, 10, 3), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(sample, (labels, 0, 100, 200, 3))
