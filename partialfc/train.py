"""Train a face-recognition backbone with a Partial FC head.

    python -m partialfc.train configs/synthetic.py [key=value ...]
    horovodrun -np 8 -H localhost:8 bash config.sh configs/ms1mv3_r50.py
    torchrun --nproc_per_node=8 -m partialfc.train configs/ms1mv3_r50.py

One process per device. The backbone is data parallel (Horovod DistributedOptimizer or DDP, gradients
summed); the class centers are model parallel: each rank owns a contiguous shard that only its SparseSGD
(or SparseAdamW, with ``optimizer="adamw"``) updates, never broadcast nor allreduced.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback

import torch

from .backbones import build_backbone
from .comm import get_comm, launcher_rank
from .config import ConfigError, load_config
from .engine import Checkpointer, default_hooks
from .engine.elastic import elastic_config, horovod_elastic, run_horovod_elastic
from .engine.init_weights import load_backbone_weights, load_center_shard
from .engine.run_folder import RunFolderError, claim_output
from .head import PartialFC, center_optimizer, margin_from_config
from .head.distill import DistillLoss, ProjectedStudent

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


def lr_schedulers(config, optimizers, max_steps, steps_per_epoch):
    """One ``LambdaLR`` per optimizer, all with the schedule ``config.lr_scheduler`` names."""
    warmup_steps = int(steps_per_epoch * config.warmup_epoch)
    if config.lr_scheduler == "poly":
        factor = poly_lr_lambda(max_steps, warmup_steps)
    else:
        factor = step_lr_lambda(config.lr_steps, config.lr_gamma, warmup_steps, max_steps)
    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


def backbone_optimizer(config, backbone, comm):
    """SGD or AdamW over the backbone's parameters (with a distillation projection, the module holding both),
    at ``lr * backbone_lr_mult``, its state sharded over ranks with ``zero_optimizer``."""
    lr = config.lr * config.get("backbone_lr_mult", 1.0)
    if config.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        cls, kwargs = torch.optim.AdamW, dict(lr=lr, weight_decay=config.weight_decay)
    if config.zero_optimizer:
        return comm.zero_redundancy_optimizer(backbone.parameters(), cls, **kwargs)
    return cls(backbone.parameters(), **kwargs)


def amp_dtype_of(config):
    """The autocast dtype, or None for float32. fp16 needs a loss scaler; bf16 has float32's range."""
    if not (config.fp16 or config.amp_dtype):
        return None
    name = config.amp_dtype or "float16"
    if name not in ("float16", "bfloat16"):
        raise ConfigError(f"amp_dtype must be 'float16' or 'bfloat16', got {name!r}")
    return getattr(torch, name)


def training_device(config):
    """``(communicator, device)``: one process per device, the local rank's GPU when CUDA is used."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    comm = get_comm(config.comm_backend, "cuda" if use_cuda else "cpu", timeout=config.collective_timeout)
    device = torch.device("cuda", comm.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return comm, device


def training_logger(output, rank):
    """The ``partialfc.train`` logger: on rank 0 to stdout and ``output/training.log``, elsewhere silent."""
    # Its own name, not the package root: turning off propagation here must not mute the library loggers.
    logger = logging.getLogger("partialfc.train")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # a previous Trainer in this process had its own output
        logger.removeHandler(handler)
        handler.close()
    # The data layer's warnings (skipped images, ...) belong in training.log too.
    data_logger = logging.getLogger("partialfc.data")
    for handler in list(data_logger.handlers):
        if getattr(handler, "partialfc_training_log", False):
            data_logger.removeHandler(handler)
            handler.close()
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(output, "training.log"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        data_fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(os.path.join(output, "training.log"))):
            handler.setFormatter(data_fmt)
            handler.setLevel(logging.WARNING)
            handler.partialfc_training_log = True
            data_logger.addHandler(handler)
    return logger


def tensorboard_writer(config, rank):
    if rank != 0 or not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(config.output, "tensorboard"))


def train_loader(config, comm):
    """This rank's loader; rank 0 first generates the synthetic set when that is the data, the others wait."""
    from .data import build_train_loader
    if config.rec == "synthetic":
        if comm.rank == 0:
            from .data.synthetic import ensure_synthetic
            ensure_synthetic(config)
        comm.barrier()
    return build_train_loader(config, comm)


def build_teacher(config, device, log):
    """The distillation teacher of ``config`` (eval mode, no gradients, on ``device``), or None when
    ``distill_weight`` is 0. Cross-key mistakes are a :class:`ConfigError` naming the keys."""
    from .backbones import available_backbones, get_model
    weight, network = config.get("distill_weight", 0.0), config.get("teacher_network")
    if not weight:
        if network:
            log(f"teacher_network={network!r} is set but distill_weight=0: no distillation")
        return None
    if not network or not config.get("teacher_weights"):
        raise ConfigError(f"distill_weight={weight} needs teacher_network and teacher_weights (got "
                          f"teacher_network={network!r}, teacher_weights={config.get('teacher_weights')!r})")
    if network not in available_backbones():
        raise ConfigError(f"config key 'teacher_network' = {network!r}: expected a registered backbone "
                          f"({', '.join(available_backbones())})")
    if weight == 1.0 and config.get("freeze_backbone_steps", 0):
        raise ConfigError(f"freeze_backbone_steps={config.freeze_backbone_steps} with distill_weight=1 trains "
                          f"nothing in those steps (the head is off at weight 1); set one of them to 0")
    size = config.get("teacher_embedding_size") or config.embedding_size
    teacher = get_model(network, num_features=size, dropout=0.0, fp16=config.fp16)
    path = load_backbone_weights(teacher, config.teacher_weights, network, size, what="teacher_weights")
    return teacher.to(device).eval(), path


class Trainer:
    """Builds the run from a config, then trains: ``train_step`` is one optimizer step, ``train`` the loop.
    Hooks (``partialfc.engine.hooks``) log, schedule, checkpoint and evaluate between steps."""

    # Fine-tuning and distillation; these defaults are today's plain training.
    distill = None               # DistillLoss when distill_weight > 0
    distill_weight = 0.0
    projection = None            # student -> teacher embedding size, when they differ
    freeze_backbone_steps = 0

    def __init__(self, config):
        self.config = config
        self.comm, self.device = comm, device = training_device(config)
        self.output = config.output
        self.logger = training_logger(self.output, comm.rank)
        if config.get("elastic"):
            # Every start of an elastic worker continues the folder's run, at the run's global batch.
            config = self.config = elastic_config(config, comm, device, self.log)
        # The output folder is this run's alone: rank 0 locks it, and a fresh run refuses another run's results.
        self.run = claim_output(self.output, comm, config.resume, config.overwrite, device)
        try:
            self._build(config)
        except BaseException:
            self.close()
            raise

    def _build(self, config):
        comm, device = self.comm, self.device
        for note in self.run.notes if self.run else ():
            self.log(note)
        self.tb = tensorboard_writer(config, comm.rank)
        torch.manual_seed(config.seed)
        self.amp_dtype = amp_dtype_of(config)
        if self.amp_dtype == torch.float16 and device.type == "cpu":
            self.log("warning: float16 autocast on CPU (fp16=True) runs far slower than float32 there; use "
                     "amp_dtype='bfloat16' or fp16=False on CPU")
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None

        self.loader = train_loader(config, comm)
        num_classes = config.num_classes or self.loader.num_classes
        num_image = config.num_image or self.loader.num_images
        self.global_batch_size = config.batch_size * comm.size

        # Model: a data-parallel backbone and this rank's shard of the class centers.
        self.backbone = build_backbone(config).to(device)
        self.pfc = PartialFC(config.embedding_size, num_classes, config.sample_rate, margin_from_config(config),
                             comm=comm, interclass_filtering_threshold=config.interclass_filtering_threshold,
                             seed=config.seed, use_ext=config.use_ext,
                             num_subcenters=config.num_subcenters, center_dtype=config.center_dtype,
                             center_device=config.center_device).to(device)
        self._init_weights(config, num_classes)
        self._build_distillation(config)
        # The module the data-parallel wrapper and the backbone optimizer see: the backbone, with the
        # distillation projection when there is one (its gradients are summed over ranks like the backbone's).
        self.student = ProjectedStudent(self.backbone, self.projection) if self.projection is not None \
            else self.backbone
        comm.broadcast_module(self.student)  # every rank starts from rank 0's backbone
        self.model, self.optimizer = comm.data_parallel(
            self.student, backbone_optimizer(config, self.student, comm), config.gradient_acc)
        # The centers take the backbone's optimizer kind, lr and weight decay, as in arcface_torch.
        self.pfc_optimizer = center_optimizer(self.pfc, config.optimizer, config.lr, config.momentum,
                                              config.weight_decay)

        # One optimizer step consumes gradient_acc micro-batches.
        steps_per_epoch = max(1, num_image // (self.global_batch_size * config.gradient_acc))
        self.max_steps = int(config.max_steps or steps_per_epoch * config.num_epoch)
        self.schedulers = lr_schedulers(config, (self.optimizer, self.pfc_optimizer), self.max_steps,
                                        steps_per_epoch)
        self.step, self.epoch, self.batch_in_epoch, self.last_loss, self.bad_steps = 0, 0, 0, float("nan"), 0

        # The distillation projection trains with the backbone and is checkpointed with it, but model.pt stays
        # the plain backbone.
        extra_modules = {"projection": self.projection} if self.projection is not None else {}
        self.checkpointer = Checkpointer(
            self.output, comm, config, backbone=self.backbone, optimizer=self.optimizer,
            schedulers=self.schedulers, scaler=self.scaler, pfc=self.pfc, pfc_optimizer=self.pfc_optimizer,
            device=device, log=self.log, run=self.run, extra_modules=extra_modules)
        progress = self.checkpointer.resume() if config.resume else None
        initialized = [k for k in ("init_backbone", "init_centers") if config.get(k)]
        if progress is not None:
            # The epoch continues at the checkpoint's sample count (the checkpointer keeps it, see batches).
            self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], 0
            if initialized:
                self.log(f"resume wins over {' and '.join(initialized)}: the weights are the checkpoint's")
        else:
            if initialized:
                self.log(f"training starts from {' and '.join(initialized)}"
                         + (" (resume=True found no checkpoint)" if config.resume else ""))
            if self.run is not None:
                self.run.start_fresh()
        if self.run is not None:
            self.log(f"run {self.run.run_id} in {self.output}")
        self.log(f"world size {comm.size} ({comm.backend}), device {device}, {num_classes} classes, "
                 f"{num_image} images, global batch {self.global_batch_size} x {config.gradient_acc} "
                 f"micro-batches, {self.max_steps} steps, amp {self.amp_dtype}\nhead: {self.pfc.extra_repr()}")
        self.hooks = []
        self.register_hooks(default_hooks(config, self.schedulers, self.checkpointer))

    def _init_weights(self, config, num_classes):
        """``init_backbone`` and ``init_centers``: weights to start from (checked against this run's network,
        embedding size and class count); the schedule, the step and the optimizer state start fresh."""
        if config.get("init_backbone"):
            path = load_backbone_weights(self.backbone, config.init_backbone, config.network, config.embedding_size)
            self.log(f"init_backbone: {config.network} weights from {path}")
        if config.get("init_centers"):
            shard = load_center_shard(config.init_centers, num_classes, config.embedding_size, self.comm.rank,
                                      self.comm.size, num_subcenters=config.num_subcenters, seed=config.seed)
            with torch.no_grad():
                self.pfc.weight.copy_(shard)
            self.log(f"init_centers: {num_classes} class centers from {config.init_centers}, split over "
                     f"{self.comm.size} rank(s)")
        self.freeze_backbone_steps = int(config.get("freeze_backbone_steps") or 0)
        if self.freeze_backbone_steps:
            self.log(f"freeze_backbone_steps: the first {self.freeze_backbone_steps} steps train only the head")

    def _build_distillation(self, config):
        """The teacher, the distillation loss and, when the embedding sizes differ, the projection."""
        built = build_teacher(config, self.device, self.log)
        if built is None:
            return
        teacher, path = built
        self.distill_weight = float(config.distill_weight)
        self.distill = DistillLoss(teacher, config.distill_loss, self.comm.size)
        size = config.get("teacher_embedding_size") or config.embedding_size
        if size != config.embedding_size:
            self.projection = torch.nn.Linear(config.embedding_size, size, bias=False).to(self.device)
        params = sum(p.numel() for p in teacher.parameters())
        mem = sum(t.numel() * t.element_size() for t in (*teacher.parameters(), *teacher.buffers())) / 2**20
        self.log(f"teacher {config.teacher_network} from {path}: {params / 1e6:.2f}M parameters ({mem:.0f} MB), "
                 f"embedding size {size}; distill_loss {config.distill_loss!r}, loss = {1 - self.distill_weight:g} "
                 f"* margin + {self.distill_weight:g} * distill"
                 + (f"; projection {config.embedding_size} -> {size}" if self.projection is not None else "")
                 + ("; the head is off (distill_weight=1)" if self.distill_weight == 1.0 else "")
                 + (f"; {torch.cuda.memory_allocated(self.device) / 2**20:.0f} MB allocated with the teacher"
                    if self.device.type == "cuda" else ""))

    def close(self):
        """End of training, normal or not: the hooks' ``close`` (the watchdog stops), and the output folder is
        released (the end of the process releases it too)."""
        for hook in getattr(self, "hooks", ()):
            hook.close()
        if getattr(self, "run", None) is not None:
            self.run.release()

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
        """Endless ``(images, labels)`` on the device, epoch after epoch, from the resumed position: an epoch
        resumed inside starts at its checkpoint's sample count, and the images before it are not read."""
        while True:
            self.loader.set_epoch(self.epoch, self.checkpointer.sample_in_epoch(self.epoch, self.batch_in_epoch))
            for images, labels in self.loader:
                self.batch_in_epoch += 1  # global batches of this run in the epoch
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, micro_batches):
        """One optimizer step over ``gradient_acc`` micro-batches; returns the loss (of the whole batch).

        With distillation the loss is ``(1 - w) * margin + w * distill`` (``w = distill_weight``); at ``w = 1``
        the head is neither run nor updated. During the first ``freeze_backbone_steps`` steps the backbone
        runs in eval mode without gradients: only the head learns, and the backbone's weights and BatchNorm
        statistics stay as they were."""
        comm, scaler = self.comm, self.scaler
        amp = dict(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                   enabled=self.amp_dtype is not None)
        acc = len(micro_batches)
        frozen = self.step < self.freeze_backbone_steps
        weight = self.distill_weight if self.distill is not None else 0.0
        run_head = weight < 1.0
        # BatchNorm statistics move in the forward: a skipped step puts them back (see _skip_step).
        buffers_before = [b.detach().clone() for b in self.backbone.buffers()]

        # Forward and backward, micro-batch by micro-batch. The head samples once for all of them, so their
        # gradients add up to the big batch's; the backbone gradients are summed over ranks in the last
        # backward only, the earlier ones just accumulate.
        if run_head:
            # Host-resident centers sample here too, so that the host gathers the rows during the backbone's forward.
            self.pfc.hold_sample([labels for _, labels in micro_batches]
                                 if acc > 1 or self.pfc.host_centers is not None else None)
        margin_total, distill_local = 0.0, 0.0
        if frozen:
            self.model.eval()
        try:
            for i, (images, labels) in enumerate(micro_batches):
                with comm.no_sync(self.model) if i < acc - 1 and not frozen else contextlib.nullcontext():
                    with torch.autocast(**amp):
                        with torch.no_grad() if frozen else contextlib.nullcontext():
                            out = self.model(images)                        # [b, D] (and [b, D_teacher])
                        embeddings, projected = out if self.projection is not None else (out, out)
                        loss = 0.0
                        if run_head:
                            margin = self.pfc(embeddings, labels) / acc     # global-batch mean, same on every rank
                            margin_total += margin.item()
                            loss = margin * (1.0 - weight) if weight else margin
                        if weight:
                            # This rank's share of the global-batch mean; the summed gradients make it whole.
                            with torch.no_grad() if frozen else contextlib.nullcontext():
                                distill = self.distill.local_loss(images, projected) / acc
                            distill_local += distill.item()
                            loss = loss + weight * distill
                    if torch.is_tensor(loss) and loss.requires_grad:
                        (scaler.scale(loss) if scaler else loss).backward()
        finally:
            if frozen:
                self.model.train()
        total = (1.0 - weight) * margin_total if run_head else 0.0
        if weight:
            distill_all = comm.allreduce(torch.tensor([distill_local], dtype=torch.float64, device=self.device))
            total += weight * float(distill_all.item())
        if not frozen:
            comm.wait_for_gradients(self.optimizer)  # the summed gradients are read from here on

        # Unscale and clip; non-finite gradients anywhere (fp16 overflow, a bad batch) skip the step on every
        # rank together.
        scale = 1.0
        if scaler is not None:
            scale = scaler.get_scale()
            if not frozen:
                scaler.unscale_(self.optimizer)
        norm = 0.0
        if not frozen:
            max_norm = self.config.clip_grad_norm or math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.student_parameters(), max_norm)
        bad = not (math.isfinite(float(norm)) and math.isfinite(total)
                   and (not run_head or self.pfc.center_grad.is_finite()))
        # One rank's bad step is everyone's. The flag lives on the training device: that is the device every
        # backend's process group serves (a CUDA-only NCCL group refuses CPU tensors).
        bad = bool(comm.allreduce(torch.tensor([float(bad)], device=self.device), "max").item())

        # Step (or skip), then zero.
        if bad:
            self._skip_step(total, buffers_before)
        else:
            self.bad_steps = 0
            if not frozen:
                comm.step_after_wait(self.optimizer)
            if run_head:
                self.pfc_optimizer.step(grad_scale=scale)  # only the sampled rows of this rank's centers
            if scaler is not None and not frozen:  # a frozen step unscaled nothing: the scale stays
                scaler.update()
        self.optimizer.zero_grad()
        if run_head:
            self.pfc_optimizer.zero_grad()
            self.pfc.hold_sample(None)
        return total

    def student_parameters(self):
        """The parameters the backbone optimizer trains: the backbone's, and the projection's when there is one."""
        student = getattr(self, "student", None) or self.backbone
        return student.parameters()

    def _skip_step(self, loss, buffers_before):
        """Leave the step as if it never ran: no optimizer steps, the backbone's buffers restored."""
        self.bad_steps += 1
        with torch.no_grad():
            for buf, before in zip(self.backbone.buffers(), buffers_before):
                buf.copy_(before)
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.log(f"step {self.step + 1}: non-finite loss or gradients (loss {loss}); step skipped"
                 + (f", fp16 scale lowered to {self.scaler.get_scale():.0f}" if self.scaler else "")
                 + f" ({self.bad_steps} in a row)")
        if self.bad_steps >= self.config.max_bad_steps:
            raise FloatingPointError(f"{self.bad_steps} consecutive steps with non-finite loss or gradients at "
                                     f"step {self.step + 1}; stopping. {BAD_STEP_ADVICE}")

    def train(self):
        try:
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
            self.checkpointer.save_final()
        finally:
            self.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Partial FC training", prog="python -m partialfc.train")
    parser.add_argument("config", help="a Python config file, e.g. configs/synthetic.py")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"[rank {launcher_rank()}] error: {exc}")
    trainer = None
    try:
        if config.elastic and horovod_elastic():
            # Horovod elastic keeps the processes: a new Trainer for each world, from the newest checkpoint.
            trainer = run_horovod_elastic(config, Trainer)
        else:
            trainer = Trainer(config)
            trainer.train()
    except RunFolderError as exc:  # a refused output folder: the message says what to do, no traceback needed
        sys.stderr.write(f"[rank {launcher_rank()}] error: {exc}\n")
        raise SystemExit(2)
    except Exception:
        # Only rank 0 logs; any other rank that fails says so, with its rank, before the launcher stops all.
        rank = trainer.comm.rank if trainer is not None else launcher_rank()
        sys.stderr.write(f"[rank {rank}] training failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise SystemExit(1)
    trainer.comm.shutdown()


if __name__ == "__main__":
    main()
