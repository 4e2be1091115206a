"""Run under a launcher: ``partialfc.train.main`` with one rank that stops or dies at a given step.

    python stuck_worker.py OUT_DIR SIGNAL RANK STEP CONFIG [key=value ...]

Every rank writes its pid to ``OUT_DIR/pid_<rank>`` before training. After step ``STEP`` rank ``RANK``
writes ``OUT_DIR/signalled`` (its pid and the wall-clock time) and sends itself ``SIGNAL`` (``SIGSTOP``:
it stays, stopped, and stops answering collectives; ``SIGKILL``: it dies). The rest is the real command
line training, its hooks and its failure handling.
"""
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import partialfc.train as train  # noqa: E402
from partialfc.engine import HookBase  # noqa: E402


class SignalSelfHook(HookBase):
    def __init__(self, out_dir, sig, rank, step):
        self.out_dir, self.sig, self.rank, self.step = out_dir, sig, rank, step

    def before_train(self):
        with open(os.path.join(self.out_dir, f"pid_{self.trainer.comm.rank}"), "w") as f:
            f.write(str(os.getpid()))

    def after_step(self):
        if self.trainer.comm.rank == self.rank and self.trainer.step == self.step:
            with open(os.path.join(self.out_dir, "signalled"), "w") as f:
                json.dump(dict(pid=os.getpid(), time=time.time()), f)
            os.kill(os.getpid(), self.sig)


def main():
    out_dir, sig, rank, step, *argv = sys.argv[1:]
    sig, rank, step = getattr(signal, sig), int(rank), int(step)
    default_hooks = train.default_hooks

    def hooks(*args):
        return default_hooks(*args) + [SignalSelfHook(out_dir, sig, rank, step)]

    train.default_hooks = hooks  # the Trainer looks the name up in its module when it registers its hooks
    train.main(argv)


if __name__ == "__main__":
    main()
