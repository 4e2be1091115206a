"""Start a run from existing weights without taking over its schedule: fine-tuning and teachers.

``init_backbone`` names a backbone file in any layout :func:`partialfc.eval.model_io.extract_backbone_state_dict`
reads (our ``model.pt``, arcface_torch's ``backbone.pth`` or ``checkpoint_gpu_<r>.pt``, our checkpoint
folders' ``trainer.pt``), or a folder holding ``model.pt`` (a finished run) or ``trainer.pt`` (a checkpoint).

``init_centers`` names class-center shards written by any world size; they are merged in class order and
re-split for this run with ``partition_classes``:

- our run's output folder, or one of its ``softmax_fc_rank_<r>.pt`` files (keys ``weight``, ``class_start``,
  ``num_classes``, ``world_size``);
- our checkpoint folder ``checkpoints/step_<N>``, or one of its ``rank_<r>.pt`` files (``weight``,
  ``class_start``, ``num_local``; the world size is the number of rank files);
- arcface_torch's per-rank ``softmax_fc_gpu_<r>.pt`` (a state dict whose ``weight`` is that rank's
  ``[num_local, D]`` rows) or ``checkpoint_gpu_<r>.pt`` (the same under ``state_dict_softmax_fc``). These carry
  no class range: rank r holds the r-th contiguous range of arcface_torch's split, which is ours
  (``partition_classes``), so the ranges follow from the shards' row counts in rank order.

Sub-center ArcFace (``num_subcenters`` K): our files record K (``num_subcenters``, 1 when absent; arcface_torch's
are always 1) and hold ``[num_local * K, D]`` rows, identity c's K rows together at ``c*K .. c*K+K-1``. The
shards are merged and re-split by identity, never splitting one's K rows (``engine.reshard.take_rows``). Files
with this run's K are taken as they are. Files with one center per identity start a run with K > 1 too: each
identity's first sub-center is its center, the other K - 1 are that center turned by a small random angle
(``SUBCENTER_NOISE``), so that the max over the K picks different sub-centers for different samples from the
first step (identical copies would tie, and a tie goes to the first row, so the others would never train).
The noise depends on ``seed`` and the identity only, so every world size starts from the same table. Files with
K > 1 and another K in this run are an error naming the file and both K: there is no one right way to turn
K sub-centers into K'.

Only the weights are taken: optimizer state (momentum, AdamW moments) starts fresh, and so do the step, the
schedule and the data position. Every mismatch (network, embedding size, class count, sub-centers per identity,
a missing rank file, a gap or an overlap between class ranges) is an :class:`InitWeightsError` naming the file
and both values.
"""
import os
import re

import numpy as np
import torch

from ..eval.model_io import CheckpointError, load_backbone_state_dict, state_mismatch
from ..head.partial_fc import partition_classes
from .reshard import ReshardError, check_tiling, subcenters, take_rows

__all__ = ["InitWeightsError", "SUBCENTER_NOISE", "check_backbone_state", "expand_to_subcenters",
           "load_backbone_weights", "load_center_shard", "read_center_shards", "resolve_backbone_file"]


class InitWeightsError(CheckpointError):
    """Weights that do not fit this run; the message names the file and both values."""


# ------------------------------------------------------------------------------------------------------
# backbone


def resolve_backbone_file(path):
    """The backbone file ``path`` names: itself, or a folder's ``model.pt`` (a finished run) or ``trainer.pt``
    (one of our checkpoint folders)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    for name in ("model.pt", "trainer.pt"):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise InitWeightsError(f"{path} is a folder holding neither model.pt (a finished run) nor trainer.pt "
                           f"(a checkpoint folder); name the backbone file itself")


def _embedding_size_of(state, own):
    """The embedding size ``state`` was saved with: the length of the last 1-D tensor (the embedding BatchNorm
    of every registered backbone), by the model's names when ``state`` has them, else in the file's order."""
    last = next((k for k in reversed(list(own)) if own[k].dim() == 1), None)
    if last is None or last not in state or state[last].dim() != 1:
        last = next((k for k in reversed(list(state)) if state[k].dim() == 1), None)
    return None if last is None else int(state[last].shape[0])


def _fits(model_state, state):
    return (set(model_state) == set(state)
            and all(tuple(model_state[k].shape) == tuple(state[k].shape) for k in model_state))


def _networks_that_fit(state, embedding_size):
    """Registered networks whose state dict has exactly ``state``'s keys and shapes (built on the meta
    device: no memory, no time)."""
    from ..backbones import available_backbones, get_model
    found = []
    for name in available_backbones():
        try:
            with torch.device("meta"):
                candidate = get_model(name, num_features=embedding_size, dropout=0.0, fp16=False).state_dict()
        except Exception:  # a network that cannot be built at this size is not the one
            continue
        if _fits(candidate, state):
            found.append(name)
    return found


def check_backbone_state(model, state, path, network, embedding_size, what="init_backbone"):
    """Raise :class:`InitWeightsError` when ``state`` (read from ``path``) is not a state dict of ``network``
    with ``embedding_size`` features (``model`` is that network), naming the file and both values."""
    own = model.state_dict()
    if _fits(own, state):
        return
    saved_size = _embedding_size_of(state, own)
    if saved_size is not None and saved_size != embedding_size:
        fit = _networks_that_fit(state, saved_size)
        if not fit or network in fit:
            raise InitWeightsError(f"{what} {path}: embedding size {saved_size} in the file, {embedding_size} in "
                                   f"this run (embedding_size={embedding_size})")
    fit = _networks_that_fit(state, saved_size or embedding_size)
    if fit:
        size = f" with embedding size {saved_size}" if saved_size is not None else ""
        raise InitWeightsError(f"{what} {path}: the file holds a {' / '.join(map(repr, fit))} backbone{size}; "
                               f"this run's network is {network!r} with embedding size {embedding_size}")
    raise InitWeightsError(f"{what} {path}: not a state dict of network {network!r} with embedding size "
                           f"{embedding_size}: {state_mismatch(model, state)}")


def load_backbone_weights(model, path, network, embedding_size, what="init_backbone"):
    """Load the backbone weights ``path`` names (see :func:`resolve_backbone_file`) into ``model`` (a
    ``network`` with ``embedding_size`` features), after :func:`check_backbone_state`. Returns the file read."""
    path = resolve_backbone_file(path)
    try:
        state = load_backbone_state_dict(path)
    except FileNotFoundError:
        raise InitWeightsError(f"{what} {path} does not exist") from None
    check_backbone_state(model, state, path, network, embedding_size, what)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return path


# ------------------------------------------------------------------------------------------------------
# class centers

# File names of per-rank center files, in the order a folder is searched, and whether the files carry their
# class range (ours) or it follows from the row counts (arcface_torch's).
_SHARD_LAYOUTS = (("softmax_fc_rank_{}.pt", True), ("rank_{}.pt", True), ("softmax_fc_gpu_{}.pt", False),
                  ("checkpoint_gpu_{}.pt", False))


def _pattern(template):
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


def _shard_files(path):
    """``(folder, file name template, carries_ranges, {rank: file})`` of the shard set ``path`` names (a folder or one
    of its files)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, names = path, sorted(os.listdir(path))
        layouts = _SHARD_LAYOUTS
    elif os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        names = sorted(os.listdir(folder))
        base = os.path.basename(path)
        layouts = [next(((t, r) for t, r in _SHARD_LAYOUTS if _pattern(t).fullmatch(base)), (None, None))]
        if layouts[0][0] is None:
            raise InitWeightsError(f"init_centers {path}: not a class-center file (expected softmax_fc_rank_<r>.pt, "
                                   f"rank_<r>.pt, softmax_fc_gpu_<r>.pt or checkpoint_gpu_<r>.pt)")
    else:
        raise InitWeightsError(f"init_centers {path} does not exist")
    for template, ranges in layouts:
        files = {int(m.group(1)): os.path.join(folder, n) for n in names for m in [_pattern(template).fullmatch(n)]
                 if m}
        if files:
            return folder, template, ranges, files
    raise InitWeightsError(f"init_centers {path}: no class-center files in the folder (softmax_fc_rank_<r>.pt, "
                           f"rank_<r>.pt, softmax_fc_gpu_<r>.pt or checkpoint_gpu_<r>.pt)")


def _load_shard(path):
    try:
        # mmap: a rank copies only the rows it keeps out of shards that may be gigabytes.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a file that is not a torch.save zip cannot be mapped; read it whole
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise InitWeightsError(f"init_centers {path}: cannot load ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict_softmax_fc"), dict):
        obj = obj["state_dict_softmax_fc"]
    weight = obj.get("weight") if isinstance(obj, dict) else None
    if not torch.is_tensor(weight) or weight.dim() != 2:
        raise InitWeightsError(f"init_centers {path}: expected a 'weight' tensor [classes, embedding_size] "
                               f"(or one under 'state_dict_softmax_fc'), found "
                               f"{list(weight.shape) if torch.is_tensor(weight) else type(weight).__name__}")
    return obj, weight


def read_center_shards(path):
    """Every shard of the set ``path`` names, checked: ``[dict(path, start, stop, k, state=dict(weight))]`` in
    class order (as ``engine.reshard`` has them: ``[start, stop)`` are identities, ``weight`` their
    ``(stop - start) * k`` rows, ``reshard.subcenters(shard)`` is k), with ``(num_classes, embedding_size)``. A
    missing rank file, a gap or an overlap between class ranges, a class count that disagrees with the files,
    shards of different widths or of different sub-center counts raise :class:`InitWeightsError` naming the
    file and both values."""
    folder, template, carries_ranges, files = _shard_files(path)
    loaded = {rank: _load_shard(f) for rank, f in sorted(files.items())}
    declared = {r: obj.get("world_size") for r, (obj, _) in loaded.items() if obj.get("world_size") is not None}
    world_size = max([max(files) + 1] + [int(w) for w in declared.values()])
    for rank in range(world_size):
        if rank not in files:
            why = (f"{files[next(iter(declared))]} says world_size {declared[next(iter(declared))]}"
                   if declared else f"rank files up to {max(files)} are present")
            raise InitWeightsError(f"init_centers {folder}: the file of rank {rank} of {world_size}, "
                                   f"{os.path.join(folder, template.format(rank))}, is missing ({why}, "
                                   f"{len(files)} found)")
    for rank, w in declared.items():
        if int(w) != world_size:
            raise InitWeightsError(f"init_centers {files[rank]}: world_size {w} in the file, {world_size} rank "
                                   f"files in {folder}")
    dims = {r: int(weight.shape[1]) for r, (_, weight) in loaded.items()}
    if len(set(dims.values())) > 1:
        r = next(r for r in dims if dims[r] != dims[0])
        raise InitWeightsError(f"init_centers {files[r]}: embedding size {dims[r]}, but {dims[0]} in {files[0]}")
    starts, identities, ks = {}, {}, {}
    for rank, (obj, weight) in loaded.items():
        # Rows per identity: ours say (sub-center ArcFace; 1 when absent), arcface_torch's have one.
        ks[rank] = int(obj.get("num_subcenters", 1)) if carries_ranges else 1
        rows = int(weight.shape[0])
        if ks[rank] < 1 or rows % ks[rank]:
            raise InitWeightsError(f"init_centers {files[rank]}: weight holds {rows} rows, not a multiple of its "
                                   f"num_subcenters {ks[rank]}")
        identities[rank] = rows // ks[rank]
        if obj.get("num_local") is not None and int(obj["num_local"]) != identities[rank]:
            raise InitWeightsError(f"init_centers {files[rank]}: num_local {int(obj['num_local'])} in the file, but "
                                   f"its weight holds {rows} rows ({identities[rank]} identities x num_subcenters "
                                   f"{ks[rank]})")
    if carries_ranges:
        for rank, (obj, _) in loaded.items():
            if obj.get("class_start") is None:
                raise InitWeightsError(f"init_centers {files[rank]}: no 'class_start' in the file")
            starts[rank] = int(obj["class_start"])
    else:  # arcface_torch's shards: contiguous ranges in rank order, as partition_classes splits them
        start = 0
        for rank in loaded:
            starts[rank], start = start, start + identities[rank]
    # The same tiling rule as a resume on another world size (engine/reshard), by identity; shards of different
    # K are named there.
    try:
        shards = check_tiling([dict(path=files[r], start=starts[r], stop=starts[r] + identities[r], k=ks[r],
                                    state=dict(weight=w)) for r, (_, w) in loaded.items()])
    except ReshardError as exc:
        raise InitWeightsError(f"init_centers: {exc}") from None
    total = shards[-1]["stop"]
    for rank, (obj, _) in loaded.items():
        if obj.get("num_classes") is not None and int(obj["num_classes"]) != total:
            raise InitWeightsError(f"init_centers {files[rank]}: num_classes {int(obj['num_classes'])} in the file, "
                                   f"but its shard set holds {total} classes")
    return shards, total, dims[0]


# Each extra sub-center made from a single center is the center plus Gaussian noise of this standard deviation
# times the center's norm / sqrt(D): a turn of about 0.01 rad (0.6 degrees), far below the angles between a
# trained center and its samples, so the identity's cosine barely moves, yet enough that the K cosines differ.
SUBCENTER_NOISE = 0.01
# The noise is drawn per block of this many identities, from a generator seeded by (seed, block): a rank draws
# only the blocks its identities fall in, and every split of the classes draws the same numbers.
_NOISE_BLOCK = 4096


def expand_to_subcenters(centers, class_start, num_subcenters, seed=0):
    """``[N * K, D]`` rows for the identities ``[class_start, class_start + N)`` whose single centers are
    ``centers`` [N, D]: identity c's first row is its center, the other ``K - 1`` its center plus
    ``SUBCENTER_NOISE * norm / sqrt(D)`` times standard Gaussian noise that depends only on ``seed`` and the
    global identity c."""
    num, dim = centers.shape
    k = int(num_subcenters)
    if k == 1:
        return centers
    out = centers.to(torch.float32).repeat_interleave(k, dim=0).view(num, k, dim)  # [N, K, D]
    if num == 0:
        return out.view(0, dim)
    scale = SUBCENTER_NOISE * out[:, 0].norm(dim=1, keepdim=True) / dim ** 0.5  # [N, 1]
    stop = class_start + num
    for block in range(class_start // _NOISE_BLOCK, (stop - 1) // _NOISE_BLOCK + 1):
        words = np.random.SeedSequence([int(seed), block, k, dim]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))
        noise = torch.randn(_NOISE_BLOCK, k - 1, dim, generator=gen)  # [block, K - 1, D]
        lo, hi = max(class_start, block * _NOISE_BLOCK), min(stop, (block + 1) * _NOISE_BLOCK)
        mine = slice(lo - class_start, hi - class_start)
        out[mine, 1:] += scale[mine, None] * noise[lo - block * _NOISE_BLOCK:hi - block * _NOISE_BLOCK]
    return out.view(num * k, dim)


def load_center_shard(path, num_classes, embedding_size, rank, world_size, num_subcenters=1, seed=0):
    """This rank's ``[num_local * num_subcenters, D]`` float32 centers out of the shard set ``path`` names,
    re-split by identity from the files' world size to ``world_size`` with ``partition_classes``; the class
    count and the embedding size must be this run's. Files with ``num_subcenters`` rows per identity are taken
    as they are; files with one center per identity are expanded with :func:`expand_to_subcenters` (``seed``:
    the run's); any other sub-center count is an :class:`InitWeightsError` naming a file and both counts."""
    shards, total, dim = read_center_shards(path)
    where = os.fspath(path)
    if total != num_classes:
        raise InitWeightsError(f"init_centers {where}: {total} classes in the files, {num_classes} in this run "
                               f"(num_classes or the data)")
    if dim != embedding_size:
        raise InitWeightsError(f"init_centers {where}: embedding size {dim} in the files, {embedding_size} in "
                               f"this run (embedding_size)")
    saved = subcenters(shards[0])
    if saved != num_subcenters and saved != 1:
        raise InitWeightsError(f"init_centers {shards[0]['path']}: {saved} sub-centers per identity in the files, "
                               f"{num_subcenters} in this run (num_subcenters); only files with one center per "
                               f"identity or with this run's count can start it")
    class_start, num_local = partition_classes(num_classes, rank, world_size)
    weight = take_rows(shards, class_start, num_local)[0].to(torch.float32)
    if saved == num_subcenters:
        return weight
    return expand_to_subcenters(weight, class_start, num_subcenters, seed)
