"""The CUDA class sampler (csrc/ops/cuda/sample_classes_kernel.cu): its contract, its negatives' distribution,
its determinism, and its host syncs (none when ``num_sample >= B`` or every class is sampled, one otherwise).

The negatives are the first ranks of a keyed Feistel permutation with cycle-walking and a seeded rotation.
``permute_ranks`` below mirrors the kernel's ``permute_rank`` (same constants, same rounds, same order of
operations), and ``mirror_sample`` the whole index. The mirror runs on the CPU here: it is checked to be a
bijection on several domain sizes and to draw near-uniform subsets; on a GPU the kernel is checked to give the
mirror's index bit for bit, which carries those checks over to the kernel. Every test that needs a GPU skips,
with the reason, when none is at hand.
"""
import math
import warnings

import numpy as np
import pytest
import torch

from ops_testutil import no_gpu_reason
from test_sample_classes import check_contract

sample = torch.ops.partialfc.sample_classes

cuda_only = pytest.mark.skipif(no_gpu_reason() is not None, reason=no_gpu_reason() or "")
CUDA = torch.device("cuda")

# ---------------------------------------------------------------------------------------------------------
# The mirror of the kernel's permutation (numpy uint64 arrays wrap modulo 2^64, as the kernel's uint64_t)

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
ROUNDS = 8    # kFeistelRounds
MIN_BITS = 8  # kFeistelMinBits


def _u64(value):
    return np.uint64(value & MASK64)


def mix64(z):
    """cuda::mix64 (common.cuh), on a uint64 array."""
    z = (z ^ (z >> _u64(30))) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _u64(27))) * _u64(0x94D049BB133111EB)
    return z ^ (z >> _u64(31))


def negative_key(seeds):
    """negative_key(seed): the round keys and the rotation word, each a uint64 array shaped like ``seeds``."""
    rounds = [mix64(seeds + _u64(GOLDEN * (r + 1))) for r in range(ROUNDS)]
    return rounds, mix64(seeds + _u64(GOLDEN * (ROUNDS + 1)))


def permute_ranks(ranks, available, seeds):
    """permute_rank(j, available, negative_key(seed)) for every rank j of ``ranks`` [m] and every seed of
    ``seeds`` [T] (int64 seeds, as the op takes them): a [T, m] uint64 array. ``available`` < 2^32 here (the
    rotation's 128-bit product is formed from 32-bit halves)."""
    assert 1 <= available < 2 ** 32
    seeds = np.array([int(s) & MASK64 for s in seeds], dtype=np.uint64)[:, None]
    rounds, rotation = negative_key(seeds)
    bits = max((available - 1).bit_length(), MIN_BITS)
    lo_bits = bits // 2
    hi_bits = bits - lo_bits
    lo_mask, hi_mask = _u64((1 << lo_bits) - 1), _u64((1 << hi_bits) - 1)
    x = np.repeat(np.asarray(ranks, dtype=np.uint64)[None, :], seeds.shape[0], axis=0)
    assert (x < _u64(available)).all()
    walking = np.ones(x.shape, dtype=bool)
    while walking.any():  # cycle-walking: every value walks until it is below `available` again
        lo, hi = x & lo_mask, x >> _u64(lo_bits)
        for r in range(ROUNDS):
            if r % 2 == 0:
                hi = hi ^ (mix64(lo ^ rounds[r]) & hi_mask)
            else:
                lo = lo ^ (mix64(hi ^ rounds[r]) & lo_mask)
        x = np.where(walking, (hi << _u64(lo_bits)) | lo, x)
        walking = x >= _u64(available)
    # __umul64hi(rotation, available) for available < 2^32: (a 2^32 + b) * n / 2^64 = (a n + (b n >> 32)) >> 32
    n = _u64(available)
    offset = ((rotation >> _u64(32)) * n + (((rotation & _u64(0xFFFFFFFF)) * n) >> _u64(32))) >> _u64(32)
    x = x + offset
    return np.where(x >= n, x - n, x)


def mirror_sample(labels, class_start, num_local, num_sample, seed):
    """The index sample_classes gives on CUDA for these arguments (num_sample < num_local), from the mirror."""
    local = labels.cpu() - class_start
    positives = torch.unique(local[(local >= 0) & (local < num_local)])
    num_neg = max(num_sample, positives.numel()) - positives.numel()
    if num_neg == 0:
        return positives
    ranks = torch.from_numpy(permute_ranks(np.arange(num_neg), num_local - positives.numel(), [seed])[0]
                             .astype(np.int64))
    shift = positives - torch.arange(positives.numel())
    negatives = ranks + torch.searchsorted(shift, ranks, right=True)
    return torch.sort(torch.cat([positives, negatives])).values


def wilson_hilferty_z(chi2, dof):
    """chi-square with ``dof`` degrees of freedom -> approximately standard normal (the cube-root transform,
    accurate in the tails for dof of a few tens and more); |z| > 5 has probability 5.7e-7."""
    return ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


# ---------------------------------------------------------------------------------------------------------
# CPU: the mirror


@pytest.mark.parametrize("available", [1, 2, 3, 7, 8, 255, 256, 257, 1000, 4096, 4097, 65537])
def test_mirror_is_a_permutation(available):
    seeds = [0, 1, 12345, -1, -(2 ** 62) + 7]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning: every operation is on arrays
        images = permute_ranks(np.arange(available), available, seeds)
    for row in images:
        assert np.array_equal(np.sort(row), np.arange(available, dtype=np.uint64))
    if available > 8:
        assert not np.array_equal(images[0], images[1]), "the seed changes the permutation"


@pytest.mark.parametrize("n,m", [(10, 3), (8, 4), (5, 2), (17, 2)])
def test_mirror_draws_uniform_subsets(n, m):
    """Every m-subset of n ranks equally often over consecutive seeds (chi-square over all C(n, m) subsets)."""
    cells = math.comb(n, m)
    trials = 100 * cells
    chosen = np.sort(permute_ranks(np.arange(m), n, range(trials)), axis=1).astype(np.int64)
    codes = (chosen * n ** np.arange(m)).sum(axis=1)
    counts = np.bincount(np.unique(codes, return_inverse=True)[1])
    expected = trials / cells
    assert counts.size == cells, "every subset occurs"
    chi2 = float(((counts - expected) ** 2).sum() / expected)
    z = wilson_hilferty_z(chi2, cells - 1)
    assert abs(z) < 5.0, f"chi2={chi2:.1f} for {cells - 1} degrees of freedom"


# ---------------------------------------------------------------------------------------------------------
# GPU: the kernel

# (num_local, num_sample, batch): sparse (num_sample >= batch: no host sync), the rare num_sample < batch, the
# dense regime, every class.
CASES = [(1000, 100, 32), (100000, 10000, 128), (100000, 1000, 512), (1000, 600, 32), (1000, 999, 64),
         (300, 256, 256), (50, 10, 64), (1000, 5, 64), (1000, 0, 16), (10, 10, 8), (10, 50, 8), (5000, 4096, 4096)]


def _labels(num_local, batch, class_start, seed=0):
    g = torch.Generator().manual_seed(seed + num_local + batch)
    return torch.randint(0, class_start + num_local + 500, (batch,), generator=g)


@cuda_only
@pytest.mark.parametrize("num_local,num_sample,batch", CASES)
def test_contract_and_mirror(num_local, num_sample, batch):
    class_start = 500
    labels = _labels(num_local, batch, class_start)
    for seed in (7, -3):
        index, remapped = sample(labels.to(CUDA), class_start, num_local, num_sample, seed)
        assert index.device.type == "cuda" and remapped.device.type == "cuda"
        check_contract(labels, class_start, num_local, num_sample, index, remapped)
        if num_sample < num_local:
            assert torch.equal(index.cpu(), mirror_sample(labels, class_start, num_local, num_sample, seed))
        else:
            assert torch.equal(index.cpu(), torch.arange(num_local))


@cuda_only
def test_dense_regime():
    labels = torch.arange(0, 64, 2)  # 32 positives, 17 of them below 33
    for num_local, num_sample in [(1000, 999), (1000, 968), (1000, 969), (100, 99), (33, 32), (33, 17)]:
        index, remapped = sample(labels.to(CUDA), 0, num_local, num_sample, 5)
        check_contract(labels, 0, num_local, num_sample, index, remapped)
        num_pos = int((labels < num_local).sum())
        missing = set(range(num_local)) - set(index.cpu().tolist())
        assert len(missing) == num_local - max(num_sample, num_pos)
        assert not missing & set(labels.tolist())
    # All non-positives but one, many seeds: the one left out is every non-positive in turn.
    left_out = set()
    for seed in range(1000):
        index, _ = sample(labels[:4].to(CUDA), 0, 40, 39, seed)
        left_out |= set(range(40)) - set(index.cpu().tolist())
    assert left_out == set(range(40)) - set(labels[:4].tolist())


@cuda_only
def test_empty_inputs():
    empty = torch.empty(0, dtype=torch.long, device=CUDA)
    labels = torch.tensor([4, 9, 4, 1, 6], device=CUDA)
    index, remapped = sample(empty, 0, 100, 10, 3)  # empty batch: S = num_sample
    check_contract(empty, 0, 100, 10, index, remapped)
    index, remapped = sample(empty, 0, 100, 0, 3)
    assert index.numel() == 0 and remapped.numel() == 0
    index, remapped = sample(empty, 0, 0, 0, 3)  # empty shard and batch
    assert index.numel() == 0 and remapped.numel() == 0
    index, remapped = sample(labels, 0, 0, 0, 3)  # empty shard
    assert index.numel() == 0 and remapped.tolist() == [-1] * 5
    index, remapped = sample(labels, 0, 100, 0, 3)  # num_sample 0: the positives only
    assert index.tolist() == [1, 4, 6, 9] and remapped.tolist() == [1, 3, 1, 0, 2]
    index, remapped = sample(labels, 1000, 100, 0, 3)  # ... and no positive
    assert index.numel() == 0 and remapped.tolist() == [-1] * 5


@cuda_only
def test_deterministic_per_seed_and_stream():
    labels = _labels(5000, 64, 0).to(CUDA)
    a = sample(labels, 0, 5000, 400, 123)
    b = sample(labels, 0, 5000, 400, 123)
    c = sample(labels, 0, 5000, 400, 124)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        d = sample(labels, 0, 5000, 400, 123)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(a[0], d[0]) and torch.equal(a[1], d[1])


# (num_local, num_sample, trials): sparse; available = 129 (cycle-walking from 256, the longest walks); a small
# inclusion probability; dense; all non-positives but five.
@cuda_only
@pytest.mark.parametrize("num_local,num_sample,trials", [(200, 40, 2000), (133, 20, 2000), (1000, 24, 4000),
                                                         (200, 150, 2000), (200, 195, 4000)])
def test_negatives_uniform(num_local, num_sample, trials):
    """Chi-square over the non-positive classes: each is drawn equally often over consecutive seeds. The bound
    |z| < 5 after the Wilson-Hilferty transform fails by chance with probability about 6e-7."""
    positives = [3, 50, 51, num_local - 1]
    labels = torch.tensor(positives + [3, num_local + 7], device=CUDA)  # a repeat and a foreign label
    counts = torch.zeros(num_local, dtype=torch.float64, device=CUDA)
    for seed in range(trials):
        index, _ = sample(labels, 0, num_local, num_sample, seed)
        counts[index] += 1  # distinct entries: no lost update
    counts = counts.cpu()
    assert all(counts[p] == trials for p in positives)
    mask = torch.ones(num_local, dtype=torch.bool)
    mask[positives] = False
    observed = counts[mask]
    n = observed.numel()
    p = (num_sample - len(positives)) / n
    assert float(observed.sum()) == trials * (num_sample - len(positives))
    # Counts of T independent uniform m-subsets of n: covariance T p (1 - p) n / (n - 1) (I - 11^T / n), so the
    # normalized sum of squares times (n - 1) / n is chi-square with n - 1 degrees of freedom.
    chi2 = float(((observed - trials * p) ** 2).sum() / (trials * p * (1 - p))) * (n - 1) / n
    z = wilson_hilferty_z(chi2, n - 1)
    assert abs(z) < 5.0, f"chi2={chi2:.1f} for {n - 1} degrees of freedom"


def _count_syncs(fn):
    """Host syncs that torch's sync debug mode reports while ``fn`` runs (one warning each)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing" in str(w.message) for w in caught)


@cuda_only
def test_no_host_sync_when_num_sample_covers_the_batch():
    """Every common case under torch.cuda.set_sync_debug_mode("error"), which raises on a synchronizing ATen
    call (a device-to-host copy, .item(), nonzero, a stream synchronize); inputs are made before."""
    batches = {b: _labels(20000, b, 100).to(CUDA) for b in (0, 1, 128, 4096, 5000)}
    calls = [(batches[128], 100, 20000, 2000), (batches[128], 100, 20000, 128), (batches[4096], 100, 20000, 4096),
             (batches[5000], 100, 20000, 15000), (batches[1], 100, 20000, 1), (batches[0], 100, 20000, 10),
             (batches[0], 100, 20000, 0), (batches[128], 100, 20000, 20000), (batches[128], 100, 0, 0),
             (batches[128], 100, 300, 299)]
    for args in calls:
        sample(*args, 1)  # warm-up: the allocator's first blocks, the lazy CUDA module loads
    torch.cuda.synchronize()
    results = []
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for args in calls:
            results.append(sample(*args, 9))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for (labels, class_start, num_local, num_sample), (index, remapped) in zip(calls, results):
        check_contract(labels, class_start, num_local, num_sample, index, remapped)
    assert _count_syncs(lambda: sample(batches[128], 100, 20000, 2000, 4)) == 0


@cuda_only
def test_one_host_sync_when_num_sample_is_below_the_batch():
    labels = _labels(20000, 512, 100).to(CUDA)
    sample(labels, 100, 20000, 64, 1)
    torch.cuda.synchronize()
    assert _count_syncs(lambda: sample(labels, 100, 20000, 64, 2)) == 1
    # The check above can see a sync: the error mode raises on this one.
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchronizing"):
            sample(labels, 100, 20000, 64, 2)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    index, remapped = sample(labels, 100, 20000, 64, 2)
    check_contract(labels, 100, 20000, 64, index, remapped)


@cuda_only
def test_bad_input_is_a_catchable_error():
    with pytest.raises(RuntimeError, match="labels must be a 1-D int64"):
        sample(torch.zeros(3, dtype=torch.int32, device=CUDA), 0, 10, 5, 0)
    with pytest.raises(RuntimeError, match="labels must be a 1-D int64"):
        sample(torch.zeros(2, 3, dtype=torch.long, device=CUDA), 0, 10, 5, 0)
    with pytest.raises(RuntimeError, match="num_local must be >= 0, got -1"):
        sample(torch.zeros(3, dtype=torch.long, device=CUDA), 0, -1, 5, 0)
    with pytest.raises(RuntimeError, match="num_sample must be >= 0, got -2"):
        sample(torch.zeros(3, dtype=torch.long, device=CUDA), 0, 10, -2, 0)
    # The process is still usable.
    labels = torch.tensor([1, 5, 9], device=CUDA)
    index, remapped = sample(labels, 0, 100, 10, 0)
    check_contract(labels, 0, 100, 10, index, remapped)
