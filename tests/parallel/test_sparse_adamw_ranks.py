"""SparseAdamW over the sharded class centers: with sample_rate=1, 1, 2 and 3 ranks (37 classes, uneven
shards) give torch.optim.AdamW over the dense table of one process, and the same table as each other; with
sampling, rows a rank never sampled keep weight and moments and each row counts its own steps."""
import os

import pytest

from launchers import run_worker_world

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_adamw_ranks_worker.py")
NUM_CLASSES, STEPS = 37, 4
SHARDS = {1: [37], 2: [19, 18], 3: [13, 12, 12]}
TOL = 1e-10


def run_world(np, out_dir):
    return run_worker_world("single" if np == 1 else "torchrun", np, WORKER, out_dir)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    out = {}
    for np in (1, 2, 3):
        folder = tmp_path_factory.mktemp(f"np{np}")
        out[np] = run_world(np, str(folder))
    return out


@pytest.mark.parametrize("np", [1, 2, 3])
def test_full_sample_equals_dense_adamw(worlds, np):
    results = worlds[np]
    assert [r["rank"] for r in results] == list(range(np))
    assert all(r["size"] == np and r["backend"] == ("single" if np == 1 else "torch") for r in results)
    assert [r["full"]["num_local"] for r in results] == SHARDS[np]
    assert [r["full"]["class_start"] for r in results] == [sum(SHARDS[np][:r]) for r in range(np)]
    for r in results:
        full = r["full"]
        assert full["loss_err"] < TOL and full["weight_err"] < TOL, full
        assert full["exp_avg_err"] < TOL and full["exp_avg_sq_err"] < TOL, full
        assert full["row_step"] == [STEPS] * full["num_local"]
        assert full["moved"] > 0.01  # AdamW steps of about lr, four of them


def test_world_sizes_give_one_table(worlds):
    tables = {np: [row for r in results for row in r["full"]["weight"]] for np, results in worlds.items()}
    assert all(len(t) == NUM_CLASSES for t in tables.values())
    for np in (2, 3):
        worst = max(abs(a - b) for row_a, row_b in zip(tables[1], tables[np]) for a, b in zip(row_a, row_b))
        assert worst < TOL, (np, worst)


@pytest.mark.parametrize("np", [1, 2, 3])
def test_sampled_rows_only(worlds, np):
    for r in worlds[np]:
        sampled = r["sampled"]
        assert sampled["row_step_matches"] and sampled["unsampled_kept"] and sampled["sampled_moved"], (r["rank"],
                                                                                                        sampled)
    # Over the ranks some rows were never sampled, so the unchanged-rows check had rows to check.
    assert sum(r["sampled"]["never_sampled"] for r in worlds[np]) > 0
