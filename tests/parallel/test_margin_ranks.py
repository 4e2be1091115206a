"""AdaFace and CurricularFace over ranks: with sample_rate=1, 1, 2 and 4 ranks (37 classes, uneven shards)
give the dense single-process losses, gradients and running statistics over several steps, and the same
as each other; the running statistics are the same on every rank."""
import json
import os
import subprocess
import sys

import pytest

from launchers import ROOT, require, run

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "margin_ranks_worker.py")
MARGINS = ("adaface", "curricularface")
WORLDS = [("single", 1), ("torchrun", 2), ("torchrun", 4), ("horovodrun", 2)]
TOL = 1e-10


def run_world(launcher, np, out_dir):
    if launcher == "single":
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, WORKER, "single", out_dir], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    else:
        require(launcher)
        run(launcher, np, WORKER, "torch" if launcher == "torchrun" else "horovod", out_dir)
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(np)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_world("single", 1, str(tmp_path_factory.mktemp("single")))


def merged(results, margin, step, key):
    """The rows of every rank, in rank order (embedding rows, or center rows of the shards)."""
    return [row for r in results for row in r[margin]["steps"][step][key]]


def max_diff(a, b):
    return max(abs(u - v) for row_a, row_b in zip(a, b) for u, v in zip(row_a, row_b))


@pytest.mark.parametrize("launcher,np", WORLDS, ids=[f"{l}-np{n}" for l, n in WORLDS])
def test_world_sizes_match_dense_and_each_other(single, launcher, np, tmp_path):
    results = single if launcher == "single" else run_world(launcher, np, str(tmp_path))
    assert [r["rank"] for r in results] == list(range(np)) and all(r["size"] == np for r in results)
    if np == 4:
        assert [r["adaface"]["num_local"] for r in results] == [10, 9, 9, 9]
    for margin in MARGINS:
        steps = len(results[0][margin]["steps"])
        for step in range(steps):
            per_rank = [r[margin]["steps"][step] for r in results]
            for s in per_rank:
                assert s["loss_err"] < TOL and s["x_grad_err"] < TOL and s["w_grad_err"] < TOL, (margin, step, s)
                assert s["state_err"] < 1e-12, (margin, step, s["head"])
            # one loss and one running state on every rank
            assert len({s["loss"] for s in per_rank}) == 1
            assert all(s["head"] == per_rank[0]["head"] for s in per_rank), [s["head"] for s in per_rank]
            ref = single[0][margin]["steps"][step]
            assert abs(per_rank[0]["loss"] - ref["loss"]) < TOL
            assert all(abs(per_rank[0]["head"][k] - v) < 1e-12 for k, v in ref["head"].items())
            assert max_diff(merged(results, margin, step, "x_grad"), ref["x_grad"]) < TOL
            assert max_diff(merged(results, margin, step, "w_grad"), ref["w_grad"]) < TOL
        # the running statistics moved over the steps
        first, last = results[0][margin]["steps"][0]["head"], results[0][margin]["steps"][-1]["head"]
        assert all(first[k] != last[k] for k in first)
