"""The new margins and the sub-center max over ranks: with sample_rate=1, 1 process, torchrun with 2 and 4
ranks and horovodrun --gloo with 2 and 4 ranks (37 identities, uneven shards) give the losses, gradients and
running statistics of a dense float64 model over several steps, and the same as each other; the running
statistics are the same on every rank.

The cases (margin_ranks_worker.CASES): AdaFace and CurricularFace with one center per identity; sub-center
ArcFace with K = 3 under ArcFace, a combined margin (m1 != 1, past-pi fallback), ArcFace with interclass
filtering, AdaFace and CurricularFace. One worker run per world size does every case. The filtered case is
expected to fail on more than one rank until the margin ops filter every row (see FILTERING_ACROSS_RANKS)."""
import os

import pytest

from launchers import run_worker_world

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "margin_ranks_worker.py")
ADAPTIVE = ("adaface", "curricularface", "subcenter_adaface", "subcenter_curricularface")
SUBCENTER = ("subcenter_arcface", "subcenter_combined", "subcenter_arcface_filtered", "subcenter_adaface",
             "subcenter_curricularface")
FILTERED = "subcenter_arcface_filtered"
CASES = tuple(c for c in ("adaface", "curricularface") + SUBCENTER if c != FILTERED)
K = 3
WORLDS = [("single", 1), ("torchrun", 2), ("torchrun", 4), ("horovodrun", 2), ("horovodrun", 4)]
TOL = 1e-10


def run_world(launcher, np, out_dir):
    return run_worker_world(launcher, np, WORKER, out_dir)


_RESULTS = {}


def results_of(launcher, np, tmp_path_factory):
    """Every rank's results at one world size: one worker run per world size for all the tests here."""
    if (launcher, np) not in _RESULTS:
        _RESULTS[launcher, np] = run_world(launcher, np, str(tmp_path_factory.mktemp(f"{launcher}{np}")))
    return _RESULTS[launcher, np]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return results_of("single", 1, tmp_path_factory)


def merged(results, case, step, key):
    """The rows of every rank, in rank order (embedding rows, or center rows of the shards)."""
    return [row for r in results for row in r[case]["steps"][step][key]]


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(u - v) for row_a, row_b in zip(a, b) for u, v in zip(row_a, row_b))


def test_the_subcenter_cases_exercise_every_subcenter(single):
    # In each step of each sub-center case the samples' nearest sub-centers of their own identity are every
    # one of the K (the argmax is not always the first row), so the equivalence below covers the max.
    for case in SUBCENTER:
        assert single[0][case]["rows"] == 37 * K
        assert all(s["target_subcenters"] == list(range(K)) for s in single[0][case]["steps"]), case


def check_case(results, single, case):
    """``case``'s steps on every rank against the dense model, the other ranks and the single process."""
    steps = len(results[0][case]["steps"])
    for step in range(steps):
        per_rank = [r[case]["steps"][step] for r in results]
        for s in per_rank:
            assert s["loss_err"] < TOL and s["x_grad_err"] < TOL and s["w_grad_err"] < TOL, (case, step, s)
            assert s["state_err"] < 1e-12, (case, step, s["head"])
        # one loss and one running state on every rank
        assert len({s["loss"] for s in per_rank}) == 1
        assert all(s["head"] == per_rank[0]["head"] for s in per_rank), [s["head"] for s in per_rank]
        ref = single[0][case]["steps"][step]
        assert abs(per_rank[0]["loss"] - ref["loss"]) < TOL
        assert per_rank[0]["head"].keys() == ref["head"].keys()
        assert all(abs(per_rank[0]["head"][k] - v) < 1e-12 for k, v in ref["head"].items())
        assert max_diff(merged(results, case, step, "x_grad"), ref["x_grad"]) < TOL
        assert max_diff(merged(results, case, step, "w_grad"), ref["w_grad"]) < TOL
    if case in ADAPTIVE:  # the running statistics moved over the steps
        first, last = results[0][case]["steps"][0]["head"], results[0][case]["steps"][-1]["head"]
        assert first and all(first[k] != last[k] for k in first)


@pytest.mark.parametrize("launcher,np", WORLDS, ids=[f"{l}-np{n}" for l, n in WORLDS])
def test_world_sizes_match_dense_and_each_other(single, launcher, np, tmp_path_factory):
    results = results_of(launcher, np, tmp_path_factory)
    assert [r["rank"] for r in results] == list(range(np)) and all(r["size"] == np for r in results)
    if np == 4:
        assert [r["adaface"]["num_local"] for r in results] == [10, 9, 9, 9]
        assert [r["subcenter_arcface"]["rows"] for r in results] == [30, 27, 27, 27]
    for case in CASES:
        check_case(results, single, case)


# Interclass filtering drops a non-target cosine above the threshold in every row of the global batch (as one
# process over all classes does, and arcface_torch's CombinedMarginLoss): on several ranks also in the rows whose
# target class another rank holds, or the loss and the gradients would depend on the world size.
@pytest.mark.parametrize("launcher,np", WORLDS, ids=[f"{l}-np{n}" for l, n in WORLDS])
def test_interclass_filtering_with_subcenters_matches_dense_on_every_world_size(single, launcher, np,
                                                                               tmp_path_factory):
    check_case(results_of(launcher, np, tmp_path_factory), single, FILTERED)
