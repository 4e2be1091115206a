"""Elastic runs (elastic=True) outlive a lost rank: a 2-rank run loses one rank with SIGKILL after step 3
and the survivor finishes all 8 steps on world size 1, resumed from the checkpoint at step 2 with the
centers re-split and the per-rank batch doubled (2 x 12 -> 1 x 24). Under torchrun elastic the lost rank's
whole node goes (its agent killed with it); under Horovod elastic its host (127.0.0.1, beside localhost)
is blacklisted. The losses after the resume equal those of a plain 1-process resume from the same
checkpoint, and the redone step 3 gives the loss the 2-rank run had at step 3 (flat_test has no BatchNorm
and sample_rate=1, so the split of the global batch does not change a loss)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from launchers import ROOT, _env, require

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "elastic_worker.py")
DISCOVER = os.path.join(ROOT, "examples", "elastic", "discover_hosts.sh")
LOST_AT = 3  # the lost rank finishes this step, then dies
MAX_STEPS, SAVE_EVERY, GLOBAL_BATCH = 8, 2, 24
BOUND = 150  # seconds for a whole elastic run


def _overrides(tmp_path, output, batch_size, *extra):
    # 16 identities x 8 images: 5 global batches of 24 per epoch, so the run crosses into epoch 1.
    return [os.path.join(ROOT, "configs", "synthetic.py"), f"output='{output}'", f"data_root='{tmp_path / 'data'}'",
            "synthetic_ids=16", "synthetic_images_per_id=8", "val_targets=[]", "network='flat_test'",
            "embedding_size=32", f"batch_size={batch_size}", "num_workers=0", f"max_steps={MAX_STEPS}",
            f"save_every={SAVE_EVERY}", "sample_rate=1.0", "frequent=1", "tensorboard=False", "lr=0.05", *extra]


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _communicate(procs, timeout):
    """Wait for every process; on timeout kill each one's process group and fail with their output."""
    deadline, outputs = time.time() + timeout, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1, deadline - time.time()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError("the elastic run did not end within %d s:\n%s" % (
            timeout, "\n----\n".join((p.communicate()[0] or "")[-3000:] for p in procs)))
    return outputs


def _popen(cmd, env):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _check_survivor_finished(tmp_path, out, log):
    """The run finished every step on world size 1 after resuming from step_2; returns the resumed losses."""
    finished = json.loads((tmp_path / "finished.json").read_text())
    assert finished["step"] == MAX_STEPS and finished["world_size"] == 1, (finished, log[-4000:])
    killed = json.loads((tmp_path / "killed").read_text())
    assert killed["step"] == LOST_AT
    starts = _lines(tmp_path / "starts.jsonl")
    assert [(s["world_size"], s["batch_size"], s["resumed"]) for s in starts] == [
        (2, 12, None), (1, GLOBAL_BATCH, f"step_{SAVE_EVERY}")], starts
    steps = _lines(tmp_path / "steps.jsonl")
    before = {s["step"]: s["loss"] for s in steps if s["world_size"] == 2}
    after = {s["step"]: s["loss"] for s in steps if s["world_size"] == 1}
    assert sorted(before) == list(range(1, LOST_AT + 1)), steps
    assert sorted(after) == list(range(SAVE_EVERY + 1, MAX_STEPS + 1)), steps  # step 3 redone, each step once
    # The redone step is the 2-rank run's step: same global batch, same images, same centers.
    assert abs(after[LOST_AT] - before[LOST_AT]) < 1e-5, (before, after)
    with open(out / "training.log") as f:
        training_log = f.read()
    assert f"world size 1, batch_size {GLOBAL_BATCH} per rank keeps the run's global batch {GLOBAL_BATCH} " \
           f"(step_{SAVE_EVERY})" in training_log, training_log[-4000:]
    assert f"resumed from {out}/checkpoints/step_{SAVE_EVERY} at step {SAVE_EVERY}" in training_log
    assert "re-split 16 classes from 2 ranks to 1: rank 0 [0, 16) <- rank_0.pt[0:8] + rank_1.pt[0:8]" in training_log
    assert (out / "model.pt").is_file()
    return after


def _plain_resume_losses(tmp_path, out):
    """A plain 1-process resume (not elastic, no launcher) from the checkpoint the survivor resumed from."""
    ref_dir, ref_out = tmp_path / "reference", tmp_path / "reference" / "out"
    shutil.copytree(tmp_path / f"resumed_step_{SAVE_EVERY}", ref_out / "checkpoints" / f"step_{SAVE_EVERY}")
    shutil.copy(out / "run.json", ref_out / "run.json")
    proc = subprocess.run([sys.executable, WORKER, str(ref_dir), "none", "0",
                           *_overrides(tmp_path, ref_out, GLOBAL_BATCH, "resume=True", "comm_backend='single'")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {s["step"]: s["loss"] for s in _lines(ref_dir / "steps.jsonl")}


def _assert_losses_match(after, reference):
    assert sorted(reference) == sorted(after)
    for step in after:
        assert abs(after[step] - reference[step]) < 1e-6, (step, after, reference)


def test_horovod_elastic_run_outlives_a_killed_rank(tmp_path):
    require("horovodrun")
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")  # two "hosts" on this machine: ranks 0 and 1
    out = tmp_path / "out"
    cmd = ["horovodrun", "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script", DISCOVER,
           "--gloo", "--network-interface", "lo", sys.executable, WORKER, str(tmp_path), "rank1", str(LOST_AT),
           *_overrides(tmp_path, out, GLOBAL_BATCH // 2, "elastic=True")]
    proc = _popen(cmd, dict(_env(), PARTIALFC_HOSTS_FILE=str(hosts)))
    log, = _communicate([proc], BOUND)
    assert proc.returncode == 0, log[-4000:]
    assert "Process 1 exit with status code 137" in log, log[-4000:]
    assert "horovod elastic: reset 1, training continues on world size 1 from step 2" in log
    after = _check_survivor_finished(tmp_path, out, log)
    _assert_losses_match(after, _plain_resume_losses(tmp_path, out))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_elastic_run_outlives_a_lost_node(tmp_path):
    require("torchrun")
    out = tmp_path / "out"
    # Two agents ("nodes") of one rank each on one c10d rendezvous; the first hosts its store. A restart
    # waits last_call_timeout for more nodes; a lost node is dead after 3 missed 1 s keep-alives.
    conf = "last_call_timeout=8,keep_alive_interval=1,keep_alive_max_attempt=3"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=2",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_id=elastic_test"]
    worker = [WORKER, str(tmp_path), "agent", str(LOST_AT), *_overrides(tmp_path, out, GLOBAL_BATCH // 2,
                                                                          "elastic=True")]
    host = _popen(agent + [f"--rdzv_conf={conf}"] + worker, _env())
    time.sleep(1)
    lost = _popen(agent + [f"--rdzv_conf=is_host=false,{conf}"] + worker, dict(_env(), ELASTIC_TEST_VICTIM="1"))
    host_log, lost_log = _communicate([host, lost], BOUND)
    log = host_log + lost_log
    assert lost.returncode == -signal.SIGKILL, lost_log[-3000:]
    assert host.returncode == 0, host_log[-4000:]
    assert "elastic (torchrun, restart 1 of at most 2): world size 1" in host_log, host_log[-4000:]
    after = _check_survivor_finished(tmp_path, out, log)
    _assert_losses_match(after, _plain_resume_losses(tmp_path, out))
