"""One output folder, one run: the run's identity and an exclusive lock on the folder.

- ``OUTPUT/run.json`` names the run that owns the folder (``run_id``, when and where it started). A fresh
  run writes it; a resumed run keeps the id of the checkpoint it resumes. Every checkpoint manifest records
  the id, so rotation only ever deletes the owning run's checkpoints.
- ``OUTPUT/.lock`` is held with ``flock`` by rank 0 of the trainer using the folder, for as long as it
  trains. The kernel drops the lock when that process ends, however it ends, so a lock is never stale; the
  file's text (host, pid, run id) only serves the message a second trainer gets.

A fresh run (``resume=False``, or ``resume=True`` with nothing to resume) into a folder that holds another
run's results (a sealed checkpoint or a final ``model.pt``) stops before anything is written, naming the
folder and the ways on; with ``overwrite=True`` it removes those results first and says so.
"""
import datetime
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import uuid

import torch

from ..fileio import write_atomic

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class RunFolderError(RuntimeError):
    pass


def read_run(output):
    """The ``run.json`` of ``output`` as a dict, or None when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(output, RUN_FILE)) as f:
            run = json.load(f)
        return run if isinstance(run, dict) and isinstance(run.get("run_id"), str) else None
    except (OSError, ValueError):
        return None


def write_run(output, run_id, resumed_from=None):
    run = dict(run_id=run_id, started=datetime.datetime.now().isoformat(timespec="seconds"),
               host=socket.gethostname(), pid=os.getpid())
    if resumed_from:
        run["resumed_from"] = resumed_from
    write_atomic(os.path.join(output, RUN_FILE), lambda f: json.dump(run, f, indent=2), mode="w")
    return run


def sealed_checkpoints(output):
    """``[(step, run_id or None)]`` of the sealed checkpoint folders under ``output``, oldest first."""
    root = os.path.join(output, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        m = _STEP_DIR.match(name)
        if not m:
            continue
        try:
            with open(os.path.join(root, name, "MANIFEST.json")) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue  # never sealed: not a checkpoint
        found.append((int(m.group(1)), manifest.get("run_id") if isinstance(manifest, dict) else None))
    return sorted(found)


def final_files(output):
    """The final model files a finished run left in ``output``."""
    names = ["model.pt", "config.json"] + sorted(os.path.basename(p) for p in
                                                 glob.glob(os.path.join(output, "softmax_fc_rank_*.pt")))
    return [n for n in names if os.path.isfile(os.path.join(output, n))]


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``OUTPUT/.lock``; ``release`` (or the process's end) frees it."""

    def __init__(self, output, run_hint=""):
        self.path = os.path.join(output, LOCK_FILE)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise RunFolderError(
                f"output folder {output!r} is in use by another trainer ({holder}); wait for it to finish, "
                f"or give this run another output=...") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}{run_hint}, since "
                        f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        self.file.flush()

    def release(self):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class RunFolder:
    """The claim of rank 0 on the output folder: ``run_id`` (None until a fresh start or a resume decides it),
    the lock, and what the claim did (``notes``, for the log)."""

    def __init__(self, output, lock, run_id, notes):
        self.output, self.lock, self.run_id, self.notes = output, lock, run_id, notes

    def adopt(self, run_id, resumed_from):
        """After a resume: the folder belongs to the resumed checkpoint's run."""
        if run_id and run_id != self.run_id:
            self.run_id = run_id
            write_run(self.output, run_id, resumed_from)

    def start_fresh(self):
        """No checkpoint was resumed: a new run id."""
        self.run_id = uuid.uuid4().hex[:12]
        write_run(self.output, self.run_id)

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _claim_on_rank0(output, resume, overwrite):
    os.makedirs(output, exist_ok=True)
    lock = OutputLock(output)
    try:
        run = read_run(output)
        owner = run["run_id"] if run else None
        checkpoints = sealed_checkpoints(output)
        if resume and checkpoints:
            return RunFolder(output, lock, owner, [])
        finals = final_files(output)
        if not checkpoints and "model.pt" not in finals:
            return RunFolder(output, lock, None, [])
        what = ([f"checkpoints {', '.join(f'step_{s}' for s, _ in checkpoints)}"] if checkpoints else []) + (
            [f"a final model ({', '.join(finals)})"] if finals else [])
        ids = sorted({r for _, r in checkpoints if r} | ({owner} if owner else set()))
        whose = f"run {', '.join(ids)}" if ids else "an earlier run"
        if not overwrite:
            raise RunFolderError(
                f"output folder {output!r} holds {whose}'s results ({'; '.join(what)}) and this run starts "
                f"fresh{' (resume=True found no checkpoint to continue)' if resume else ''}. To keep them, give "
                f"this run another output=...; to continue that run, set resume=True; to replace them, set "
                f"overwrite=True")
        shutil.rmtree(os.path.join(output, "checkpoints"), ignore_errors=True)
        for name in finals + ["metrics.jsonl"]:
            if os.path.exists(os.path.join(output, name)):
                os.remove(os.path.join(output, name))
        return RunFolder(output, lock, None, [f"overwrite=True: removed {whose}'s {'; '.join(what)} "
                                              f"from {output}"])
    except BaseException:
        lock.release()
        raise


def claim_output(output, comm, resume, overwrite, device="cpu"):
    """Rank 0 locks ``output`` and checks that this run may use it; every rank gets the outcome, and a refusal
    is a ``RunFolderError`` on every rank (rank 0's names the folder and the ways on). Returns the
    ``RunFolder`` on rank 0 and None elsewhere."""
    claim, error = None, None
    if comm.rank == 0:
        try:
            claim = _claim_on_rank0(output, resume, overwrite)
        except (RunFolderError, OSError) as exc:
            error = exc
    refused = comm.broadcast(torch.tensor([0 if error is None else 1], device=device), root=0)
    if error is not None:
        raise error
    if int(refused.item()):
        raise RunFolderError(f"rank 0 refused the output folder {output!r} (its error says why)")
    return claim
