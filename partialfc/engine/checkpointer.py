"""Resumable checkpoints that a crash during a save cannot tear, and the final model files.

Layout under ``OUTPUT/checkpoints/step_<N>/``:

- ``rank_<r>.pt`` on every rank: its class-center shard, the center optimizer's state (SparseSGD's momentum
  or SparseAdamW's moments and per-row steps), the head's sampler state
  and the rank's RNG states;
- ``trainer.pt`` on rank 0: backbone, backbone optimizer, LR schedulers, grad scaler, step, epoch, the data
  position (``sample_in_epoch``: images of the epoch consumed, over all ranks), world size and the config;
- ``MANIFEST.json``, written by rank 0 last, after every rank has finished its files: it lists them with
  their sizes. A step folder without a manifest, or whose files do not match it, is ignored. Sealing a
  folder drops the complete checkpoints older than the last two.

At the end of training, ``OUTPUT/model.pt`` (the backbone state_dict, arcface_torch's layout),
``OUTPUT/config.json`` and one ``OUTPUT/softmax_fc_rank_<r>.pt`` class-center shard per rank.

Every file is written to a temporary name and renamed, so a reader sees either the old file or the whole
new one. ``torch.load(weights_only=True)`` reads everything back. A checkpoint of W ranks resumes on any
number of ranks: the centers and their optimizer state are re-split (``partialfc.engine.reshard``).
"""
import hashlib
import json
import os
import re
import shutil

import torch

from ..fileio import write_atomic
from ..head.partial_fc import partition_classes
from ..head.precision import dtype_name, exp_avg_sq_dtype
from . import reshard
from .run_folder import read_run

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj, path):
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def load(path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


def step_dir(output, step):
    return os.path.join(output, "checkpoints", f"step_{step}")


def file_digest(path):
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_files(folder):
    """``{name: {"size": n, "sha256": hex or None}}`` from a folder's manifest, or None without a valid one.
    (Manifests of earlier versions list sizes only.)"""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
        return {name: entry if isinstance(entry, dict) else {"size": int(entry), "sha256": None}
                for name, entry in files.items()}
    except (ValueError, KeyError, OSError, TypeError, AttributeError):
        return None


def _is_complete(folder):
    files = _manifest_files(folder)
    return files is not None and all(
        os.path.isfile(os.path.join(folder, name)) and os.path.getsize(os.path.join(folder, name)) == entry["size"]
        for name, entry in files.items())


def verify_file(folder, name):
    """None when ``name`` in ``folder`` has its manifest's size and checksum, else what is wrong (a sentence
    naming the file)."""
    path = os.path.join(folder, name)
    entry = (_manifest_files(folder) or {}).get(name)
    if entry is None:
        return f"{path} is not listed in {os.path.join(folder, MANIFEST)}"
    if not os.path.isfile(path) or os.path.getsize(path) != entry["size"]:
        return f"{path} is missing or not {entry['size']} bytes as its manifest says"
    if entry["sha256"] is not None and file_digest(path) != entry["sha256"]:
        return f"{path} does not match the sha256 checksum in its manifest (the file is damaged)"
    return None


def latest_complete(output):
    """The newest sealed checkpoint folder under ``output`` whose files all match their manifest's sizes and
    checksums, or None. (Resume goes further: ``Checkpointer._newest_verified`` also loads the files.)"""
    root = os.path.join(output, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted((int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m), reverse=True)
    for step in steps:
        folder = step_dir(output, step)
        if _is_complete(folder) and not any(verify_file(folder, name) for name in _manifest_files(folder)):
            return folder
    return None


def write_manifest(folder, world_size, step, keep=2, digests=None, run_id=None):
    """Rank 0, after a barrier: seal ``folder`` as a checkpoint of run ``run_id``, then drop this run's
    complete checkpoints older than its last ``keep``. Another run's checkpoints are never touched; an unsealed
    folder older than ``step`` (a save cut short) is not a checkpoint and goes too. ``digests`` maps file names
    to their sha256 (each rank hashes its own file); files not in it are hashed here."""
    names = [f"rank_{r}.pt" for r in range(world_size)] + ["trainer.pt"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise RuntimeError(f"checkpoint {folder} is missing {missing}; not sealing it")
    digests = digests or {}
    files = {n: {"size": os.path.getsize(os.path.join(folder, n)),
                 "sha256": digests.get(n) or file_digest(os.path.join(folder, n))} for n in names}
    write_json_atomic({"step": step, "world_size": world_size, "run_id": run_id, "files": files},
                      os.path.join(folder, MANIFEST))
    root = os.path.dirname(folder)
    output = os.path.dirname(root)
    own, torn = [], []
    for old in sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m):
        manifest = _read_manifest(step_dir(output, old))
        if manifest is None:
            torn.append(old)
        elif manifest.get("run_id") == run_id:
            own.append(old)
    for old in (own[:-keep] if keep else []) + torn:
        if old < step:
            shutil.rmtree(step_dir(output, old), ignore_errors=True)


def _read_manifest(folder):
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        return manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None


class Checkpointer:
    """Saves and restores everything a run needs to continue bit for bit, and writes the final files.

    It holds the objects whose state it saves; the trainer passes in its progress (step, epoch, batch in
    epoch) on save and takes it back from ``resume``. Every rank calls every method.
    """

    def __init__(self, output, comm, config, *, backbone, optimizer, schedulers, scaler, pfc, pfc_optimizer,
                 device, log, run=None, extra_modules=None):
        self.output, self.comm, self.config, self.device, self.log = output, comm, config, device, log
        self.run = run  # rank 0's claim on the output folder (partialfc.engine.run_folder); None elsewhere
        # Modules replicated like the backbone (the same on every rank) that trainer.pt holds next to it, e.g.
        # the distillation projection: {name: module}.
        self.extra_modules = dict(extra_modules or {})
        self.backbone, self.optimizer, self.schedulers, self.scaler = backbone, optimizer, schedulers, scaler
        self.pfc, self.pfc_optimizer = pfc, pfc_optimizer
        self.resumed_at = None  # (epoch, sample_in_epoch) of the checkpoint this run resumed from
        self.saved_step = None  # the step of the last checkpoint this run sealed

    @property
    def run_id(self):
        return self.run.run_id if self.run is not None else None

    def _rank_state(self):
        self.pfc_optimizer.materialize_state()  # so the saved state always holds its buffers
        return dict(weight=self.pfc.weight.detach().cpu(), pfc_optimizer=self.pfc_optimizer.state_dict(),
                    class_start=self.pfc.class_start, num_local=self.pfc.num_local,
                    num_subcenters=self.pfc.num_subcenters,  # rows per identity: weight is [num_local * K, D]
                    center_dtype=dtype_name(self.pfc.weight.dtype),  # the table's storage (weight's dtype)
                    sampler=self.pfc.sampler.get_state(), torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def _agree(self, error, folder, what):
        """Every rank learns whether any rank's write failed: the failing rank re-raises its own error, the
        others a RuntimeError naming the ranks, so no rank waits for a file that will never come."""
        flags = self.comm.allgather(torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self.device))
        if error is not None:
            raise error
        failed = torch.nonzero(flags.cpu()).flatten().tolist()
        if failed:
            raise RuntimeError(f"checkpoint {folder} not sealed: rank(s) {failed} could not write {what} "
                               f"(see their log)")

    def save(self, step, epoch, batch_in_epoch, sample_in_epoch=None):
        """Every rank writes its shard; rank 0 the rest, and after a barrier the manifest that seals it.

        ``sample_in_epoch`` is the data position (images of the epoch consumed, over all ranks); by default
        ``batch_in_epoch`` global batches after where this run resumed in that epoch."""
        comm = self.comm
        if sample_in_epoch is None:
            sample_in_epoch = self.sample_in_epoch(epoch, batch_in_epoch)
        folder = step_dir(self.output, step)
        error = None
        if comm.rank == 0:
            try:
                os.makedirs(folder, exist_ok=True)
                # The same step saved again (after a fallback): an old manifest must not seal a mix of files.
                if os.path.exists(os.path.join(folder, MANIFEST)):
                    os.remove(os.path.join(folder, MANIFEST))
            except OSError as exc:
                error = exc
        self._agree(error, folder, "the checkpoint folder")
        rank_state = self._rank_state()
        rank_file = os.path.join(folder, f"rank_{comm.rank}.pt")
        error = None
        try:
            save_atomic(rank_state, rank_file)
            hexdigest = file_digest(rank_file)
        except OSError as exc:
            error = exc
        self._agree(error, folder, "their file")
        # Each rank hashes its own shard; rank 0 gathers the digests into the manifest.
        digest = torch.frombuffer(bytearray(bytes.fromhex(hexdigest)), dtype=torch.uint8)
        digests = comm.allgather(digest).view(comm.size, -1)
        finite = _all_finite([rank_state["weight"], *_tensors(rank_state["pfc_optimizer"])])
        comm.consolidate_optimizer_state(self.optimizer, root=0)
        error = None
        if comm.rank == 0:
            backbone = self.backbone.state_dict()
            finite = finite and _all_finite(backbone.values())
            global_batch = comm.size * int(self.config.batch_size)
            state = dict(backbone=backbone, optimizer=self.optimizer.state_dict(),
                         schedulers=[s.state_dict() for s in self.schedulers],
                         scaler=self.scaler.state_dict() if self.scaler else None,
                         step=step, epoch=epoch, batch_in_epoch=sample_in_epoch // global_batch,
                         sample_in_epoch=sample_in_epoch, global_batch=global_batch, world_size=comm.size,
                         num_classes=self.pfc.num_classes, num_subcenters=self.pfc.num_subcenters,
                         center_dtype=dtype_name(self.pfc.weight.dtype),
                         run_id=self.run_id, head={k: v.cpu() for k, v in self.pfc.head_state().items()},  # same on every rank
                         extra_modules={name: m.state_dict() for name, m in self.extra_modules.items()},
                         config=json.dumps(self.config, default=str))
            try:
                save_atomic(state, os.path.join(folder, "trainer.pt"))
            except OSError as exc:
                error = exc
        self._agree(error, folder, "trainer.pt")
        # A checkpoint whose tensors are not finite is never sealed: resume would carry them on.
        finite = not bool(comm.allreduce(torch.tensor([0.0 if finite else 1.0], device=self.device), "max").item())
        error = None
        if comm.rank == 0:
            if finite:
                try:
                    write_manifest(folder, comm.size, step, run_id=self.run_id,
                                   digests={f"rank_{r}.pt": bytes(digests[r].tolist()).hex()
                                            for r in range(comm.size)})
                    self.log(f"checkpoint {folder}")
                except OSError as exc:
                    error = exc
            else:
                self.log(f"checkpoint {folder} not sealed: the model or the class centers hold non-finite values")
        self._agree(error, folder, "the manifest")
        if finite:
            self.saved_step = step

    def _restore_head_state(self, folder, saved):
        """The adaptive margins' running statistics; those of another margin do not apply and are dropped."""
        wanted = set(self.pfc.head_state())
        if set(saved) == wanted:
            if saved:
                self.pfc.load_head_state(saved)
        elif wanted:
            self.log(f"{folder} holds no running statistics for this run's margin ({', '.join(sorted(wanted))}); "
                     f"they start from their initial values")
        else:
            self.log(f"{folder} holds running statistics of another margin ({', '.join(sorted(saved))}); "
                     f"this run's margin has none, so they are dropped")

    def sample_in_epoch(self, epoch, batch_in_epoch):
        """Images of ``epoch`` consumed after ``batch_in_epoch`` batches of this run: a run resumed inside
        that epoch started at its checkpoint's position."""
        start = self.resumed_at[1] if self.resumed_at and self.resumed_at[0] == epoch else 0
        return start + int(batch_in_epoch) * self.comm.size * int(self.config.batch_size)

    def resume(self):
        """Restore the newest complete checkpoint, written by any number of ranks; returns its
        ``dict(step, epoch, batch_in_epoch, sample_in_epoch)``, or None when there is none. ``sample_in_epoch``
        is the data position (images of the epoch consumed, over all ranks); ``batch_in_epoch`` the global
        batches of this run's size that it makes."""
        folder, trainer, mine = self._newest_verified()
        if folder is None:
            self.log(f"resume=True but no complete checkpoint under {self.output}/checkpoints; starting fresh")
            return None
        self._check_compatible(folder, trainer, mine)
        saved_modules = trainer.get("extra_modules") or {}
        if set(saved_modules) != set(self.extra_modules):
            raise RuntimeError(f"cannot resume from {folder}: it holds the modules {sorted(saved_modules)} beside "
                               f"the backbone and this run has {sorted(self.extra_modules)} (a distillation "
                               f"projection comes with teacher_embedding_size != embedding_size)")
        self._log_dtype_change(folder, mine)
        self.backbone.load_state_dict(trainer["backbone"])
        for name, module in self.extra_modules.items():
            module.load_state_dict(saved_modules[name])
        if trainer.get("optimizer") is not None:
            self.optimizer.load_state_dict(trainer["optimizer"])
        else:
            self.log(f"{folder} holds no backbone optimizer state (an imported run): it starts afresh")
        if mine.get("pfc_optimizer") is not None:
            self.pfc_optimizer.load_state_dict(mine["pfc_optimizer"])  # momentum and the scheduled lr
        else:
            self.log(f"{folder} holds no class-center optimizer state: it starts at zero")
        config_base_lrs = [list(s.base_lrs) for s in self.schedulers]
        if trainer.get("schedulers") is not None:
            for scheduler, state in zip(self.schedulers, trainer["schedulers"]):
                scheduler.load_state_dict(state)
            self._obey_config_lr(config_base_lrs)
        else:
            self._start_schedules_at(int(trainer["step"]))
        if self.scaler is not None and trainer["scaler"]:
            self.scaler.load_state_dict(trainer["scaler"])
        with torch.no_grad():
            self.pfc.weight.copy_(mine["weight"])
        self._restore_head_state(folder, trainer.get("head") or {})
        self.pfc.sampler.set_state(mine["sampler"])
        torch.set_rng_state(mine["torch_rng"])
        if self.device.type == "cuda":
            if mine.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
            elif mine.get("cuda_seed") is not None:
                torch.cuda.manual_seed(mine["cuda_seed"])
        if self.run is not None:
            self.run.adopt(trainer.get("run_id"), folder)
        self.log(f"resumed from {folder} at step {trainer['step']}"
                 + (f" (run {trainer['run_id']})" if trainer.get("run_id") else ""))
        sample = self._saved_sample_in_epoch(trainer)
        self.resumed_at = (int(trainer["epoch"]), sample)
        global_batch = self.comm.size * int(self.config.batch_size)
        return dict(step=trainer["step"], epoch=trainer["epoch"], batch_in_epoch=sample // global_batch,
                    sample_in_epoch=sample)

    def _log_dtype_change(self, folder, mine):
        """One line when the checkpoint's class centers are stored in another dtype than this run's
        ``center_dtype``: the table and its optimizer state are converted as they load (to nearest)."""
        then, now = mine["weight"].dtype, self.pfc.weight.dtype
        if then == now:
            return
        state = ((mine.get("pfc_optimizer") or {}).get("state") or {}).get(0) or {}
        sq = state.get("exp_avg_sq")
        moments = (f", exp_avg_sq {dtype_name(sq.dtype)} -> {dtype_name(exp_avg_sq_dtype(now))}"
                   if isinstance(sq, torch.Tensor) and sq.dtype != exp_avg_sq_dtype(now) else "")
        self.log(f"resume: {folder} holds the class centers in {dtype_name(then)}, this run's center_dtype is "
                 f"{dtype_name(now)}: the table and its optimizer state are converted from {dtype_name(then)} to "
                 f"{dtype_name(now)}{moments}")

    @staticmethod
    def _saved_sample_in_epoch(trainer):
        """The checkpoint's data position; checkpoints of earlier versions saved batches of their global batch."""
        if trainer.get("sample_in_epoch") is not None:
            return int(trainer["sample_in_epoch"])
        saved = _saved_config(trainer)
        batch = saved.get("batch_size")
        if batch is None:
            raise RuntimeError("cannot resume: the checkpoint's data position is in batches and its config names "
                               "no batch_size to count them in")
        return int(trainer.get("batch_in_epoch") or 0) * int(trainer.get("world_size") or 1) * int(batch)

    def _start_schedules_at(self, step):
        """A checkpoint without scheduler state (an imported run): the schedules continue at ``step`` from the
        config's base lr."""
        for scheduler in self.schedulers:
            scheduler.last_epoch = step
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                           scheduler.lr_lambdas):
                group["initial_lr"] = base
                group["lr"] = base * factor(step)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def _check_compatible(self, folder, trainer, mine):
        """Resume refuses what the checkpoint cannot serve: another backbone, embedding size or class count
        (the tensors would not fit), or another global batch (the schedule and the data position count in
        it). The per-rank batch_size may change with the number of ranks."""
        saved = _saved_config(trainer)
        saved_classes = trainer.get("num_classes")
        saved_size = int(trainer.get("world_size") or self.comm.size)
        if saved_classes is None and saved_size == 1:  # checkpoints of earlier versions: the one shard
            saved_classes = int(mine["weight"].shape[0])
        # Checkpoints written before sub-centers hold one row per identity.
        saved_subcenters = int(trainer.get("num_subcenters", mine.get("num_subcenters", 1)))
        checks = [("network", saved.get("network"), self.config.network),
                  ("optimizer", saved.get("optimizer"), self.config.optimizer),
                  ("embedding_size", saved.get("embedding_size"), self.config.embedding_size),
                  ("num_classes", saved_classes, self.pfc.num_classes),
                  ("num_subcenters", saved_subcenters, self.pfc.num_subcenters)]
        for key, then, now in checks:
            if then is not None and then != now:
                what = "the class count" if key == "num_classes" else key
                raise RuntimeError(
                    f"cannot resume from {folder}: {what} is {then!r} in the checkpoint and {now!r} in this run; "
                    f"resume with {key}={then!r}, or start a new run (another output=..., or overwrite=True)")
        then = trainer.get("global_batch")
        if then is None and saved.get("batch_size") is not None:
            then = saved_size * int(saved["batch_size"])
        size, batch = self.comm.size, int(self.config.batch_size)
        if then is not None and int(then) != size * batch:
            then = int(then)
            fix = f"batch_size={then // size}" if then % size == 0 else f"a number of ranks that divides {then}"
            if saved_size == size and then % size == 0:
                problem = f"batch_size is {then // size!r} in the checkpoint and {batch!r} in this run"
            else:
                problem = (f"the global batch is {then} ({saved_size} ranks x batch_size {then / saved_size:g}) in "
                           f"the checkpoint and {size * batch} ({size} ranks x batch_size {batch}) in this run")
            raise RuntimeError(f"cannot resume from {folder}: {problem}; resume with {fix}, or start a new run "
                               f"(another output=..., or overwrite=True)")
        if tuple(mine["weight"].shape) != tuple(self.pfc.weight.shape):
            raise RuntimeError(f"cannot resume from {folder}: rank {self.comm.rank}'s class-center shard is "
                               f"{tuple(mine['weight'].shape)} there and {tuple(self.pfc.weight.shape)} here")

    def _newest_verified(self):
        """``(folder, trainer state, this rank's state)`` of the newest complete checkpoint whose files match
        their checksums and load, on every rank; a failing one is named in the log and the next older one
        tried. ``(None, None, None)`` when there is none. A checkpoint of another number of ranks gives this
        rank's state re-split from all of its shards (see ``_resplit``)."""
        comm = self.comm
        root = os.path.join(self.output, "checkpoints")
        steps = sorted((int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m),
                       reverse=True) if os.path.isdir(root) else []
        owner = read_run(self.output)
        owner = owner["run_id"] if owner else None
        for step in steps:
            folder = step_dir(self.output, step)
            files = _manifest_files(folder)
            if files is None:
                continue  # never sealed: the run stopped while saving it
            manifest = _read_manifest(folder) or {}
            run_id = manifest.get("run_id")
            if owner and run_id and run_id != owner:
                self.log(f"{folder} belongs to run {run_id}, not to this folder's run {owner}; skipped")
                continue
            saved_size = int(manifest.get("world_size") or sum(1 for n in files if n.startswith("rank_")))
            trainer = mine = None
            try:
                if saved_size == comm.size:
                    # Rank 0 checks trainer.pt, every rank its own shard; the ranks agree on the outcome.
                    names = (["trainer.pt"] if comm.rank == 0 else []) + [f"rank_{comm.rank}.pt"]
                    problem = next(filter(None, (verify_file(folder, n) for n in names)), None)
                    if problem is None:
                        trainer = load(os.path.join(folder, "trainer.pt"))
                        mine = load(os.path.join(folder, f"rank_{comm.rank}.pt"))
                else:
                    trainer, mine, problem = self._resplit(folder, saved_size, step)
            except Exception as exc:  # a damaged zip directory, an unreadable file
                problem = f"{folder}: cannot load ({type(exc).__name__}: {exc})"
            failed = comm.allgather(torch.tensor([0 if problem is None else 1], device=self.device)).cpu()
            if problem is not None:
                print(f"[rank {comm.rank}] checkpoint not usable: {problem}", flush=True)
            if not bool(failed.any()):
                return folder, trainer, mine
            ranks = torch.nonzero(failed).flatten().tolist()
            self.log(f"checkpoint {folder} failed verification on rank(s) {ranks}"
                     + (f": {problem}" if problem is not None else "") + "; trying the previous one")
        return None, None, None

    def _resplit(self, folder, saved_size, step):
        """``(trainer state, this rank's state, problem)`` for a checkpoint of ``saved_size`` ranks: this rank's
        ``partition_classes`` range of the centers and of their per-row optimizer state, taken from the saved
        shards (all read, checked to tile the classes without gap or overlap). The class sampler restarts from
        ``reshard.derived_seed(seed, rank, step)``; a rank beyond the saved ones takes its RNG states from it
        too, the others keep their own."""
        comm, rank = self.comm, self.comm.rank
        names = [f"rank_{r}.pt" for r in range(saved_size)]
        problem = next(filter(None, (verify_file(folder, n) for n in ["trainer.pt"] + names)), None)
        if problem is not None:
            return None, None, problem
        trainer = load(os.path.join(folder, "trainer.pt"))
        shards = reshard.read_shards([os.path.join(folder, n) for n in names], trainer.get("num_classes"))
        num_classes = shards[-1]["stop"]
        if num_classes != self.pfc.num_classes:
            return trainer, dict(weight=torch.empty(num_classes, 0)), None  # _check_compatible names it
        start, num = partition_classes(num_classes, rank, comm.size)
        weight, rows, rest, groups, _ = reshard.take_rows(shards, start, num)
        seed = int(self.config.seed)
        sampler = torch.Generator().manual_seed(reshard.derived_seed(seed, rank, step, reshard.SAMPLER))
        mine = dict(weight=weight, class_start=start, num_local=num, num_subcenters=reshard.subcenters(shards[0]),
                    sampler=sampler.get_state(),
                    pfc_optimizer=reshard.optimizer_state_dict(rows, rest, groups))
        if rank < saved_size:
            own = shards[[s["path"] for s in shards].index(os.path.join(folder, f"rank_{rank}.pt"))]["state"]
            mine["torch_rng"], mine["cuda_rng"] = own["torch_rng"], own.get("cuda_rng")
        else:
            mine["torch_rng"] = torch.Generator().manual_seed(
                reshard.derived_seed(seed, rank, step, reshard.TORCH_RNG)).get_state()
            mine["cuda_rng"], mine["cuda_seed"] = None, reshard.derived_seed(seed, rank, step, reshard.CUDA_RNG)
        self.log(reshard.describe_resplit(shards, num_classes, comm.size))
        return trainer, mine, None

    def _obey_config_lr(self, config_base_lrs):
        """The schedules continue at the checkpoint's step, but from this run's base lr: a resumed run with
        another ``lr`` trains at it (the checkpoint's schedulers and optimizers carry the old one)."""
        for scheduler, bases in zip(self.schedulers, config_base_lrs):
            if list(scheduler.base_lrs) == bases:
                continue
            self.log(f"resume: base lr {scheduler.base_lrs[0]:g} in the checkpoint, {bases[0]:g} in the config: "
                     f"the schedule continues at step {scheduler.last_epoch} from {bases[0]:g}")
            scheduler.base_lrs = list(bases)
            for group, base, factor in zip(scheduler.optimizer.param_groups, bases, scheduler.lr_lambdas):
                group["initial_lr"] = base
                group["lr"] = base * factor(scheduler.last_epoch)

    def save_final(self):
        """``model.pt`` (the backbone state_dict, arcface_torch layout) and each rank's class-center shard."""
        shard = dict(weight=self.pfc.weight.detach().cpu(), class_start=self.pfc.class_start,
                     num_classes=self.pfc.num_classes, world_size=self.comm.size,
                     num_subcenters=self.pfc.num_subcenters, center_dtype=dtype_name(self.pfc.weight.dtype))
        save_atomic(shard, os.path.join(self.output, f"softmax_fc_rank_{self.comm.rank}.pt"))
        if self.comm.rank == 0:
            save_atomic(self.backbone.state_dict(), os.path.join(self.output, "model.pt"))
            write_json_atomic(self.config, os.path.join(self.output, "config.json"))
            self.log(f"saved {os.path.join(self.output, 'model.pt')}")
        self.comm.barrier()


def _saved_config(trainer):
    try:
        saved = json.loads(trainer.get("config") or "{}")
    except ValueError:
        saved = {}
    return saved if isinstance(saved, dict) else {}


def _tensors(obj):
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
