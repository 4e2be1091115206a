"""Build an insightface verification ``.bin`` from a pairs list.

    python -m partialfc.tools.make_bin PAIRS.txt OUT.bin [--root DIR] [--landmarks LMK.txt]

PAIRS.txt has one pair per line: ``path1 path2 same`` with ``same`` 1/0 (or true/false, same/diff);
paths are relative to ``--root`` (default: the pairs file's folder). LMK.txt, optional, has lines
``path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5`` (left eye, right eye, nose, left and right mouth corner): those
images are aligned to the ArcFace template with ``partialfc.data.align.norm_crop``; the others are
resized to 112x112. The output is a pickle of ``(list of JPEG bytes, list of bool)`` holding
``path1, path2`` of every pair in order — the format of lfw.bin, cfp_fp.bin and agedb_30.bin.
"""
import argparse
import os
import pickle
import sys
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

from partialfc.fileio import write_atomic
from partialfc.tools import ToolError, read_text_lines, run_cli

SIZE = 112
_TRUE = {"1", "true", "same", "yes"}
_FALSE = {"0", "false", "diff", "different", "no", "-1"}


def read_pairs(path, root):
    pairs = []
    for lineno, line in enumerate(read_text_lines(path, "pairs file"), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 3 or parts[2].lower() not in _TRUE | _FALSE:
            raise ToolError(f"{path!r} line {lineno}: expected 'path1 path2 same(1/0)', got {line.strip()!r}")
        pairs.append((os.path.join(root, parts[0]), os.path.join(root, parts[1]), parts[2].lower() in _TRUE))
    if not pairs:
        raise ToolError(f"pairs file {path!r} holds no pairs")
    return pairs


def read_landmarks(path, root):
    out = {}
    for lineno, line in enumerate(read_text_lines(path, "landmarks file"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 11:
            raise ToolError(f"{path!r} line {lineno}: expected 'path' and 10 coordinates, got {len(parts)} fields")
        try:
            pts = np.asarray([float(v) for v in parts[1:]], dtype=np.float32).reshape(5, 2)
        except ValueError:
            raise ToolError(f"{path!r} line {lineno}: landmark coordinates must be numbers") from None
        out[os.path.normpath(os.path.join(root, parts[0]))] = pts
    return out


def _norm_crop():
    try:
        from partialfc.data.align import norm_crop
    except ImportError:
        return None
    return norm_crop


def encode_face(task):
    """Worker: (path, landmarks or None, quality) -> (JPEG bytes of the 112x112 face, error)."""
    path, lmk, quality = task
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        return None, f"cannot read image {path!r}"
    crop = _norm_crop() if lmk is not None else None
    if crop is not None:
        img = crop(img, lmk, SIZE)
    elif img.shape[:2] != (SIZE, SIZE):
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes(), None


def make_bin(pairs, out_path, landmarks=None, quality=95, num_workers=None, progress=True):
    landmarks = landmarks or {}
    paths = [p for a, b, _ in pairs for p in (a, b)]
    tasks = [(p, landmarks.get(os.path.normpath(p)), quality) for p in paths]
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1 and len(tasks) > 64:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(encode_face, tasks, chunksize=32), total=len(tasks), desc="make_bin",
                                unit="img", disable=not progress))
    else:
        results = [encode_face(t) for t in tqdm(tasks, desc="make_bin", unit="img", disable=not progress)]
    bins = []
    for buf, err in results:
        if err:
            raise ToolError(err)
        bins.append(buf)
    issame = [bool(s) for _, _, s in pairs]
    write_atomic(out_path, lambda f: pickle.dump((bins, issame), f, protocol=4))
    return dict(pairs=len(pairs), same=sum(issame), aligned=sum(t[1] is not None for t in tasks))


def main(argv=None):
    """The command line; bad input is one ``error: ...`` line on stderr and exit status 1."""
    return run_cli(_main, argv)


def _main(argv):
    ap = argparse.ArgumentParser(prog="python -m partialfc.tools.make_bin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", help="pairs list: 'path1 path2 same' per line")
    ap.add_argument("output", help="output .bin file")
    ap.add_argument("--root", default=None, help="folder the paths are relative to (default: the pairs file's)")
    ap.add_argument("--landmarks", default=None, help="optional 5-point landmarks file for alignment")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality")
    ap.add_argument("--num-workers", type=int, default=None)
    args = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):  # before the images are encoded, not after
        raise ToolError(f"the folder of the output {args.output!r} does not exist")
    root = args.root or os.path.dirname(os.path.abspath(args.pairs))
    lmk = read_landmarks(args.landmarks, root) if args.landmarks else None
    if lmk and _norm_crop() is None:
        print("warning: partialfc.data.align.norm_crop is unavailable; landmark images are only resized")
    s = make_bin(read_pairs(args.pairs, root), args.output, lmk, args.quality, args.num_workers)
    print(f"wrote {s['pairs']} pairs ({s['same']} same) to {args.output}; {s['aligned']} images aligned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
