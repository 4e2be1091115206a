"""The stuck-rank watchdog: a rank whose step does not finish within ``collective_timeout`` ends the job.

A rank that stops (a hung data read, a dead or SIGSTOPped process, a lost host) leaves every other rank
blocked inside a collective of the same step, silently and for ever. Each rank therefore runs a daemon
thread that knows when the rank's last step ended (``step_done``). When the current step has not ended
within ``timeout`` seconds, the thread prints one line naming the step and the ranks that look stuck, and
ends the process with ``os._exit`` (the main thread is blocked in the collective, so nothing else could
end it); the launcher then ends the rest of the job.

To name the lagging ranks, the thread of every rank writes a heartbeat, ``FOLDER/rank_<r>.json`` with its
last finished step and the wall-clock time, a few times per timeout period (not every step). The folder
lies in the run's output folder, which every rank shares. A stopped process's threads stop with it, so its
heartbeat goes stale; the rank that fires reads the others' heartbeats and names those whose heartbeat is
stale or missing. The thread runs while the main thread waits in a Horovod, Gloo or MPI collective
because those waits release the GIL.
"""
import json
import os
import sys
import threading
import time

from ..fileio import write_atomic

EXIT_STATUS = 1
BEATS_PER_TIMEOUT = 4  # heartbeats written per timeout period
STALE_BEATS = 2  # a heartbeat older than this many beat intervals is stale


def heartbeat_path(folder, rank):
    return os.path.join(folder, f"rank_{rank}.json")


def read_heartbeat(folder, rank):
    """The heartbeat of ``rank`` as a dict, or None when there is none (or it cannot be read)."""
    try:
        with open(heartbeat_path(folder, rank)) as f:
            beat = json.load(f)
        return beat if isinstance(beat, dict) and isinstance(beat.get("step"), int) else None
    except (OSError, ValueError):
        return None


def _ranks(ranks):
    return "[" + ", ".join(str(r) for r in ranks) + "]"


class StepWatchdog:
    """Ends this process when a step of this rank takes longer than ``timeout`` seconds.

    ``start(step)`` arms it (``step`` steps already done) and starts the thread; ``step_done(step)`` after
    every step re-arms it; ``stop()`` ends the thread and writes a last heartbeat saying the rank finished.
    ``clock`` (monotonic) measures the step, ``wall`` stamps the heartbeats that other ranks compare with
    their own wall clock; ``exit`` and ``stream`` are ``os._exit`` and stderr outside tests.
    """

    def __init__(self, rank, size, timeout, folder, clock=time.monotonic, wall=time.time, exit=os._exit,
                 stream=None):
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"collective_timeout must be a number of seconds > 0, got {timeout!r}")
        self.rank, self.size, self.timeout, self.folder = int(rank), int(size), float(timeout), folder
        self.clock, self.wall, self.exit, self.stream = clock, wall, exit, stream
        self.beat_interval = self.timeout / BEATS_PER_TIMEOUT
        # The thread wakes at least every second, so it fires at most a second after the deadline.
        self.poll_interval = min(self.beat_interval, 1.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._done = 0  # steps finished
        self._since = None  # clock() when the running step started
        self._last_beat = None
        self.fired = None  # the message, once fired

    # --- the main thread's side ---------------------------------------------------------------------------
    def start(self, step):
        os.makedirs(self.folder, exist_ok=True)
        with self._lock:
            self._done, self._since = int(step), self.clock()
        self._beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"partialfc-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()

    def step_done(self, step):
        # Only two numbers under a lock: the step's own cost stays nil, the thread writes the heartbeats.
        with self._lock:
            self._done, self._since = int(step), self.clock()

    def stop(self):
        """End the thread (within ``poll_interval``) and leave a heartbeat that says this rank finished."""
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self.fired is None:
            self._beat(finished=True)

    # --- the thread's side --------------------------------------------------------------------------------
    def _run(self):
        while not self._stop.wait(self.poll_interval):
            if self.poll(self.clock()):
                return

    def poll(self, now):
        """One look at the clock: fire when the running step is late, else write a heartbeat when due.
        Returns True once fired."""
        with self._lock:
            done, since = self._done, self._since
        if since is not None and now - since >= self.timeout:
            self.fire(done, now - since)
            return True
        if self._last_beat is None or now - self._last_beat >= self.beat_interval:
            self._beat()
        return False

    def _beat(self, finished=False):
        with self._lock:
            done = self._done
        beat = dict(rank=self.rank, step=done, time=self.wall(), pid=os.getpid(), finished=finished)
        try:
            write_atomic(heartbeat_path(self.folder, self.rank), lambda f: json.dump(beat, f), mode="w")
        except OSError:
            pass  # a full or vanished disk must not end the run; the others then see this rank as stale
        self._last_beat = self.clock()

    def fire(self, done, waited):
        self.fired = self.message(done, waited)
        line = self.fired + "\n"
        if self.stream is not None:
            self.stream.write(line)
            self.stream.flush()
        else:
            # Straight to the descriptor: sys.stderr's lock may be held by the blocked main thread.
            os.write(2, line.encode())
        self.exit(EXIT_STATUS)

    def message(self, done, waited):
        """``[rank r] step N has not finished in T s (collective_timeout); <what the other ranks say>``."""
        head = (f"[rank {self.rank}] step {done + 1} has not finished in {waited:.0f} s (collective_timeout)")
        now = self.wall()
        stale, missing, behind, finished = {}, [], {}, []
        for rank in range(self.size):
            if rank == self.rank:
                continue
            beat = read_heartbeat(self.folder, rank)
            if beat is None:
                missing.append(rank)
            elif beat.get("finished"):
                finished.append(rank)
            elif now - float(beat.get("time", 0)) > STALE_BEATS * self.beat_interval:
                stale.setdefault(beat["step"], []).append(rank)
            elif beat["step"] < done:
                behind.setdefault(beat["step"], []).append(rank)
        parts = [f"rank(s) {_ranks(ranks)} last reported step {step}: stuck or dead"
                 for step, ranks in sorted(stale.items())]
        if missing:
            parts.append(f"rank(s) {_ranks(missing)} wrote no heartbeat: stuck or dead")
        parts += [f"rank(s) {_ranks(ranks)} alive but last finished step {step}: still working"
                  for step, ranks in sorted(behind.items())]
        if finished:
            parts.append(f"rank(s) {_ranks(finished)} finished training")
        if not parts:
            parts.append(f"every other rank is alive at step {done}: all wait in the same step (a collective "
                         "that never completes, or a hook that takes longer than collective_timeout)")
        return head + "; " + "; ".join(parts)
