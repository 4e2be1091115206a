"""Train a face-recognition backbone with a Partial FC head.

    python -m partialfc.train configs/synthetic.py [key=value ...]
    horovodrun -np 8 -H localhost:8 bash config.sh        # one process per GPU
    torchrun --nproc_per_node=8 -m partialfc.train configs/ms1mv3_r50.py

One process per device. The backbone is data parallel (Horovod DistributedOptimizer or DDP, gradients
summed); the class centers are model parallel: each rank owns a contiguous shard that only its SparseSGD
updates, never broadcast nor allreduced.
"""
import argparse
import json
import logging
import math
import os
import sys
import time

import torch

from .backbones import build_backbone
from .comm import get_comm
from .config import load_config
from .head import PartialFC, SparseSGD, margin_from_config
from .hooks import HookBase


def poly_lr_lambda(max_steps, warmup_steps, power=2.0):
    """arcface_torch's schedule: linear warmup, then ``(1 - progress) ** 2`` decay to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, max_steps - warmup_steps)) ** power
    return factor


def step_lr_lambda(lr_steps, gamma, warmup_steps, max_steps):
    """The MXNet partial_fc schedule: ``lr *= gamma`` at each of ``lr_steps`` (fractions of training allowed)."""
    bounds = sorted(int(s * max_steps) if isinstance(s, float) and s < 1 else int(s) for s in (lr_steps or ()))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** sum(step >= b for b in bounds)
    return factor


class LoggerHook(HookBase):
    """Rank 0: throughput, loss, lr and ETA every ``frequent`` steps."""

    def __init__(self, frequent):
        self.frequent = frequent

    def before_train(self):
        self.tic, self.tic_step, self.loss_sum, self.loss_count = time.time(), self.trainer.step, 0.0, 0

    def after_step(self):
        t = self.trainer
        self.loss_sum += t.last_loss
        self.loss_count += 1
        if t.step % self.frequent and t.step != t.max_steps:
            return
        now = time.time()
        speed = (t.step - self.tic_step) * t.global_batch_size / max(now - self.tic, 1e-9)
        eta_h = (t.max_steps - t.step) * t.global_batch_size / max(speed, 1e-9) / 3600
        loss = self.loss_sum / max(self.loss_count, 1)
        lr = t.optimizer.param_groups[0]["lr"]
        t.log(f"step {t.step}/{t.max_steps}  epoch {t.epoch}  loss {loss:.4f}  lr {lr:.5f}  "
              f"speed {speed:.1f} samples/s  eta {eta_h:.2f}h")
        if t.tb is not None:
            t.tb.add_scalar("train/loss", loss, t.step)
            t.tb.add_scalar("train/lr", lr, t.step)
            t.tb.add_scalar("train/samples_per_second", speed, t.step)
        self.tic, self.tic_step, self.loss_sum, self.loss_count = now, t.step, 0.0, 0


class LRSchedulerHook(HookBase):
    """One scheduler step per optimizer step, for the backbone's optimizer and the head's SparseSGD alike."""

    def __init__(self, schedulers):
        self.schedulers = schedulers

    def after_step(self):
        for scheduler in self.schedulers:
            scheduler.step()


class Trainer:
    def __init__(self, config):
        self.config = config
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.comm = comm = get_comm(config.comm_backend, "cuda" if use_cuda else "cpu")
        self.device = torch.device("cuda", comm.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.output = config.output
        self._setup_logging()
        self.tb = None
        if comm.rank == 0 and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.output, "tensorboard"))
        self.amp_dtype = None
        torch.manual_seed(config.seed)

        # Data: rank 0 generates what needs generating while the other ranks wait.
        from .data import build_train_loader
        if config.rec == "synthetic":
            if comm.rank == 0:
                from .data.synthetic import ensure_synthetic
                ensure_synthetic(config)
            comm.barrier()
        self.loader = build_train_loader(config, comm)
        num_classes = config.num_classes or self.loader.num_classes
        num_image = config.num_image or self.loader.num_images
        self.global_batch_size = config.batch_size * comm.size

        # Model: a data-parallel backbone and this rank's shard of the class centers.
        self.backbone = build_backbone(config).to(self.device)
        comm.broadcast_module(self.backbone)  # Horovod: every rank starts from rank 0's backbone
        self.pfc = PartialFC(config.embedding_size, num_classes, config.sample_rate, margin_from_config(config),
                             comm=comm, interclass_filtering_threshold=config.interclass_filtering_threshold,
                             seed=config.seed).to(self.device)
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.backbone.parameters(), lr=config.lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.backbone.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        self.model, self.optimizer = comm.data_parallel(self.backbone, optimizer, config.gradient_acc)
        self.pfc_optimizer = SparseSGD(self.pfc, lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)

        steps_per_epoch = max(1, num_image // self.global_batch_size)
        self.max_steps = int(config.max_steps or steps_per_epoch * config.num_epoch)
        warmup_steps = int(steps_per_epoch * config.warmup_epoch)
        if config.lr_scheduler == "poly":
            factor = poly_lr_lambda(self.max_steps, warmup_steps)
        else:
            factor = step_lr_lambda(config.lr_steps, config.lr_gamma, warmup_steps, self.max_steps)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor)
                           for opt in (self.optimizer, self.pfc_optimizer)]
        self.step, self.epoch, self.last_loss = 0, 0, float("nan")
        self.log(f"world size {comm.size} ({comm.backend}), device {self.device}, {num_classes} classes, "
                 f"{num_image} images, global batch {self.global_batch_size}, {self.max_steps} steps\n"
                 f"head: {self.pfc.extra_repr()}")

        self.hooks = []
        from .eval.verification import VerificationHook
        self.register_hooks([LRSchedulerHook(self.schedulers), LoggerHook(config.frequent),
                             VerificationHook(config)])

    def _setup_logging(self):
        self.logger = logging.getLogger("partialfc")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if self.comm.rank == 0 and not self.logger.handlers:
            os.makedirs(self.output, exist_ok=True)
            fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
            for handler in (logging.StreamHandler(sys.stdout),
                            logging.FileHandler(os.path.join(self.output, "training.log"))):
                handler.setFormatter(fmt)
                self.logger.addHandler(handler)

    def register_hooks(self, hooks):
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def log(self, message):
        if self.comm.rank == 0:
            self.logger.info(message)

    def write_metrics(self, record):
        if self.comm.rank == 0:
            with open(os.path.join(self.output, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def batches(self):
        """Endless ``(images, labels)`` on the device, epoch after epoch."""
        while True:
            self.loader.set_epoch(self.epoch)
            for images, labels in self.loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.epoch += 1

    def train_step(self, images, labels):
        embeddings = self.model(images)          # [b, D]
        loss = self.pfc(embeddings, labels)      # mean over the global batch, the same on every rank
        loss.backward()                          # Horovod: backbone gradients are summed during backward
        if hasattr(self.optimizer, "synchronize"):
            self.optimizer.synchronize()         # Horovod: wait for the sums before clipping them
        if self.config.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.config.clip_grad_norm)
        if hasattr(self.optimizer, "skip_synchronize"):
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        else:
            self.optimizer.step()
        self.pfc_optimizer.step()                # only the sampled rows of this rank's class centers
        self.optimizer.zero_grad()
        self.pfc_optimizer.zero_grad()
        return loss.item()

    def train(self):
        self.backbone.train()
        for hook in self.hooks:
            hook.before_train()
        batches = self.batches()
        while self.step < self.max_steps:
            images, labels = next(batches)
            self.last_loss = self.train_step(images, labels)
            if not math.isfinite(self.last_loss):
                raise FloatingPointError(f"loss became {self.last_loss} at step {self.step}; lower lr or check data")
            self.step += 1
            for hook in self.hooks:
                hook.after_step()
        for hook in self.hooks:
            hook.after_train()
        self.save_final()

    def save_final(self):
        """``model.pt`` (backbone state_dict, loadable by arcface_torch's backbones) and each rank's shard."""
        shard = dict(weight=self.pfc.weight.detach().cpu(), class_start=self.pfc.class_start,
                     num_classes=self.pfc.num_classes, world_size=self.comm.size)
        _save_atomic(shard, os.path.join(self.output, f"softmax_fc_rank_{self.comm.rank}.pt"))
        if self.comm.rank == 0:
            _save_atomic(self.backbone.state_dict(), os.path.join(self.output, "model.pt"))
            with open(os.path.join(self.output, "config.json"), "w") as f:
                json.dump(self.config, f, indent=2, default=str)
            self.log(f"saved {os.path.join(self.output, 'model.pt')}")
        self.comm.barrier()


def _save_atomic(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Partial FC training", prog="python -m partialfc.train")
    parser.add_argument("config", help="a Python config file, e.g. configs/synthetic.py")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    trainer.train()
    trainer.comm.shutdown()


if __name__ == "__main__":
    main()
