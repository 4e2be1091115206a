"""Distributed PartialFC with sample_rate=1 equals the single-process full margin softmax, on every
launcher and world size; bad input fails on every rank with the same clear error."""
import json
import os

import pytest

from launchers import require, run

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "equivalence_worker.py")
EQUIVALENCE = ["divisible", "uneven", "no_positive"]
BAD_INPUT = ["mismatched_batch", "bad_label"]
TOL = 1e-5

SETUPS = [("horovodrun", "horovod", 1), ("horovodrun", "horovod", 2), ("horovodrun", "horovod", 4),
          ("torchrun", "torch", 1), ("torchrun", "torch", 2), ("torchrun", "torch", 4),
          ("mpirun", "horovod", 2), ("mpirun", "torch", 2)]


@pytest.mark.parametrize("launcher,backend,np", SETUPS, ids=[f"{l}-{b}-np{n}" for l, b, n in SETUPS])
def test_world_sizes_match_single_process(launcher, backend, np, tmp_path):
    require(launcher, *(["horovodrun"] if backend == "horovod" else []))
    cases = EQUIVALENCE + (BAD_INPUT if np > 1 else [])
    run(launcher, np, WORKER, backend, str(tmp_path), *cases)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(np)]
    assert [r["rank"] for r in results] == list(range(np))
    assert all(r["size"] == np and r["backend"] == backend for r in results)
    for case in EQUIVALENCE:
        for r in results:
            res = r[case]
            assert "error" not in res, res
            assert res["loss_err"] < TOL and res["x_grad_err"] < TOL and res["w_grad_err"] < TOL, (case, res)
        # The loss is the same on every rank.
        assert len({round(r[case]["loss"], 12) for r in results}) == 1
    if np == 4:
        # 37 classes over 4 ranks: 10, 9, 9, 9; and ranks past the first hold no positive in "no_positive".
        assert [r["uneven"]["num_local"] for r in results] == [10, 9, 9, 9]
        assert [r["no_positive"]["local_positives"] > 0 for r in results] == [True, False, False, False]
    if np > 1:
        for r in results:
            assert r["mismatched_batch"]["error"].startswith(
                f"every rank needs the same local batch size; got {[3] * (np - 1) + [4]}")
            assert r["bad_label"]["error"] == (
                f"label 12 of sample 2 on rank {np - 1} is outside [0, num_classes=10)")
