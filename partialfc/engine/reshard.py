"""Re-splitting the class centers of a checkpoint for another number of ranks, and the files of
``python -m partialfc.tools.reshard`` (merge, split, arcface_torch import).

A checkpoint of W ranks holds one ``rank_<r>.pt`` per rank with the rows ``[class_start, class_start +
num_local)`` of the center table and the same rows of every per-row optimizer state (SparseSGD's
``momentum_buffer``, SparseAdamW's ``exp_avg``, ``exp_avg_sq`` and ``row_step``). Read together, in class
order, they must cover ``[0, num_classes)`` without a gap or an overlap; any W' ranks then take their
``partition_classes`` ranges from them. Shards are opened with ``torch.load(mmap=True)``: a rank reads only
the rows it takes.

Sub-center ArcFace (``num_subcenters`` K > 1): a shard holds K table rows per identity, identity c's at
``(c - class_start)*K .. (c - class_start)*K + K - 1``, so ``weight`` and every per-row optimizer state have
``num_local * K`` rows. ``class_start``, ``num_local`` and the class ranges count identities, not rows, and the
shard records K as ``num_subcenters`` (absent: 1; :func:`subcenters` reads it). A re-split moves whole
identities: ``take_rows`` copies all K rows of each identity it takes, never part of one. Shards with different
K do not form one table (a ``ReshardError`` names both); ``merge`` and ``split`` carry K along, and a resume or
``init_centers`` compares it with the run's ``num_subcenters``.

Seed rule of a re-split: the class ranges change on every rank, so every rank's class sampler restarts,
seeded from ``(seed, rank, step)``; a rank that did not exist in the checkpoint also takes its torch (and
CUDA) RNG from that rule, a rank that did keeps its own. See :func:`derived_seed`.
"""
import glob
import json
import os
import re

import numpy as np
import torch

from ..head.partial_fc import partition_classes
from ..head.precision import dtype_name

__all__ = ["ReshardError", "derived_seed", "read_shards", "take_rows", "merge", "split", "describe_resplit"]

_RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")
MERGED_FORMAT = "partialfc-merged-centers/1"

# Which stream a derived seed is for: the head's class sampler, torch's CPU RNG, the device's RNG.
SAMPLER, TORCH_RNG, CUDA_RNG = 0, 1, 2


class ReshardError(ValueError):
    """Shards that do not form one table: a missing rank file, a gap or an overlap of class ranges, another
    embedding size. The message names the file and the range."""


def derived_seed(seed, rank, step, stream=SAMPLER):
    """The seed of ``stream`` on ``rank`` for a run re-split at ``step``: 64 bits of
    ``numpy.random.SeedSequence([seed, rank, step, stream])``."""
    words = np.random.SeedSequence([int(seed), int(rank), int(step), int(stream)]).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1)


def _load(path, mmap):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a file of another kind, a damaged zip
        raise ReshardError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None


def per_row_state(optimizer_state, num_local, path):
    """``(rows, rest)`` of a center optimizer's ``state_dict()``: the per-row tensors (dim 0 is the shard's
    rows) and the other state entries (shared by all shards)."""
    if optimizer_state is None:
        return {}, {}
    state = optimizer_state.get("state") or {}
    if len(state) > 1:
        raise ReshardError(f"{path}: the center optimizer holds state for {len(state)} parameters, expected one "
                           f"(the class centers)")
    entries = next(iter(state.values())) if state else {}
    rows = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor) and v.dim() >= 1
            and v.shape[0] == num_local}
    return rows, {k: v for k, v in entries.items() if k not in rows}


def read_shards(files, num_classes=None, mmap=True):
    """The shards in ``files`` (paths of ``rank_<r>.pt``-like dicts with ``weight``, ``class_start``,
    ``num_local``), sorted by ``class_start``, after checking that they tile ``[0, num_classes)`` (or
    ``[0, total)``) and share an embedding size. Each is ``dict(path, start, stop, state)``."""
    if not files:
        raise ReshardError("no class-center shard files given")
    shards = []
    for path in files:
        state = _load(path, mmap)
        if not isinstance(state, dict) or not isinstance(state.get("weight"), torch.Tensor):
            raise ReshardError(f"{path}: not a class-center shard (no 'weight' tensor)")
        weight = state["weight"]
        if weight.dim() != 2:
            raise ReshardError(f"{path}: weight is {list(weight.shape)}, expected [num_local, embedding_size]")
        start = int(state.get("class_start", 0))
        k = int(state.get("num_subcenters", 1))  # rows per identity (sub-center ArcFace)
        num_local = int(state.get("num_local", weight.shape[0] // k))
        if num_local * k != weight.shape[0]:
            if k == 1:
                raise ReshardError(f"{path}: num_local is {num_local} but weight holds {weight.shape[0]} rows")
            raise ReshardError(f"{path}: weight holds {weight.shape[0]} rows, but num_local {num_local} x "
                               f"num_subcenters {k} is {num_local * k}")
        shards.append(dict(path=path, start=start, stop=start + num_local, state=state, k=k))
    return check_tiling(shards, num_classes)


def check_tiling(shards, num_classes=None):
    """``shards`` (``dict(path, start, stop, state)`` with ``state["weight"]`` [stop - start, D]) sorted by class,
    after checking that they tile ``[0, num_classes)`` (or ``[0, total)``) without gap or overlap and share an
    embedding size; a ``ReshardError`` names the file, its class range and what is wrong."""
    shards = sorted(shards, key=lambda s: (s["start"], s["stop"]))
    dim = shards[0]["state"]["weight"].shape[1]
    dtype = shards[0]["state"]["weight"].dtype
    expect = 0
    for shard in shards:
        where = f"{shard['path']} (classes [{shard['start']}, {shard['stop']}))"
        if subcenters(shard) != subcenters(shards[0]):
            raise ReshardError(f"{where}: {subcenters(shard)} sub-centers per identity, but {shards[0]['path']} has "
                               f"{subcenters(shards[0])}")
        if shard["state"]["weight"].shape[1] != dim:
            raise ReshardError(f"{where}: embedding size {shard['state']['weight'].shape[1]}, but "
                               f"{shards[0]['path']} has {dim}")
        if shard["state"]["weight"].dtype != dtype:
            # One table has one storage dtype: concatenating would promote the rows silently.
            raise ReshardError(f"{where}: class centers stored as {dtype_name(shard['state']['weight'].dtype)}, "
                               f"but {shards[0]['path']} stores {dtype_name(dtype)}")
        if shard["start"] > expect:
            raise ReshardError(f"{where}: classes [{expect}, {shard['start']}) are in no shard (a gap; is a rank's "
                               f"file missing?)")
        if shard["start"] < expect:
            raise ReshardError(f"{where}: overlaps the classes up to {expect} of the shard before it")
        expect = shard["stop"]
    if num_classes is not None and expect != num_classes:
        raise ReshardError(f"{shards[-1]['path']} (classes [{shards[-1]['start']}, {expect})): the shards end at "
                           f"class {expect}, but there are {num_classes} classes (is a rank's file missing?)")
    return shards


def subcenters(shard):
    """K, the table rows per identity of a ``dict(path, start, stop, state)`` shard (1 unless it says)."""
    return int(shard.get("k", shard["state"].get("num_subcenters", 1)))


def rank_files(folder):
    """``rank_<r>.pt`` paths of a checkpoint folder in rank order, checking that ranks 0..W-1 are all there."""
    found = {}
    for name in os.listdir(folder):
        m = _RANK_FILE.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    if not found:
        raise ReshardError(f"{folder} holds no rank_<r>.pt files")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ReshardError(f"{folder}: rank file(s) {', '.join(f'rank_{r}.pt' for r in missing)} missing "
                           f"(found ranks {sorted(found)})")
    return [found[r] for r in sorted(found)]


def take_rows(shards, start, num):
    """``(weight [num*K, D], per-row optimizer state {key: [num*K, ...]}, rest, param_groups, pieces)`` for
    classes ``[start, start + num)``, copied out of the shards that hold them: all K rows of each identity (K
    sub-centers; K = 1 without them), never part of one. ``pieces`` lists ``(path, lo, hi)`` row ranges taken
    from each file."""
    stop = start + num
    k = subcenters(shards[0])
    weights, rows, pieces = [], {}, []
    rest = param_groups = keys = None
    for shard in shards:
        state = shard["state"]
        shard_rows, shard_rest = per_row_state(state.get("pfc_optimizer"), (shard["stop"] - shard["start"]) * k,
                                               shard["path"])
        if keys is None:
            keys, rest = sorted(shard_rows), shard_rest
            param_groups = (state.get("pfc_optimizer") or {}).get("param_groups")
        elif sorted(shard_rows) != keys:
            raise ReshardError(f"{shard['path']} (classes [{shard['start']}, {shard['stop']})): its center "
                               f"optimizer state holds {sorted(shard_rows)}, {shards[0]['path']} holds {keys}")
        lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
        if lo >= hi:
            continue
        a, b = (lo - shard["start"]) * k, (hi - shard["start"]) * k
        weights.append(state["weight"][a:b])
        for key in keys:
            rows.setdefault(key, []).append(shard_rows[key][a:b])
        pieces.append((shard["path"], a, b))
    dim = shards[0]["state"]["weight"].shape[1]
    dtype = shards[0]["state"]["weight"].dtype
    weight = torch.cat(weights) if weights else torch.empty(0, dim, dtype=dtype)
    return weight, {k: torch.cat(v) for k, v in rows.items()}, rest or {}, param_groups, pieces


def optimizer_state_dict(rows, rest, param_groups):
    """A center optimizer ``state_dict()`` from per-row and shared state entries (None without groups)."""
    if param_groups is None:
        return None
    state = dict(rest)
    state.update(rows)
    return {"state": {0: state} if state else {}, "param_groups": param_groups}


def describe_resplit(shards, num_classes, world_size):
    """"re-split C classes from W ranks to W': rank 0 [a, b) <- rank_0.pt[x, y) + ..."."""
    parts = []
    for rank in range(world_size):
        start, num = partition_classes(num_classes, rank, world_size)
        sources = []
        for shard in shards:
            lo, hi = max(start, shard["start"]), min(start + num, shard["stop"])
            if lo < hi:
                sources.append(f"{os.path.basename(shard['path'])}[{lo - shard['start']}:{hi - shard['start']}]")
        parts.append(f"rank {rank} [{start}, {start + num}) <- {' + '.join(sources) or 'nothing'}")
    return f"re-split {num_classes} classes from {len(shards)} ranks to {world_size}: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# The tool's files

def checkpoint_folder(path):
    """A checkpoint step folder: ``path`` itself, or the newest sealed ``checkpoints/step_<N>`` under an output
    folder."""
    from .checkpointer import MANIFEST, latest_complete
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, "trainer.pt")):
        return path
    folder = latest_complete(path)
    if folder is None:
        raise ReshardError(f"{path} is neither a checkpoint folder (step_<N> with trainer.pt) nor an output folder "
                           f"with a sealed checkpoint")
    return folder


def merge(folder):
    """The whole table of checkpoint ``folder`` as one dict: ``weight`` [C, D], ``optimizer_rows`` (per-row
    states [C, ...]), ``optimizer_rest``, ``param_groups``, ``num_classes``, ``trainer`` (trainer.pt)."""
    from .checkpointer import verify_file
    folder = checkpoint_folder(folder)
    trainer_path = os.path.join(folder, "trainer.pt")
    if not os.path.isfile(trainer_path):
        raise ReshardError(f"{folder}: trainer.pt is missing")
    files = rank_files(folder)
    for path in files + [trainer_path]:
        problem = verify_file(folder, os.path.basename(path)) if os.path.isfile(
            os.path.join(folder, "MANIFEST.json")) else None
        if problem:
            raise ReshardError(problem)
    trainer = _load(trainer_path, mmap=False)
    num_classes = trainer.get("num_classes")
    if trainer.get("world_size") is not None and int(trainer["world_size"]) != len(files):
        raise ReshardError(f"{trainer_path} was written by {trainer['world_size']} ranks, but {folder} holds "
                           f"{len(files)} rank files")
    shards = read_shards(files, num_classes)
    total = shards[-1]["stop"]
    weight, rows, rest, param_groups, _ = take_rows(shards, 0, total)
    return dict(format=MERGED_FORMAT, num_classes=total, embedding_size=int(weight.shape[1]), weight=weight,
                optimizer_rows=rows, optimizer_rest=rest, param_groups=param_groups, trainer=trainer,
                source_world_size=len(files), num_subcenters=subcenters(shards[0]),
                center_dtype=dtype_name(weight.dtype))


def load_merged(path):
    merged = _load(path, mmap=True)
    if not isinstance(merged, dict) or merged.get("format") != MERGED_FORMAT:
        raise ReshardError(f"{path} is not a merged checkpoint (made by `python -m partialfc.tools.reshard merge`)")
    c = merged["weight"].shape[0]
    for key, value in merged["optimizer_rows"].items():
        if value.shape[0] != c:
            raise ReshardError(f"{path}: optimizer state {key!r} has {value.shape[0]} rows, the table {c}")
    return merged


def split(merged, world_size, output, log=print):
    """Write ``merged`` as a resumable checkpoint of ``world_size`` ranks under ``output/checkpoints/step_<N>``
    (every file atomic, a manifest last); returns the step folder."""
    from .checkpointer import save_atomic, step_dir, write_manifest
    if world_size < 1:
        raise ReshardError(f"--world-size must be at least 1, got {world_size}")
    trainer = dict(merged["trainer"])
    num_classes = int(merged["num_classes"])
    if world_size > num_classes:
        raise ReshardError(f"--world-size {world_size} is more than the {num_classes} classes")
    step = int(trainer.get("step") or 0)
    seed = _config_seed(trainer)
    folder = step_dir(output, step)
    os.makedirs(folder, exist_ok=True)
    k = int(merged.get("num_subcenters", 1))
    shard = dict(path="merged", start=0, stop=num_classes, k=k,
                 state=dict(weight=merged["weight"], pfc_optimizer=optimizer_state_dict(
                     merged["optimizer_rows"], merged["optimizer_rest"], merged["param_groups"])))
    for rank in range(world_size):
        start, num = partition_classes(num_classes, rank, world_size)
        weight, rows, rest, groups, _ = take_rows([shard], start, num)
        sampler = torch.Generator().manual_seed(derived_seed(seed, rank, step, SAMPLER)).get_state()
        torch_rng = torch.Generator().manual_seed(derived_seed(seed, rank, step, TORCH_RNG)).get_state()
        state = dict(weight=weight.clone(), pfc_optimizer=optimizer_state_dict(
                         {k: v.clone() for k, v in rows.items()}, rest, groups),
                     class_start=start, num_local=num, num_subcenters=k, sampler=sampler, torch_rng=torch_rng,
                     cuda_rng=None, derived_rng=True, center_dtype=dtype_name(weight.dtype))
        save_atomic(state, os.path.join(folder, f"rank_{rank}.pt"))
    trainer["world_size"] = world_size
    trainer["num_classes"] = num_classes
    trainer["num_subcenters"] = k
    trainer["center_dtype"] = dtype_name(merged["weight"].dtype)  # split keeps the merged table's dtype
    save_atomic(trainer, os.path.join(folder, "trainer.pt"))
    write_manifest(folder, world_size, step, run_id=trainer.get("run_id"))
    log(f"wrote {folder}: {num_classes} classes over {world_size} ranks, step {step}")
    return folder


def _config_seed(trainer):
    try:
        return int(json.loads(trainer.get("config") or "{}").get("seed") or 0)
    except (ValueError, TypeError, AttributeError):
        return 0


# ----------------------------------------------------------------------------------------------------------
# arcface_torch runs

def import_arcface_torch(run_dir, output, world_size, log=print):
    """Import an arcface_torch run as a resumable checkpoint of ``world_size`` ranks under ``output``.

    ``run_dir`` holds either its training checkpoints ``checkpoint_gpu_<r>.pt`` (keys ``epoch``,
    ``global_step``, ``state_dict_backbone``, ``state_dict_softmax_fc``, ``state_optimizer``,
    ``state_lr_scheduler``) or its final ``model.pt`` and ``softmax_fc_gpu_<r>.pt``. PartialFC_V2 holds
    classes ``[start, start + num_local)`` on rank r with ``partition_classes`` (contiguous ranges, the first
    ``num_classes % W`` ranks one longer); the ranges are re-derived from the file count and each file's row
    count must match. The backbone and the centers are imported; the center momentum too when the run's
    optimizer state maps to it (SGD with its Partial FC weight as the last parameter, of the shard's shape),
    else it starts at zero. The backbone optimizer and the LR schedule start afresh at the run's step."""
    from ..eval.model_io import extract_backbone_state_dict
    ckpts = _rank_set(run_dir, "checkpoint_gpu_")
    if ckpts:
        states = [_load(p, mmap=False) for p in ckpts]
        for path, state in zip(ckpts, states):
            for key in ("state_dict_backbone", "state_dict_softmax_fc"):
                if not isinstance(state, dict) or key not in state:
                    raise ReshardError(f"{path}: not an arcface_torch checkpoint (no {key!r})")
        fcs = [(p, s["state_dict_softmax_fc"]) for p, s in zip(ckpts, states)]
        backbone = extract_backbone_state_dict(states[0], ckpts[0])
        step, epoch = int(states[0].get("global_step") or 0), int(states[0].get("epoch") or 0)
    else:
        fc_files = _rank_set(run_dir, "softmax_fc_gpu_")
        model = os.path.join(run_dir, "model.pt")
        if not fc_files or not os.path.isfile(model):
            raise ReshardError(f"{run_dir} holds neither checkpoint_gpu_<rank>.pt files nor model.pt with "
                               f"softmax_fc_gpu_<rank>.pt")
        fcs = [(p, _load(p, mmap=False)) for p in fc_files]
        backbone = extract_backbone_state_dict(_load(model, mmap=False), model)
        states, step, epoch = None, 0, 0
    weights = []
    for path, fc in fcs:
        weight = fc.get("weight") if isinstance(fc, dict) else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ReshardError(f"{path}: no class-center 'weight' [num_local, embedding_size] in its softmax fc state")
        weights.append(weight)
    sizes = [w.shape[0] for w in weights]
    num_classes, src = sum(sizes), len(weights)
    dim = weights[0].shape[1]
    for path, weight in zip((p for p, _ in fcs), weights):
        if weight.shape[1] != dim:
            raise ReshardError(f"{path}: embedding size {weight.shape[1]}, but {fcs[0][0]} has {dim}")
    # Without the class count the layout is checked against the one these row counts would make; the first
    # file that differs is named, with every file's rows.
    expected = [partition_classes(num_classes, r, src)[1] for r in range(src)]
    for r, (path, _) in enumerate(fcs):
        if sizes[r] != expected[r]:
            start, num = partition_classes(num_classes, r, src)
            raise ReshardError(
                f"{path}: holds {sizes[r]} rows, but PartialFC_V2 puts classes [{start}, {start + num}) on rank "
                f"{r}: {src} shards of {num_classes} classes hold {expected} rows, these files hold {sizes}")
    momenta, why = _arcface_momenta(ckpts, states, weights)
    weight = torch.cat(weights)
    rows = {"momentum_buffer": torch.cat(momenta)} if momenta else {}
    groups = None
    if momenta:
        # The Partial FC group's hyper-parameters; the lr is set from the config's schedule at resume.
        groups = [{k: v for k, v in states[0]["state_optimizer"]["param_groups"][-1].items() if k != "params"}]
        groups[0]["params"] = [0]
        log(f"imported the SGD momentum of the class centers from {', '.join(os.path.basename(p) for p in ckpts)}")
    else:
        log(f"the class centers' momentum starts at zero: {why}")
    log("the backbone optimizer and the LR schedule start afresh at step "
        f"{step} (arcface_torch's optimizer state is one dense optimizer over backbone and centers)")
    config = {"embedding_size": int(weight.shape[1]), "num_classes": num_classes}
    if momenta:
        config["optimizer"] = "sgd"
    trainer = dict(backbone=backbone, optimizer=None, schedulers=None, scaler=None, step=step, epoch=epoch,
                   batch_in_epoch=0, sample_in_epoch=0, world_size=world_size, num_classes=num_classes,
                   run_id=None, config=json.dumps(config), imported_from=os.path.abspath(run_dir))
    merged = dict(format=MERGED_FORMAT, num_classes=num_classes, embedding_size=int(weight.shape[1]),
                  weight=weight, optimizer_rows=rows, optimizer_rest={}, param_groups=groups, trainer=trainer)
    return split(merged, world_size, output, log)


def _rank_set(run_dir, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.pt$")
    found = {}
    for path in glob.glob(os.path.join(run_dir, prefix + "*.pt")):
        m = pattern.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    if not found:
        return []
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ReshardError(f"{run_dir}: {', '.join(f'{prefix}{r}.pt' for r in missing)} missing (found ranks "
                           f"{sorted(found)}); every rank's file is needed")
    return [found[r] for r in sorted(found)]


def _arcface_momenta(paths, states, weights):
    """Each rank's center momentum from arcface_torch's ``state_optimizer``, or ``(None, why not)``."""
    if not states:
        return None, "model.pt and softmax_fc_gpu_<r>.pt hold no optimizer state"
    momenta = []
    for path, state, weight in zip(paths, states, weights):
        opt = state.get("state_optimizer")
        try:
            groups = opt["param_groups"]
            last = groups[-1]["params"]
            buf = opt["state"].get(last[-1], {}).get("momentum_buffer") if len(last) == 1 else None
        except (TypeError, KeyError, IndexError, AttributeError):
            buf = None
        if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != tuple(weight.shape):
            return None, (f"{path}: its state_optimizer has no SGD momentum of the shard's shape "
                          f"{list(weight.shape)} for its last parameter group (the Partial FC weight)")
        momenta.append(buf.to(weight.dtype))
    return momenta, None
