"""Pack face images into an insightface-layout RecordIO dataset.

    python -m partialfc.tools.im2rec IMAGE_FOLDER OUT_DIR
    python -m partialfc.tools.im2rec LIST.lst OUT_DIR --root IMAGE_ROOT

IMAGE_FOLDER has one sub-folder per identity (``id_<n>`` folders are ordered numerically, other names
lexically). A ``.lst`` has MXNet im2rec lines ``index<TAB>label<TAB>relative/path.jpg``; its labels are
remapped to 0..K-1 in sorted order. OUT_DIR receives ``train.rec``, ``train.idx`` and ``property``
(``num_classes,112,112``) in the layout insightface's loaders expect: record 0 is a header whose label is
(first identity key, end key), images have keys 1..N sorted by identity, then one record per identity
holding its image key range.

A JPEG that already is 112x112 is stored unchanged; any other image is decoded, resized to 112x112 and
encoded as JPEG (``--quality``), or always so with ``--reencode``.
"""
import argparse
import os
import sys
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

from partialfc.data import recordio
from partialfc.data.datasets import IMAGE_EXTENSIONS, sort_class_names
from partialfc.fileio import removed_on_failure, write_atomic
from partialfc.tools import ToolError, read_text_lines, run_cli

SIZE = 112


def list_folder(root):
    """[(path, label)] with identities sorted and labels contiguous, as the image-folder dataset."""
    if not os.path.isdir(root):
        raise ToolError(f"input {root!r} is neither an image folder nor a .lst file")
    items, label = [], 0
    for name in sort_class_names(e.name for e in os.scandir(root) if e.is_dir()):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if files:
            items.extend((os.path.join(root, name, f), label) for f in files)
            label += 1
    if not items:
        raise ToolError(f"image folder {root!r} has no identity sub-folders with images")
    return items


def read_lst(path, root):
    rows = []
    for lineno, line in enumerate(read_text_lines(path, "list file"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ToolError(f"{path!r} line {lineno}: expected 'index<TAB>label<TAB>path', got {line.strip()!r}")
        try:
            label = float(parts[1])
        except ValueError:
            raise ToolError(f"{path!r} line {lineno}: label {parts[1]!r} is not a number") from None
        if label != int(label):
            raise ToolError(f"{path!r} line {lineno}: label {parts[1]!r} is not an integer identity")
        rows.append((os.path.join(root, parts[-1]), int(label)))
    if not rows:
        raise ToolError(f"list file {path!r} is empty")
    remap = {lab: i for i, lab in enumerate(sorted({lab for _, lab in rows}))}
    order = sorted(range(len(rows)), key=lambda i: (remap[rows[i][1]], i))
    return [(rows[i][0], remap[rows[i][1]]) for i in order]


def encode(task):
    """Worker: (path, reencode, quality) -> JPEG bytes of a 112x112 image, or an error string."""
    path, reencode, quality = task
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        return None, f"cannot read {path!r}: {e}"
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR) if buf else None
    if img is None:
        return None, f"cannot decode image {path!r}"
    is_jpeg = buf[:3] == b"\xff\xd8\xff"
    if is_jpeg and not reencode and img.shape[:2] == (SIZE, SIZE):
        return buf, None
    if img.shape[:2] != (SIZE, SIZE):
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return enc.tobytes(), None


def pack_dataset(items, out_dir, quality=95, reencode=False, num_workers=None, skip_corrupt=False,
                 progress=True):
    """Write ``items`` [(path, label)] (sorted by label, labels 0..K-1) as train.rec/train.idx/property."""
    labels = np.asarray([lab for _, lab in items], dtype=np.int64)
    if len(labels) and (np.any(np.diff(labels) < 0) or labels[0] != 0 or np.any(np.diff(labels) > 1)):
        raise ToolError("items must be sorted by label with contiguous labels starting at 0")
    os.makedirs(out_dir, exist_ok=True)
    rec_path, idx_path = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    tmp_rec, tmp_idx = rec_path + ".tmp", idx_path + ".tmp"
    # a corrupt image or a full disk part way leaves no .tmp behind
    with removed_on_failure(rec_path, tmp_rec, tmp_idx):
        n, num_classes, skipped = _write_records(items, tmp_rec, tmp_idx, quality, reencode, num_workers,
                                                 skip_corrupt, progress)
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
    write_atomic(os.path.join(out_dir, "property"), lambda f: f.write(f"{num_classes},{SIZE},{SIZE}\n"), mode="w")
    return dict(images=n, num_classes=num_classes, skipped=skipped)


def _write_records(items, tmp_rec, tmp_idx, quality, reencode, num_workers, skip_corrupt, progress):
    """The records of :func:`pack_dataset` into the temporary files; ``(images, identities, skipped)``."""
    writer = recordio.MXIndexedRecordIO(tmp_idx, tmp_rec, "w")
    # record 0 is rewritten once the image count is known; reserve it with the right size
    n_total = len(items)
    writer.write_idx(0, recordio.pack(recordio.IRHeader(2, [0, 0], 0, 0), b""))
    kept_labels = []
    skipped = 0
    tasks = [(p, reencode, quality) for p, _ in items]
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    pool = Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode, tasks, chunksize=64) if pool else map(encode, tasks)
        bar = tqdm(results, total=n_total, desc="im2rec", unit="img", disable=not progress)
        for (path, label), (buf, err) in zip(items, bar):
            if err is not None:
                if not skip_corrupt:
                    raise ToolError(err + " (use --skip-corrupt to leave such images out)")
                skipped += 1
                continue
            key = len(kept_labels) + 1
            writer.write_idx(key, recordio.pack(recordio.IRHeader(0, float(label), key, 0), buf))
            kept_labels.append(label)
    finally:
        if pool:
            pool.terminate()
    kept = np.asarray(kept_labels, dtype=np.int64)
    present = np.unique(kept)
    if len(present) != (int(kept.max()) + 1 if len(kept) else 0):
        # an identity lost all its images to --skip-corrupt; labels would no longer be contiguous
        raise ToolError(f"{int(kept.max()) + 1 - len(present)} identities have no decodable image left; "
                        f"remove them from the input")
    n = len(kept)
    num_classes = len(present)
    starts = np.searchsorted(kept, np.arange(num_classes), side="left")
    ends = np.searchsorted(kept, np.arange(num_classes), side="right")
    for c in range(num_classes):
        writer.write_idx(n + 1 + c, recordio.pack(recordio.IRHeader(2, [starts[c] + 1, ends[c] + 1], 0, 0), b""))
    writer.close()
    header0 = recordio.encode_record(recordio.pack(recordio.IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b""))
    with open(tmp_rec, "r+b") as f:      # same length as the placeholder, so offsets stay valid
        f.write(header0)
    return n, num_classes, skipped


def main(argv=None):
    """The command line; bad input is one ``error: ...`` line on stderr and exit status 1."""
    return run_cli(_main, argv)


def _main(argv):
    ap = argparse.ArgumentParser(prog="python -m partialfc.tools.im2rec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="image folder (one sub-folder per identity) or a .lst file")
    ap.add_argument("output", help="output folder for train.rec, train.idx and property")
    ap.add_argument("--root", default=None, help="folder the .lst paths are relative to (default: its folder)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality when an image is (re)encoded")
    ap.add_argument("--reencode", action="store_true", help="re-encode every image, even 112x112 JPEGs")
    ap.add_argument("--num-workers", type=int, default=None, help="decode/encode processes (default: cores, max 8)")
    ap.add_argument("--skip-corrupt", action="store_true", help="leave undecodable images out instead of failing")
    args = ap.parse_args(argv)
    if os.path.isfile(args.input) and args.input.endswith(".lst"):
        items = read_lst(args.input, args.root or os.path.dirname(os.path.abspath(args.input)))
    elif os.path.isdir(args.input):
        items = list_folder(args.input)
    else:
        raise ToolError(f"input {args.input!r} is neither an image folder nor a .lst file")
    stats = pack_dataset(items, args.output, args.quality, args.reencode, args.num_workers, args.skip_corrupt)
    print(f"packed {stats['images']} images of {stats['num_classes']} identities into {args.output}"
          + (f" ({stats['skipped']} corrupt images left out)" if stats["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
