"""Small hooks around the training loop, in the spirit of detectron2's HookBase.

The trainer owns the step; each hook sees the trainer (``self.trainer``) and reacts at three moments.
Hooks must not change what a step computes, only observe it or act between steps. The evaluation hook,
``partialfc.eval.VerificationHook``, is one of them and lives with the evaluation code.
"""
import os
import resource
import sys
import time

import torch

from .watchdog import StepWatchdog


class HookBase:
    trainer = None  # set by Trainer.register_hooks

    def before_train(self):
        pass

    def after_step(self):
        """Called after every optimizer step; ``self.trainer.step`` is the number of steps done."""

    def after_train(self):
        pass

    def close(self):
        """Called once when training ends, normally or by an exception; release what the hook holds."""


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LoggerHook(HookBase):
    """Rank 0: throughput (global samples/s), loss, lr, fp16 scale, ETA and peak memory every ``frequent``
    steps, to the log, TensorBoard, and a progress bar when attached to a terminal."""

    def __init__(self, frequent):
        self.frequent = frequent
        self.bar = None

    def before_train(self):
        t = self.trainer
        self.tic, self.tic_step, self.loss_sum, self.loss_count = time.time(), t.step, 0.0, 0
        if t.comm.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=t.max_steps, initial=t.step, unit="step", dynamic_ncols=True)

    def after_step(self):
        t = self.trainer
        self.loss_sum += t.last_loss
        self.loss_count += 1
        if self.bar is not None:
            self.bar.update(1)
        if t.step % self.frequent and t.step != t.max_steps:
            return
        now = time.time()
        speed = (t.step - self.tic_step) * t.global_batch_size * t.config.gradient_acc / max(now - self.tic, 1e-9)
        eta_h = (t.max_steps - t.step) * t.global_batch_size * t.config.gradient_acc / max(speed, 1e-9) / 3600
        loss = self.loss_sum / max(self.loss_count, 1)
        lr = t.optimizer.param_groups[0]["lr"]
        scale = f"  scale {t.scaler.get_scale():.0f}" if t.scaler is not None else ""
        t.log(f"step {t.step}/{t.max_steps}  epoch {t.epoch}  loss {loss:.4f}  lr {lr:.5f}{scale}  "
              f"speed {speed:.1f} samples/s  eta {eta_h:.2f}h  peak mem {peak_memory_mb(t.device):.0f} MB")
        if t.tb is not None:
            t.tb.add_scalar("train/loss", loss, t.step)
            t.tb.add_scalar("train/lr", lr, t.step)
            t.tb.add_scalar("train/samples_per_second", speed, t.step)
            if t.scaler is not None:
                t.tb.add_scalar("train/fp16_scale", t.scaler.get_scale(), t.step)
        self.tic, self.tic_step, self.loss_sum, self.loss_count = now, t.step, 0.0, 0

    def after_train(self):
        if self.bar is not None:
            self.bar.close()


class LRSchedulerHook(HookBase):
    """One scheduler step per optimizer step, for the backbone's optimizer and the head's SparseSGD alike."""

    def __init__(self, schedulers):
        self.schedulers = schedulers

    def after_step(self):
        for scheduler in self.schedulers:
            scheduler.step()


class CheckpointHook(HookBase):
    """A resumable checkpoint every ``every`` steps and, when ``at_end`` (``save_all_states``), at the end.

    A checkpoint due while steps are being skipped (non-finite loss or gradients) waits for the next good
    step, so that a streak of skipped steps never rotates away the last good checkpoints."""

    def __init__(self, checkpointer, every, at_end):
        self.checkpointer, self.every, self.at_end = checkpointer, every, at_end
        self.due = False

    def _save(self):
        t = self.trainer
        self.checkpointer.save(t.step, t.epoch, t.batch_in_epoch)
        self.due = False

    def after_step(self):
        t = self.trainer
        if self.every and t.step % self.every == 0 and t.step < t.max_steps:
            self.due = True
        if self.due and t.bad_steps == 0:
            self._save()

    def after_train(self):
        if self.at_end:
            self._save()


class WatchdogHook(HookBase):
    """Ends a rank whose step does not finish within ``timeout`` seconds (``collective_timeout``), naming the
    step and the ranks that look stuck (``partialfc.engine.watchdog``). Only in runs of more than one rank:
    a single process has nobody to wait for. ``None`` turns it off.

    It runs after the other hooks, so a step's window (from the end of the previous step's hooks, or from
    ``before_train``) holds the step and the evaluation or checkpoint save that follows it; the other hooks'
    ``after_train`` (the last checkpoint and evaluation) are watched too. A hook that runs longer than the
    timeout ends the run: raise ``collective_timeout`` for very long evaluations or saves."""

    FOLDER = "heartbeats"

    def __init__(self, timeout):
        self.timeout = timeout
        self.watchdog = None

    def before_train(self):
        t = self.trainer
        self.close()  # a previous train() of this Trainer
        if self.timeout is None or t.comm.size == 1:
            return
        self.watchdog = StepWatchdog(t.comm.rank, t.comm.size, self.timeout, os.path.join(t.output, self.FOLDER))
        self.watchdog.start(t.step)

    def after_step(self):
        if self.watchdog is not None:
            self.watchdog.step_done(self.trainer.step)

    def after_train(self):
        self.close()

    def close(self):
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None


def default_hooks(config, schedulers, checkpointer):
    """The training run's hooks, in the order they run: the schedules first (so the logged lr is the one the
    next step uses), then the log line, the checkpoint, verification, and the stuck-rank watchdog last (its
    window covers the hooks before it)."""
    from ..eval.verification import VerificationHook
    return [LRSchedulerHook(schedulers), LoggerHook(config.frequent),
            CheckpointHook(checkpointer, config.save_every, config.save_all_states), VerificationHook(config),
            WatchdogHook(config.get("collective_timeout", 1800))]
