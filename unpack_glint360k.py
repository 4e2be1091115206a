"""Unpack insightface .rec datasets (Glint360K, MS1MV3, ...) into identity folders.

    python unpack_glint360k.py DATA_DIR OUT_DIR                  # DATA_DIR holds train.rec + train.idx
    python unpack_glint360k.py ROOT OUT_DIR --include glint360k,ms1m-retinaface-t1
    python unpack_glint360k.py DATA_DIR --verify                 # check the published md5 sums only

Each identity becomes ``OUT_DIR/id_<label>/<label>_<n>.jpg`` (n counts from 0 in record order; a PNG
payload keeps its ``.png`` suffix). Image bytes are written unchanged, so repacking with
``python -m partialfc.tools.im2rec OUT_DIR NEW_DIR`` gives back the same images and labels. With
``--include a,b`` the datasets ``ROOT/a`` and ``ROOT/b`` go to ``OUT_DIR/a`` and ``OUT_DIR/b``.

The run is resumable: an identity is written to ``id_<label>.partial`` and renamed when complete, so a
rerun skips finished identities and redoes an interrupted one.
"""
import argparse
import hashlib
import os
import shutil
import sys
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from partialfc.data.datasets import IndexedRecordDataset
from partialfc.data.fast_reader import RecFile
from partialfc.data.recordio import unpack
from partialfc.tools import ToolError, run_cli

# Published md5 sums of the Glint360K release files (two releases circulate).
GLINT360K_MD5 = {
    "release 1": {"train.rec": "2a74c71c4d20e770273f103eda97e878", "train.idx": "f7a3e98d3533ac481bdf3dc03a5416e8"},
    "release 2": {"train.rec": "8483be5af6f9906e19f85dee49132f8e", "train.idx": "5d9cd9f262ec87a5ca2eac5e703f7cdf"},
}


def md5_file(path, progress=True):
    h = hashlib.md5()
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"md5 {os.path.basename(path)}",
                                     disable=not progress) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify(data_dir, known=GLINT360K_MD5, progress=True):
    """md5 of train.rec and train.idx; returns (ok, report lines) naming the release each matched."""
    lines, ok = [], True
    for name in ("train.idx", "train.rec"):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            lines.append(f"{path}: missing")
            ok = False
            continue
        digest = md5_file(path, progress)
        match = [rel for rel, sums in known.items() if sums.get(name) == digest]
        if match:
            lines.append(f"{path}: md5 {digest} matches Glint360K {match[0]}")
        else:
            ok = False
            lines.append(f"{path}: md5 {digest} matches no published Glint360K sum "
                         f"({', '.join(f'{r}: {s[name]}' for r, s in known.items())})")
    return ok, lines


def _sniff_ext(buf):
    return ".png" if buf[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


_WORKER = {}


def _init_worker(rec_path):
    _WORKER["file"] = RecFile(rec_path)


def _write_identity(task):
    """Worker: write one identity's images into id_<label>.partial, then rename it to id_<label>."""
    out_dir, label, keys, offsets = task
    final = os.path.join(out_dir, f"id_{label}")
    if os.path.isdir(final):
        return 0
    part = final + ".partial"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    f = _WORKER["file"]
    for n, (key, off) in enumerate(zip(keys, offsets)):
        header, payload = unpack(f.record(off, key))
        with open(os.path.join(part, f"{label}_{n}{_sniff_ext(payload)}"), "wb") as fh:
            fh.write(payload)
    os.rename(part, final)
    return len(keys)


def unpack_dataset(data_dir, out_dir, num_workers=None, progress=True):
    rec = os.path.join(data_dir, "train.rec")
    if not os.path.isfile(rec):
        raise ToolError(f"{data_dir!r} has no train.rec")
    ds = IndexedRecordDataset(rec, os.path.join(data_dir, "train.idx"), random_flip=False)
    os.makedirs(out_dir, exist_ok=True)
    order = np.argsort(ds.labels, kind="stable")
    bounds = np.searchsorted(ds.labels[order], np.arange(ds.num_classes + 1))
    tasks = []
    for label in range(ds.num_classes):
        sel = order[bounds[label]:bounds[label + 1]]
        if len(sel) and not os.path.isdir(os.path.join(out_dir, f"id_{label}")):
            tasks.append((out_dir, label, ds.keys[sel].tolist(), ds.offsets[sel].tolist()))
    done = ds.num_classes - len(tasks)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    written = 0
    if workers > 1 and len(tasks) > 1:
        with Pool(workers, initializer=_init_worker, initargs=(rec,)) as pool:
            for n in tqdm(pool.imap_unordered(_write_identity, tasks, chunksize=16), total=len(tasks),
                          desc=f"unpack {os.path.basename(os.path.abspath(data_dir))}", unit="id",
                          disable=not progress):
                written += n
    else:
        _init_worker(rec)
        for t in tqdm(tasks, desc="unpack", unit="id", disable=not progress):
            written += _write_identity(t)
    return dict(identities=ds.num_classes, skipped=done, images_written=written)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python unpack_glint360k.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="dataset folder (train.rec + train.idx), or the root of --include")
    ap.add_argument("output", nargs="?", help="output folder of the identity folders")
    ap.add_argument("--include", default=None, help="comma-separated dataset folders under INPUT to unpack")
    ap.add_argument("--verify", action="store_true", help="check train.rec/train.idx against Glint360K's md5 sums")
    ap.add_argument("--num-workers", type=int, default=None, help="writer processes (default: cores, max 8)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.include.split(",") if s.strip()] if args.include else [None]
    dirs = [args.input if n is None else os.path.join(args.input, n) for n in names]
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "train.rec")):
            raise ToolError(f"{d!r} has no train.rec")
    status = 0
    if args.verify:
        for d in dirs:
            ok, lines = verify(d)
            print("\n".join(lines))
            status = status or (0 if ok else 1)
    if args.output:
        for name, d in zip(names, dirs):
            out = args.output if name is None else os.path.join(args.output, name)
            s = unpack_dataset(d, out, args.num_workers)
            print(f"{d}: {s['identities']} identities -> {out} ({s['images_written']} images written, "
                  f"{s['skipped']} identities already done)")
    elif not args.verify:
        raise ToolError("give an output folder, --verify, or both")
    return status


if __name__ == "__main__":
    sys.exit(run_cli(main))
