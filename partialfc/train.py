"""Train a face-recognition backbone with a Partial FC head.

    python -m partialfc.train configs/synthetic.py [key=value ...]
    horovodrun -np 8 -H localhost:8 bash config.sh configs/ms1mv3_r50.py
    torchrun --nproc_per_node=8 -m partialfc.train configs/ms1mv3_r50.py

One process per device. The backbone is data parallel (Horovod DistributedOptimizer or DDP, gradients
summed); the class centers are model parallel: each rank owns a contiguous shard that only its SparseSGD
updates, never broadcast nor allreduced.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
import traceback

import torch

from . import checkpoint
from .backbones import build_backbone
from .comm import get_comm
from .config import ConfigError, load_config
from .head import PartialFC, SparseSGD, margin_from_config
from .hooks import HookBase

BAD_STEP_ADVICE = ("likely fixes: lower lr or raise warmup_epoch; keep clip_grad_norm on; use "
                   "amp_dtype='bfloat16' where the hardware has it; check the data for corrupt images or "
                   "labels; or train in float32 (fp16=False)")


def poly_lr_lambda(max_steps, warmup_steps, power=2.0):
    """arcface_torch's schedule: linear warmup, then ``(1 - progress) ** 2`` decay to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, max_steps - warmup_steps)) ** power
    return factor


def step_lr_lambda(lr_steps, gamma, warmup_steps, max_steps):
    """The MXNet partial_fc schedule: ``lr *= gamma`` at each of ``lr_steps`` (fractions < 1 of training
    allowed)."""
    bounds = sorted(int(s * max_steps) if isinstance(s, float) and s < 1 else int(s) for s in (lr_steps or ()))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** sum(step >= b for b in bounds)
    return factor


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
    """A resumable checkpoint every ``save_every`` steps and at the end (``save_all_states``)."""

    def __init__(self, every, at_end):
        self.every, self.at_end = every, at_end

    def after_step(self):
        t = self.trainer
        if self.every and t.step % self.every == 0 and t.step < t.max_steps:
            t.save_checkpoint()

    def after_train(self):
        if self.at_end:
            self.trainer.save_checkpoint()


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
        torch.manual_seed(config.seed)

        # Mixed precision: fp16 needs a loss scaler; bf16 has float32's range and needs none.
        self.amp_dtype = None
        if config.fp16 or config.amp_dtype:
            name = config.amp_dtype or "float16"
            if name not in ("float16", "bfloat16"):
                raise ConfigError(f"amp_dtype must be 'float16' or 'bfloat16', got {name!r}")
            self.amp_dtype = getattr(torch, name)
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None)

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
                             seed=config.seed, use_ext=config.use_ext).to(self.device)
        self.model, self.optimizer = self._backbone_optimizer()
        self.pfc_optimizer = SparseSGD(self.pfc, lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)

        # One optimizer step consumes gradient_acc micro-batches.
        steps_per_epoch = max(1, num_image // (self.global_batch_size * config.gradient_acc))
        self.max_steps = int(config.max_steps or steps_per_epoch * config.num_epoch)
        warmup_steps = int(steps_per_epoch * config.warmup_epoch)
        if config.lr_scheduler == "poly":
            factor = poly_lr_lambda(self.max_steps, warmup_steps)
        else:
            factor = step_lr_lambda(config.lr_steps, config.lr_gamma, warmup_steps, self.max_steps)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor)
                           for opt in (self.optimizer, self.pfc_optimizer)]
        self.step, self.epoch, self.batch_in_epoch, self.last_loss, self.bad_steps = 0, 0, 0, float("nan"), 0
        if config.resume:
            self.resume()
        self.log(f"world size {comm.size} ({comm.backend}), device {self.device}, {num_classes} classes, "
                 f"{num_image} images, global batch {self.global_batch_size} x {config.gradient_acc} "
                 f"micro-batches, {self.max_steps} steps, amp {self.amp_dtype}\nhead: {self.pfc.extra_repr()}")

        self.hooks = []
        from .eval.verification import VerificationHook
        self.register_hooks([LRSchedulerHook(self.schedulers), LoggerHook(config.frequent),
                             CheckpointHook(config.save_every, config.save_all_states),
                             VerificationHook(config)])

    def _backbone_optimizer(self):
        config, params = self.config, self.backbone.parameters()
        if config.optimizer == "sgd":
            cls, kwargs = torch.optim.SGD, dict(lr=config.lr, momentum=config.momentum,
                                                weight_decay=config.weight_decay)
        else:
            cls, kwargs = torch.optim.AdamW, dict(lr=config.lr, weight_decay=config.weight_decay)
        if config.zero_optimizer:
            if self.comm.backend != "torch":
                raise ConfigError(f"zero_optimizer=True is not supported with the {self.comm.backend!r} backend: "
                                  "it shards optimizer state through torch.distributed; launch with torchrun or "
                                  "set comm_backend='torch'")
            from torch.distributed.optim import ZeroRedundancyOptimizer
            optimizer = ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
        else:
            optimizer = cls(params, **kwargs)
        return self.comm.data_parallel(self.backbone, optimizer, config.gradient_acc)

    def _setup_logging(self):
        # Its own name, not the package root: turning off propagation here must not mute the library loggers.
        self.logger = logging.getLogger("partialfc.train")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        for handler in list(self.logger.handlers):  # a previous Trainer in this process had its own output
            self.logger.removeHandler(handler)
            handler.close()
        if self.comm.rank == 0:
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

    # ------------------------------------------------------------------------------------------------------
    # The step

    def batches(self):
        """Endless ``(images, labels)`` on the device, epoch after epoch, from the resumed position."""
        while True:
            self.loader.set_epoch(self.epoch)
            for i, (images, labels) in enumerate(self.loader):
                if i < self.batch_in_epoch:  # resuming inside an epoch: its order is a function of the epoch
                    continue
                self.batch_in_epoch = i + 1
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, micro_batches):
        """One optimizer step over ``gradient_acc`` micro-batches; returns the loss (of the whole batch)."""
        amp = dict(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                   enabled=self.amp_dtype is not None)
        acc = len(micro_batches)
        # The head samples once for all micro-batches, so their gradients add up to the big batch's.
        self.pfc.hold_sample([labels for _, labels in micro_batches] if acc > 1 else None)
        total = 0.0
        for i, (images, labels) in enumerate(micro_batches):
            sync = i == acc - 1
            with self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else contextlib.nullcontext():
                with torch.autocast(**amp):
                    embeddings = self.model(images)                 # [b, D]
                    loss = self.pfc(embeddings, labels) / acc       # global-batch mean, same on every rank
                # Horovod: backbone gradients are summed over ranks during the last backward.
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()

        if hasattr(self.optimizer, "synchronize"):
            self.optimizer.synchronize()  # Horovod: wait for the gradient sums before reading them
        scale = 1.0
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.unscale_(self.optimizer)
        # Non-finite gradients anywhere (fp16 overflow, a bad batch) skip the step on every rank together.
        max_norm = self.config.clip_grad_norm or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), max_norm)
        bad = not (math.isfinite(float(norm)) and math.isfinite(total) and self.pfc.center_grad_is_finite())
        bad = bool(self.comm.allreduce(torch.tensor([float(bad)]), "max").item())  # Horovod: agree on skipping
        if bad:
            self._skip_step(total)
        else:
            self.bad_steps = 0
            if hasattr(self.optimizer, "skip_synchronize"):
                with self.optimizer.skip_synchronize():
                    self.optimizer.step()
            else:
                self.optimizer.step()
            self.pfc_optimizer.step(grad_scale=scale)  # only the sampled rows of this rank's centers
            if self.scaler is not None:
                self.scaler.update()
        self.optimizer.zero_grad()
        self.pfc_optimizer.zero_grad()
        self.pfc.hold_sample(None)
        return total

    def _skip_step(self, loss):
        self.bad_steps += 1
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.log(f"step {self.step + 1}: non-finite loss or gradients (loss {loss}); step skipped"
                 + (f", fp16 scale lowered to {self.scaler.get_scale():.0f}" if self.scaler else "")
                 + f" ({self.bad_steps} in a row)")
        if self.bad_steps >= self.config.max_bad_steps:
            raise FloatingPointError(f"{self.bad_steps} consecutive steps with non-finite loss or gradients at "
                                     f"step {self.step + 1}; stopping. {BAD_STEP_ADVICE}")

    def train(self):
        self.backbone.train()
        for hook in self.hooks:
            hook.before_train()
        batches = self.batches()
        while self.step < self.max_steps:
            micro_batches = [next(batches) for _ in range(self.config.gradient_acc)]
            self.last_loss = self.train_step(micro_batches)
            self.step += 1
            for hook in self.hooks:
                hook.after_step()
        for hook in self.hooks:
            hook.after_train()
        self.save_final()

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _rank_state(self):
        self.pfc_optimizer.momentum_buffer()  # materialize it, so the state always holds one
        return dict(weight=self.pfc.weight.detach().cpu(), pfc_optimizer=self.pfc_optimizer.state_dict(),
                    class_start=self.pfc.class_start, num_local=self.pfc.num_local,
                    sampler=self.pfc.sampler.get_state(), torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def save_checkpoint(self):
        """Every rank writes its shard; rank 0 the rest, and after a barrier the manifest that seals it."""
        folder = checkpoint.step_dir(self.output, self.step)
        if self.comm.rank == 0:
            os.makedirs(folder, exist_ok=True)
        self.comm.barrier()
        checkpoint.save_atomic(self._rank_state(), os.path.join(folder, f"rank_{self.comm.rank}.pt"))
        if hasattr(self.optimizer, "consolidate_state_dict"):  # ZeRO: gather the shards of optimizer state
            self.optimizer.consolidate_state_dict(to=0)
        if self.comm.rank == 0:
            state = dict(backbone=self.backbone.state_dict(), optimizer=self.optimizer.state_dict(),
                         schedulers=[s.state_dict() for s in self.schedulers],
                         scaler=self.scaler.state_dict() if self.scaler else None,
                         step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                         world_size=self.comm.size, config=json.dumps(self.config, default=str))
            checkpoint.save_atomic(state, os.path.join(folder, "trainer.pt"))
        self.comm.barrier()
        if self.comm.rank == 0:
            checkpoint.write_manifest(folder, self.comm.size, self.step)
            self.log(f"checkpoint {folder}")
        self.comm.barrier()

    def resume(self):
        folder = checkpoint.latest_complete(self.output)
        if folder is None:
            self.log(f"resume=True but no complete checkpoint under {self.output}/checkpoints; starting fresh")
            return
        trainer = checkpoint.load(os.path.join(folder, "trainer.pt"))
        if trainer["world_size"] != self.comm.size:
            raise RuntimeError(f"checkpoint {folder} was written by {trainer['world_size']} ranks; this run has "
                               f"{self.comm.size}: class-center shards would not line up")
        mine = checkpoint.load(os.path.join(folder, f"rank_{self.comm.rank}.pt"))
        self.backbone.load_state_dict(trainer["backbone"])
        self.optimizer.load_state_dict(trainer["optimizer"])
        for scheduler, state in zip(self.schedulers, trainer["schedulers"]):
            scheduler.load_state_dict(state)
        if self.scaler is not None and trainer["scaler"]:
            self.scaler.load_state_dict(trainer["scaler"])
        with torch.no_grad():
            self.pfc.weight.copy_(mine["weight"])
        self.pfc_optimizer.load_state_dict(mine["pfc_optimizer"])  # momentum and the scheduled lr
        self.pfc.sampler.set_state(mine["sampler"])
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.step, self.epoch, self.batch_in_epoch = trainer["step"], trainer["epoch"], trainer["batch_in_epoch"]
        self.log(f"resumed from {folder} at step {self.step}")

    def save_final(self):
        """``model.pt`` (the backbone state_dict, arcface_torch layout) and each rank's class-center shard."""
        shard = dict(weight=self.pfc.weight.detach().cpu(), class_start=self.pfc.class_start,
                     num_classes=self.pfc.num_classes, world_size=self.comm.size)
        checkpoint.save_atomic(shard, os.path.join(self.output, f"softmax_fc_rank_{self.comm.rank}.pt"))
        if self.comm.rank == 0:
            checkpoint.save_atomic(self.backbone.state_dict(), os.path.join(self.output, "model.pt"))
            checkpoint.write_json_atomic(self.config, os.path.join(self.output, "config.json"))
            self.log(f"saved {os.path.join(self.output, 'model.pt')}")
        self.comm.barrier()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Partial FC training", prog="python -m partialfc.train")
    parser.add_argument("config", help="a Python config file, e.g. configs/synthetic.py")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}")
    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    except Exception:
        # Only rank 0 logs; any other rank that fails says so, with its rank, before the launcher stops all.
        rank = trainer.comm.rank if trainer is not None else os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "?"))
        sys.stderr.write(f"[rank {rank}] training failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise SystemExit(1)
    trainer.comm.shutdown()


if __name__ == "__main__":
    main()
