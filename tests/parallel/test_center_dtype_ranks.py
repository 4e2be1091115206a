"""Class centers stored in bfloat16 / float16 across world sizes, at sample_rate=1 (37 classes, uneven shards):
one process, torchrun and horovodrun --gloo on 2 and 4 ranks.

- The rounding keys are global: each rank's update of its shard, replayed on the whole table from the ranks'
  gathered gradients with class_start 0, gives the concatenated shards bit for bit; and the tables of the
  multi-rank runs equal the single-process table bit for bit except where the last float32 bits of a gradient
  differ between world sizes (the softmax sums add in another order) and the random bits fall between them.
- bf16 / fp16 runs stay within their tolerances of the float32 run, and the float32 storage path still matches
  the single process to float32 precision.
"""
import os
import sys

import pytest
import torch

from launchers import run_worker_world

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "center_dtype_ranks_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
from center_dtype_ranks_worker import CASES, HYPER, NUM_CLASSES  # noqa: E402

from partialfc.head.precision import rounding_seed_of  # noqa: E402
from partialfc.ops import reference as R  # noqa: E402

SHARDS = {1: [37], 2: [19, 18], 4: [10, 9, 9, 9]}
WORLDS = [("single", 1), ("torchrun", 2), ("torchrun", 4), ("horovodrun", 2), ("horovodrun", 4)]
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# Distance to the float32 run after 5 steps, (atol, rtol): the start is rounded to the stored dtype and every
# write stochastically; at scale 64 the rounding of a center moves its logits and so its later gradients. The
# centers reach |w| ~ 0.6, where 6e-3 is 1.5 bf16 ulps and 1e-3 two fp16 ulps (measured: 5.0e-3 and 8.3e-4).
TOLERANCE = {torch.bfloat16: (6e-3, 1.6e-2), torch.float16: (1e-3, 2e-3)}


def _launch(launcher, np, out_dir):
    return run_worker_world(launcher, np, WORKER, out_dir)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    out = {}
    for launcher, np in WORLDS:
        out[launcher, np] = _launch(launcher, np, str(tmp_path_factory.mktemp(f"{launcher}{np}")))
    return out


def _tensor(values, dtype, shape=None):
    t = torch.tensor(values, dtype=BITS[dtype]).view(dtype)
    return t if shape is None else t.view(shape)


def _table(results, case, key="weight"):
    """The whole table (or momentum) of one world, its shards concatenated in rank order, [C*K, D]."""
    k = CASES[case][1]
    dtype = DTYPES[results[0]["cases"][case]["dtype"]]
    parts = [_tensor(r["cases"][case][key], dtype).view(r["cases"][case]["num_local"] * k, -1) for r in results]
    return torch.cat(parts)


def _start(case):
    from center_dtype_ranks_worker import global_inputs
    return global_inputs(CASES[case][1])[0]


@pytest.mark.parametrize("launcher,np", WORLDS[1:], ids=[f"{l}-np{n}" for l, n in WORLDS[1:]])
@pytest.mark.parametrize("case", ["bfloat16", "float16", "bfloat16_k2"])
def test_shards_round_as_the_whole_table(worlds, launcher, np, case):
    """Replaying each step's update of the gathered gradients on the whole table (class_start 0, the run's seed,
    the optimizer's step) gives every rank's shard bit for bit: a shard's rows take the whole table's keys."""
    results = worlds[launcher, np]
    assert [r["cases"][case]["num_local"] for r in results] == SHARDS[np]
    k = CASES[case][1]
    dtype = DTYPES[results[0]["cases"][case]["dtype"]]
    assert all(r["cases"][case]["rounding_step"] == 5 and r["cases"][case]["seed"] == 2048 for r in results)
    weight = _start(case).to(dtype)
    momentum = torch.zeros_like(weight)
    for step in range(len(results[0]["cases"][case]["grads"])):
        grads = [r["cases"][case]["grads"][step] for r in results]
        index = torch.cat([torch.tensor(g["index"]) + r["cases"][case]["class_start"] * k
                           for g, r in zip(grads, results)])
        assert torch.equal(index, torch.arange(NUM_CLASSES * k))  # sample_rate=1: every row
        normalized = torch.cat([_tensor(g["normalized_grad"], torch.float32).view(len(g["index"]), -1)
                                for g in grads])
        inv_norm = torch.cat([_tensor(g["inv_norm"], torch.float32) for g in grads])
        R.normalize_backward_sgd_update_ref(weight, momentum, index, normalized, inv_norm, HYPER["lr"],
                                            HYPER["momentum"], HYPER["weight_decay"], 1.0, rounding_seed_of(2048),
                                            step, 0)
    assert torch.equal(_table(results, case), weight)
    assert torch.equal(_table(results, case, "momentum"), momentum)


@pytest.mark.parametrize("launcher,np", WORLDS[1:], ids=[f"{l}-np{n}" for l, n in WORLDS[1:]])
@pytest.mark.parametrize("case", ["bfloat16", "float16", "bfloat16_k2"])
def test_world_sizes_give_the_single_process_table(worlds, launcher, np, case):
    single, multi = _table(worlds["single", 1], case), _table(worlds[launcher, np], case)
    same = (single.view(BITS[single.dtype]) == multi.view(BITS[multi.dtype])).float().mean().item()
    # Rounding keyed by local rows would make about a third of the elements differ; global keys leave only the
    # elements whose float32 update differs in its last bits between world sizes and whose random bits fall
    # between the two.
    assert same > 0.99, same
    atol, rtol = TOLERANCE[single.dtype]
    torch.testing.assert_close(multi.float(), single.float(), rtol=rtol / 2, atol=atol / 2)


@pytest.mark.parametrize("launcher,np", WORLDS, ids=[f"{l}-np{n}" for l, n in WORLDS])
def test_low_precision_storage_stays_close_to_float32(worlds, launcher, np):
    results = worlds[launcher, np]
    fp32 = _table(results, "float32")
    assert fp32.dtype == torch.float32 and (fp32 - _start("float32")).abs().mean() > 0.05  # the steps moved it
    for case in ("bfloat16", "float16"):
        low = _table(results, case)
        atol, rtol = TOLERANCE[low.dtype]
        torch.testing.assert_close(low.float(), fp32, rtol=rtol, atol=atol)
        losses = [r["cases"][case]["losses"] for r in results]
        for lost, ref in zip(losses[0], results[0]["cases"]["float32"]["losses"]):
            assert lost == pytest.approx(ref, rel=5e-3)


@pytest.mark.parametrize("launcher,np", WORLDS[1:], ids=[f"{l}-np{n}" for l, n in WORLDS[1:]])
def test_float32_storage_matches_the_single_process(worlds, launcher, np):
    single, multi = _table(worlds["single", 1], "float32"), _table(worlds[launcher, np], "float32")
    torch.testing.assert_close(multi, single, rtol=0, atol=1e-6)
    for a, b in zip(worlds["single", 1][0]["cases"]["float32"]["losses"],
                    worlds[launcher, np][0]["cases"]["float32"]["losses"]):
        assert a == pytest.approx(b, abs=1e-5)
