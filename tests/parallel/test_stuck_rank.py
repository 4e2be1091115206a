"""A rank that stops (SIGSTOP) or dies (SIGKILL) in a 2-rank CPU run ends every process of the job within
60 s, with a non-zero exit and a message naming the step and the rank, under each launcher."""
import json
import os
import re
import signal
import time

import pytest

from launchers import ROOT, launch, require

HERE = os.path.dirname(os.path.abspath(__file__))
SIGNAL_STEP = 3  # the signalled rank finishes this step, then stops or dies
TIMEOUT = 4  # collective_timeout, seconds
BOUND = 60  # every process ends within this many seconds of the signal




@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # the first run generates the synthetic set, the others reuse it


def _ended(pid):
    """The process is gone or a zombie (nobody reaps orphans in some containers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _train_and_signal(launcher, tmp_path, data_root, sig, rank):
    """Run until ``rank`` sends itself ``sig`` after step SIGNAL_STEP; returns the launcher's exit status,
    its output and the seconds from the signal to the end of the last process."""
    args = [os.path.join(HERE, "stuck_worker.py"), str(tmp_path), sig, str(rank), str(SIGNAL_STEP),
            os.path.join(ROOT, "configs", "synthetic.py"), f"output='{tmp_path / 'out'}'", f"data_root='{data_root}'",
            "synthetic_ids=24", "synthetic_images_per_id=4", "batch_size=8", "embedding_size=32", "num_workers=0",
            "max_steps=1000", "val_targets=[]", "frequent=1000", "tensorboard=False",
            f"collective_timeout={TIMEOUT}"]
    proc = launch(launcher, 2, *args, timeout=BOUND + 90)
    pids = [int((tmp_path / f"pid_{r}").read_text()) for r in (0, 1)]
    deadline = time.time() + 5  # the launcher has returned; give the kernel a moment to finish its ranks
    while not all(_ended(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in pids if not _ended(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"{launcher}: rank processes {alive} outlived the launcher"
    signalled = json.loads((tmp_path / "signalled").read_text())
    return proc.returncode, proc.stdout + proc.stderr, time.time() - signalled["time"]


@pytest.mark.parametrize("launcher,stopped", [("horovodrun", 1), ("mpirun", 0), ("torchrun", 1)])
def test_stopped_rank_ends_the_job_naming_step_and_rank(launcher, stopped, tmp_path, data_root):
    require(launcher)
    status, output, elapsed = _train_and_signal(launcher, tmp_path, data_root, "SIGSTOP", stopped)
    assert status != 0, output[-4000:]
    assert elapsed < BOUND, f"{launcher}: the job ended {elapsed:.0f} s after the rank stopped"
    # The other rank finished step 3 with it and waits in step 4; the stopped rank's heartbeat is stale.
    other = 1 - stopped
    found = re.search(rf"\[rank {other}\] step {SIGNAL_STEP + 1} has not finished in (\d+) s \(collective_timeout\); "
                      rf"rank\(s\) \[{stopped}\] last reported step (\d+): stuck or dead", output)
    assert found, output[-4000:]
    assert TIMEOUT <= int(found.group(1)) < TIMEOUT + 3
    assert int(found.group(2)) <= SIGNAL_STEP


# What each launcher prints about a rank that died of SIGKILL. mpirun (it aborts the job on any abnormal
# exit, printing "process rank 1 ... exited on signal 9") is left out to keep the suite short.
KILLED = {
    "horovodrun": r"Process {rank} exit with status code 137",
    "torchrun": r"rank\s+: {rank} \(local_rank: {rank}\)\s+exitcode\s+: -9",
}


@pytest.mark.parametrize("launcher", sorted(KILLED))
def test_killed_rank_ends_the_job_naming_the_rank(launcher, tmp_path, data_root):
    require(launcher)
    status, output, elapsed = _train_and_signal(launcher, tmp_path, data_root, "SIGKILL", 1)
    assert status != 0, output[-4000:]
    assert elapsed < BOUND, f"{launcher}: the job ended {elapsed:.0f} s after the rank was killed"
    assert re.search(KILLED[launcher].format(rank=1), output), output[-4000:]
