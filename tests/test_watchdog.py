"""The stuck-rank watchdog: fires with a message naming the step and the stuck ranks, never while steps keep
coming, stops cleanly, and never keeps a finished process alive."""
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import types

import pytest

from partialfc.config import default_config
from partialfc.engine import StepWatchdog, WatchdogHook, default_hooks
from partialfc.engine.watchdog import heartbeat_path, read_heartbeat


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class Exit:
    """Stands in for os._exit: records the status (and wakes a waiting test)."""

    def __init__(self):
        self.status, self.called = None, threading.Event()

    def __call__(self, status):
        self.status = status
        self.called.set()


def _watchdog(tmp_path, rank=0, size=3, timeout=20.0, clock=None):
    clock = clock or FakeClock()
    out, exit = io.StringIO(), Exit()
    wd = StepWatchdog(rank, size, timeout, str(tmp_path), clock=clock, wall=clock, exit=exit, stream=out)
    return wd, clock, out, exit


def _write_beat(folder, rank, step, when, finished=False):
    with open(heartbeat_path(folder, rank), "w") as f:
        json.dump(dict(rank=rank, step=step, time=when, pid=1, finished=finished), f)


def test_fires_when_a_step_stalls_naming_step_and_stale_rank(tmp_path):
    wd, clock, out, exit = _watchdog(tmp_path)
    wd.step_done(6)
    _write_beat(tmp_path, 1, 6, clock.now + 19)  # alive: wrote a heartbeat 1 s before the deadline
    _write_beat(tmp_path, 2, 5, clock.now - 3)  # stopped 23 s ago, a step behind
    clock.now += 19.9
    assert wd.poll(clock.now) is False and exit.status is None
    clock.now += 0.1
    assert wd.poll(clock.now) is True
    assert exit.status == 1
    assert out.getvalue() == ("[rank 0] step 7 has not finished in 20 s (collective_timeout); "
                              "rank(s) [2] last reported step 5: stuck or dead\n")


def test_message_names_missing_behind_finished_and_all_alive(tmp_path):
    wd, clock, out, exit = _watchdog(tmp_path, rank=1, size=5, timeout=8.0)
    wd.step_done(10)
    clock.now += 8
    _write_beat(tmp_path, 0, 10, clock.now - 1)  # alive and level: not named
    _write_beat(tmp_path, 2, 9, clock.now - 1)  # alive, a step behind (a long hook)
    _write_beat(tmp_path, 4, 10, clock.now - 30, finished=True)
    assert wd.message(10, 8.0) == (
        "[rank 1] step 11 has not finished in 8 s (collective_timeout); rank(s) [3] wrote no heartbeat: stuck "
        "or dead; rank(s) [2] alive but last finished step 9: still working; rank(s) [4] finished training")
    for rank in (2, 3, 4):
        _write_beat(tmp_path, rank, 10, clock.now - 1)
    assert wd.message(10, 8.0) == (
        "[rank 1] step 11 has not finished in 8 s (collective_timeout); every other rank is alive at step 10: "
        "all wait in the same step (a collective that never completes, or a hook that takes longer than "
        "collective_timeout)")


def test_never_fires_while_steps_keep_coming_and_beats_a_few_times_per_timeout(tmp_path):
    wd, clock, out, exit = _watchdog(tmp_path, timeout=20.0)
    wd.step_done(0)
    writes = 0
    for step in range(1, 2001):  # 1000 s of steps every 0.5 s, polled every 0.25 s
        for _ in range(2):
            clock.now += 0.25
            before = read_heartbeat(str(tmp_path), 0)
            wd.poll(clock.now)
            writes += read_heartbeat(str(tmp_path), 0) != before
        wd.step_done(step)
    assert exit.status is None and out.getvalue() == ""
    assert 1000 / 5 - 1 <= writes <= 1000 / 5 + 1  # every timeout/4 = 5 s, not every step
    # A pause just under the timeout still does not fire; the heartbeat carries the last finished step.
    clock.now += 19.9
    assert wd.poll(clock.now) is False and exit.status is None
    assert read_heartbeat(str(tmp_path), 0)["step"] == 2000


def test_thread_fires_on_its_own_and_reports_in_time(tmp_path):
    out, exit = io.StringIO(), Exit()
    wd = StepWatchdog(1, 2, 0.5, str(tmp_path), exit=exit, stream=out)
    _write_beat(tmp_path, 0, 2, time.time() - 60)
    start = time.monotonic()
    wd.start(2)
    assert exit.called.wait(10), "the watchdog did not fire"
    assert 0.5 <= time.monotonic() - start < 3
    assert exit.status == 1
    assert re.fullmatch(r"\[rank 1\] step 3 has not finished in \d s \(collective_timeout\); rank\(s\) \[0\] "
                        r"last reported step 2: stuck or dead\n", out.getvalue())
    wd._thread.join(5)
    assert not wd._thread.is_alive()


def test_stops_cleanly_and_leaves_a_finished_heartbeat(tmp_path):
    out, exit = io.StringIO(), Exit()
    wd = StepWatchdog(0, 2, 0.4, str(tmp_path), exit=exit, stream=out)
    wd.start(0)
    thread = wd._thread
    assert thread.daemon
    for step in range(1, 6):
        time.sleep(0.1)
        wd.step_done(step)
    wd.stop()
    assert not thread.is_alive()
    time.sleep(1.0)  # well past the timeout: a stopped watchdog never fires
    assert exit.status is None and out.getvalue() == ""
    beat = read_heartbeat(str(tmp_path), 0)
    assert beat["step"] == 5 and beat["finished"] is True and beat["rank"] == 0


def test_an_armed_watchdog_does_not_keep_a_finished_process_alive(tmp_path):
    code = ("import sys; from partialfc.engine.watchdog import StepWatchdog; "
            f"StepWatchdog(0, 2, 600, {str(tmp_path)!r}).start(0); print('done')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr


@pytest.mark.parametrize("timeout", [0, -1, "20", True])
def test_bad_timeout_is_refused_naming_the_value(tmp_path, timeout):
    with pytest.raises(ValueError, match=f"collective_timeout must be a number of seconds > 0, got {timeout!r}"):
        StepWatchdog(0, 2, timeout, str(tmp_path))


def _trainer(tmp_path, size, step=0):
    return types.SimpleNamespace(comm=types.SimpleNamespace(rank=size - 1, size=size), output=str(tmp_path),
                                 step=step)


def test_hook_runs_the_watchdog_only_with_several_ranks_and_a_timeout(tmp_path):
    hook = WatchdogHook(30)
    hook.trainer = _trainer(tmp_path, 2, step=4)
    hook.before_train()
    thread = hook.watchdog._thread
    assert thread.is_alive() and read_heartbeat(str(tmp_path / "heartbeats"), 1)["step"] == 4
    hook.trainer.step = 5
    hook.after_step()
    assert hook.watchdog._done == 5
    hook.after_train()
    assert hook.watchdog is None and not thread.is_alive()
    assert read_heartbeat(str(tmp_path / "heartbeats"), 1) == dict(
        rank=1, step=5, time=pytest.approx(time.time(), abs=30), pid=os.getpid(), finished=True)

    for timeout, size in ((30, 1), (None, 2)):
        hook = WatchdogHook(timeout)
        hook.trainer = _trainer(tmp_path / f"{timeout}_{size}", size)
        hook.before_train()
        hook.after_step()
        assert hook.watchdog is None and not os.path.exists(tmp_path / f"{timeout}_{size}")
        hook.after_train()


def test_default_hooks_end_with_the_watchdog_of_collective_timeout():
    config = default_config()
    config.update(collective_timeout=7.5, val_targets=[])
    hooks = default_hooks(config, [], checkpointer=None)
    assert isinstance(hooks[-1], WatchdogHook) and hooks[-1].timeout == 7.5
    assert sum(isinstance(h, WatchdogHook) for h in hooks) == 1


RANK_VARS = ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
             "SLURM_PROCID")


def test_launcher_rank_is_the_communicators_then_the_launchers(monkeypatch):
    from partialfc import comm
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(comm, "_COMM", None)
    assert comm.launcher_rank() == "?"
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun
    assert comm.launcher_rank() == "3"
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert comm.launcher_rank() == "1"
    # Once a communicator exists its rank is the real one, whatever the environment says.
    monkeypatch.setattr(comm, "_COMM", types.SimpleNamespace(rank=5))
    assert comm.launcher_rank() == "5"


def test_process_group_timeout_is_collective_timeout_but_never_below_torchs_default():
    import datetime

    from partialfc.comm import process_group_timeout
    assert process_group_timeout(7200) == datetime.timedelta(hours=2)  # a long evaluation on rank 0 may finish
    assert process_group_timeout(3) == datetime.timedelta(minutes=30)  # the set-up keeps its 30 minutes
    assert process_group_timeout(None) == datetime.timedelta(minutes=30)
