"""Resumable checkpoints that a crash during a save cannot tear.

Layout under ``OUTPUT/checkpoints/step_<N>/``:

- ``rank_<r>.pt`` on every rank: its class-center shard, the SparseSGD momentum, the head's sampler state
  and the rank's RNG states;
- ``trainer.pt`` on rank 0: backbone, backbone optimizer, LR schedulers, grad scaler, step, epoch and the
  config;
- ``MANIFEST.json``, written by rank 0 last, after every rank has finished its files: it lists them with
  their sizes. A step folder without a manifest, or whose files do not match it, is ignored.

Every file is written to a temporary name and renamed, so a reader sees either the old file or the whole
new one. ``torch.load(weights_only=True)`` reads everything back.
"""
import json
import os
import re
import shutil

import torch

from .fileio import write_atomic

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj, path):
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def step_dir(output, step):
    return os.path.join(output, "checkpoints", f"step_{step}")


def _is_complete(folder):
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, OSError):
        return False
    return all(os.path.isfile(os.path.join(folder, name)) and os.path.getsize(os.path.join(folder, name)) == size
               for name, size in files.items())


def latest_complete(output):
    """The newest complete checkpoint folder under ``output``, or None."""
    root = os.path.join(output, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted((int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m), reverse=True)
    for step in steps:
        folder = step_dir(output, step)
        if _is_complete(folder):
            return folder
    return None


def write_manifest(folder, world_size, step, keep=2):
    """Rank 0, after a barrier: seal ``folder`` and drop complete checkpoints older than the last ``keep``."""
    names = [f"rank_{r}.pt" for r in range(world_size)] + ["trainer.pt"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise RuntimeError(f"checkpoint {folder} is missing {missing}; not sealing it")
    files = {n: os.path.getsize(os.path.join(folder, n)) for n in names}
    write_json_atomic({"step": step, "world_size": world_size, "files": files}, os.path.join(folder, MANIFEST))
    root = os.path.dirname(folder)
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m)
    for old in steps[:-keep] if keep else []:
        if old < step:
            shutil.rmtree(step_dir(os.path.dirname(root), old), ignore_errors=True)


def load(path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)
