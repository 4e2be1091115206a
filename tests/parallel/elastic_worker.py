"""Run under an elastic launcher (or alone): ``partialfc.train.main`` with a record of what each start did,
and one rank that is lost at a given step.

    python elastic_worker.py OUT_DIR VICTIM STEP CONFIG [key=value ...]

VICTIM says which process is lost after step STEP, once per OUT_DIR: ``rank1`` (Horovod: the rank on the
second host, which dies with SIGKILL), ``agent`` (torchrun: the worker started by the agent whose
environment has ``ELASTIC_TEST_VICTIM=1`` kills that agent and itself with SIGKILL, losing the node) or
``none``. While the world has 2 ranks only; it writes ``OUT_DIR/killed`` first.

Rank 0 appends one line per step to ``OUT_DIR/steps.jsonl`` (pid, world size, step, loss), one per start to
``OUT_DIR/starts.jsonl`` (pid, world size, the step it starts at, the checkpoint it resumed from) with a copy
of that checkpoint under ``OUT_DIR/resumed_step_<N>``, and ``OUT_DIR/finished.json`` at the end.
The backbone is ``flat_test`` (no BatchNorm), as in the resume-on-any-world-size test.
"""
import json
import os
import shutil
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import partialfc.train as train  # noqa: E402
from partialfc.engine import HookBase  # noqa: E402
import resume_world_size_worker  # noqa: E402,F401  (registers the flat_test backbone)


def _append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class RecordAndLoseHook(HookBase):
    def __init__(self, out_dir, victim, step):
        self.out_dir, self.victim, self.step = out_dir, victim, step

    def before_train(self):
        t = self.trainer
        if t.comm.rank != 0:
            return
        resumed = os.path.join(t.output, "checkpoints", f"step_{t.step}") if t.checkpointer.resumed_at else None
        if resumed is not None:
            shutil.copytree(resumed, os.path.join(self.out_dir, f"resumed_step_{t.step}"), dirs_exist_ok=True)
        _append(os.path.join(self.out_dir, "starts.jsonl"),
                dict(pid=os.getpid(), world_size=t.comm.size, step=t.step, batch_size=t.config.batch_size,
                     resumed=resumed and os.path.basename(resumed)))

    def _is_victim(self):
        t = self.trainer
        if t.comm.size != 2 or t.step != self.step or os.path.exists(os.path.join(self.out_dir, "killed")):
            return False
        if self.victim == "rank1":
            return t.comm.rank == 1
        return self.victim == "agent" and os.environ.get("ELASTIC_TEST_VICTIM") == "1"

    def after_step(self):
        t = self.trainer
        if t.comm.rank == 0:
            _append(os.path.join(self.out_dir, "steps.jsonl"),
                    dict(pid=os.getpid(), world_size=t.comm.size, step=t.step, loss=t.last_loss))
        if self._is_victim():
            with open(os.path.join(self.out_dir, "killed"), "w") as f:
                json.dump(dict(pid=os.getpid(), rank=t.comm.rank, step=t.step), f)
            if self.victim == "agent":
                os.kill(os.getppid(), signal.SIGKILL)  # the torchrun agent: its node is gone
            os.kill(os.getpid(), signal.SIGKILL)

    def after_train(self):
        t = self.trainer
        if t.comm.rank == 0:
            with open(os.path.join(self.out_dir, "finished.json"), "w") as f:
                json.dump(dict(pid=os.getpid(), world_size=t.comm.size, step=t.step), f)


def main():
    out_dir, victim, step, *argv = sys.argv[1:]
    default_hooks = train.default_hooks

    def hooks(*args):
        return default_hooks(*args) + [RecordAndLoseHook(out_dir, victim, int(step))]

    train.default_hooks = hooks  # the Trainer looks the name up in its module when it registers its hooks
    train.main(argv)


if __name__ == "__main__":
    main()
