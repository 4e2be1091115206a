"""IJB-B / IJB-C 1:1 template verification (TAR at FAR), insightface's protocol.

Layout of ``--image-path`` (the ``IJBC`` or ``IJBB`` folder of insightface's IJB release)::

    loose_crop/<image>.jpg                   face images, not aligned
    meta/ijbc_name_5pts_score.txt            <image> x1 y1 ... x5 y5 <detector score>
    meta/ijbc_face_tid_mid.txt               <image> <template id> <media id>   (same order as above)
    meta/ijbc_template_pair_label.txt        <template 1> <template 2> <1 genuine | 0 impostor>

(``ijbb_*`` for IJB-B.) Each face is aligned to 112x112 with the ArcFace 5-point template, embedded
together with its horizontal flip (the two embeddings added), optionally multiplied by its detector
score, and pooled: faces of the same media (video frames) are averaged, the media features of a template
are summed and the sum is L2-normalized. Each pair is scored by the cosine of its two templates; TAR is
read off the ROC at FAR = 1e-6 ... 1e-1 (the ROC point whose FAR is closest, the highest TAR among
equally close points), as insightface's ``eval_ijbc.py`` reports it.

Command line::

    python -m partialfc.eval.ijb --model work_dirs/r50/model.pt --image-path /data/IJB_release/IJBC \
        --target IJBC --result-dir ijbc_r50 --batch-size 256 --workers 8
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .model_io import InputError
from .verification import forward_views, model_device_dtype

__all__ = [
    "FARS", "IJBFaces", "IJBFormatError", "check_image_path", "evaluate_ijb", "extract_features",
    "image2template_feature", "main", "read_landmarks", "read_template_media_list", "read_template_pair_list",
    "roc_curve_points", "tar_at_far", "template_pair_scores",
]

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class IJBFormatError(InputError):
    """An IJB folder, meta file or image that does not have the release's layout; the message names it."""


# --------------------------------------------------------------------------------------------------
# meta files
# --------------------------------------------------------------------------------------------------
def _require(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB file {path!r} does not exist")
    return path


def read_template_media_list(path):
    """``(names, templates, medias)`` from ``<image> <template id> <media id>`` lines."""
    names, templates, medias = [], [], []
    with open(_require(path)) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise IJBFormatError(f"{path}:{lineno}: expected '<image> <template id> <media id>', got {line.strip()!r}")
            try:
                templates.append(int(parts[1]))
                medias.append(int(parts[2]))
            except ValueError:
                raise IJBFormatError(f"{path}:{lineno}: template and media ids must be integers: {line.strip()!r}") from None
            names.append(parts[0])
    return names, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def read_template_pair_list(path):
    """``(t1, t2, label)`` int64 arrays from ``<template 1> <template 2> <label>`` lines."""
    try:
        pairs = np.loadtxt(_require(path), dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise IJBFormatError(f"{path}: expected '<template 1> <template 2> <label>' integer lines ({exc})") from None
    if pairs.shape[1] != 3:
        raise IJBFormatError(f"{path}: expected 3 integer columns, found {pairs.shape[1]}")
    labels = pairs[:, 2]
    if not np.isin(labels, (0, 1)).all():
        raise IJBFormatError(f"{path}: pair labels must be 0 or 1, found {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    return pairs[:, 0].copy(), pairs[:, 1].copy(), labels.copy()


def read_landmarks(path):
    """``(names, landmarks [N, 5, 2] float32, detector scores [N] float32)`` from the 5-point file."""
    names, lmks, scores = [], [], []
    with open(_require(path)) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 12:
                raise IJBFormatError(
                    f"{path}:{lineno}: expected '<image> x1 y1 ... x5 y5 <score>' (12 fields), got {len(parts)}")
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                raise IJBFormatError(f"{path}:{lineno}: landmarks and score must be numbers: {line.strip()!r}") from None
            names.append(parts[0])
            lmks.append(values[:10])
            scores.append(values[10])
    return names, np.asarray(lmks, dtype=np.float32).reshape(-1, 5, 2), np.asarray(scores, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# faces -> features
# --------------------------------------------------------------------------------------------------
class IJBFaces(Dataset):
    """Aligned 112x112 RGB uint8 faces (``[112, 112, 3]`` tensors) from ``loose_crop`` and landmarks."""

    def __init__(self, image_dir, names, landmarks, image_size=112):
        self.image_dir, self.names, self.landmarks = image_dir, list(names), np.asarray(landmarks)
        self.image_size = int(image_size)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        import cv2

        from partialfc.data.align import norm_crop

        path = os.path.join(self.image_dir, self.names[i])
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"IJB image {path} does not exist")
            raise IJBFormatError(f"IJB image {path} cannot be decoded; expected a JPEG/PNG face image")
        face = norm_crop(img, self.landmarks[i], self.image_size)
        return torch.from_numpy(np.ascontiguousarray(face[:, :, ::-1]))  # BGR -> RGB


def _worker_init(_):
    import cv2

    cv2.setNumThreads(1)


def extract_features(model, dataset, batch_size=128, workers=4, device=None, flip=True, progress=True):
    """Embeddings ``[N, D]`` float32 of a face dataset: image + flipped image (``flip``), else image only."""
    model_device, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
                        worker_init_fn=_worker_init if workers else None,
                        pin_memory=device.type == "cuda")
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else None
    feats = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it
    try:
        if is_module:
            model.eval()
        with torch.no_grad():
            for batch in tqdm(loader, desc="faces", unit="batch", disable=not progress):
                views = forward_views(model, batch, device, dtype, flip=flip)
                feats.append((views[0] + views[1] if flip else views[0]).cpu())
    finally:
        if is_module:
            model.train(was_training)
    return torch.cat(feats).numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------
# pooling, scores, ROC
# --------------------------------------------------------------------------------------------------
def _segment_sum(values, segment_ids, n_segments):
    """Sum rows of ``values`` by ``segment_ids`` (any order) -> ``[n_segments, D]`` float64."""
    order = np.argsort(segment_ids, kind="stable")
    ids = segment_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    out = np.zeros((n_segments, values.shape[1]), dtype=np.float64)
    out[ids[starts]] = np.add.reduceat(values[order].astype(np.float64), starts, axis=0)
    return out


def image2template_feature(img_feats, templates, medias):
    """Template features ``[T, D]`` (L2-normalized) and the sorted unique template ids ``[T]``.

    Faces sharing a (template, media) are averaged into one media feature; a template is the sum of its
    media features, then L2-normalized.
    """
    img_feats = np.asarray(img_feats)
    templates, medias = np.asarray(templates), np.asarray(medias)
    if not (img_feats.shape[0] == templates.shape[0] == medias.shape[0]):
        raise ValueError(f"{img_feats.shape[0]} features for {templates.shape[0]} template and "
                         f"{medias.shape[0]} media ids")
    unique_templates, t_idx = np.unique(templates, return_inverse=True)
    keys, m_idx = np.unique(np.stack([t_idx, medias], axis=1), axis=0, return_inverse=True)
    m_idx = m_idx.reshape(-1)
    media = _segment_sum(img_feats, m_idx, len(keys)) / np.bincount(m_idx, minlength=len(keys))[:, None]
    template = _segment_sum(media, keys[:, 0], len(unique_templates))
    norms = np.linalg.norm(template, axis=1, keepdims=True)
    return template / np.where(norms > 0, norms, 1.0), unique_templates


def template_pair_scores(template_feats, unique_templates, t1, t2, chunk=100000):
    """Cosine score of every template pair (``template_feats`` already L2-normalized)."""
    t1, t2 = np.asarray(t1), np.asarray(t2)

    def index_of(ids, which):
        pos = np.clip(np.searchsorted(unique_templates, ids), 0, len(unique_templates) - 1)
        bad = unique_templates[pos] != ids
        if bad.any():
            raise IJBFormatError(f"pair list names {which} templates without faces, e.g. {np.unique(ids[bad])[:5].tolist()}")
        return pos

    i1, i2 = index_of(t1, "first"), index_of(t2, "second")
    scores = np.empty(len(t1), dtype=np.float64)
    for s in range(0, len(t1), chunk):
        scores[s:s + chunk] = np.einsum("ij,ij->i", template_feats[i1[s:s + chunk]], template_feats[i2[s:s + chunk]])
    return scores


def roc_curve_points(labels, scores):
    """ROC points ``(fpr, tpr, thresholds)`` of a binary score, with collinear points dropped.

    Points are taken at each distinct score (descending), preceded by the origin; a point is dropped when
    it lies on the straight segment between its neighbours (the same point set as ``sklearn``'s
    ``roc_curve`` with its default ``drop_intermediate=True``, which insightface's numbers come from).
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.size != scores.size:
        raise ValueError(f"{labels.size} labels for {scores.size} scores")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError("the ROC needs both genuine (1) and impostor (0) pairs")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y)[last_of_value].astype(np.float64)
    fps = (last_of_value + 1) - tps
    thr = s[last_of_value]
    if tps.size > 2:
        bend = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps, thr = tps[bend], fps[bend], thr[bend]
    tps, fps, thr = np.r_[0.0, tps], np.r_[0.0, fps], np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def tar_at_far(fpr, tpr, fars=FARS):
    """TAR at the ROC point whose FAR is closest to each target (ties: the highest TAR)."""
    fpr_r, tpr_r = np.asarray(fpr)[::-1], np.asarray(tpr)[::-1]  # descending: ties go to the higher TAR
    return {float(far): float(tpr_r[int(np.argmin(np.abs(fpr_r - far)))]) for far in fars}


def _auc(fpr, tpr):
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def format_table(name, tars):
    head = "Methods".ljust(24) + "".join(f"{far:>9.0e}" for far in tars)
    row = name[:23].ljust(24) + "".join(f"{100.0 * v:>9.2f}" for v in tars.values())
    return head + "\n" + row


def save_roc_plot(path, curves, title):
    """Semilog ROC plot (PNG) of ``{label: (fpr, tpr)}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, 1e-7), tpr, lw=1.5, label=f"{label} (AUC = {100 * _auc(fpr, tpr):.2f}%)")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1e-1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xticks(list(FARS))
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------------
# the whole protocol
# --------------------------------------------------------------------------------------------------
def evaluate_ijb(model, image_path, target="IJBC", result_dir=None, batch_size=128, workers=4, device=None,
                 use_detector_score=False, use_norm_score=True, flip=True, name="model", progress=True):
    """Run the IJB-B/C 1:1 protocol; returns a dict with ``tar`` ({FAR: TAR}), ``auc``, ``scores``,
    ``labels``, the ROC and, when ``result_dir`` is set, the paths of the files written there."""
    target = target.upper()
    if target not in ("IJBC", "IJBB"):
        raise ValueError(f"target must be IJBC or IJBB, got {target!r}")
    low = target.lower()
    meta = os.path.join(image_path, "meta")
    timings = {}
    t0 = time.time()
    names_tm, templates, medias = read_template_media_list(os.path.join(meta, f"{low}_face_tid_mid.txt"))
    t1, t2, labels = read_template_pair_list(os.path.join(meta, f"{low}_template_pair_label.txt"))
    lmk_path = os.path.join(meta, f"{low}_name_5pts_score.txt")
    names, landmarks, det_scores = read_landmarks(lmk_path)
    if len(names) != len(names_tm):
        raise IJBFormatError(f"{lmk_path} lists {len(names)} faces but {low}_face_tid_mid.txt lists {len(names_tm)}")
    mismatch = [i for i, (a, b) in enumerate(zip(names, names_tm)) if a != b]
    if mismatch:
        i = mismatch[0]
        raise IJBFormatError(f"{lmk_path}:{i + 1}: image {names[i]!r} but {low}_face_tid_mid.txt line {i + 1} "
                             f"names {names_tm[i]!r}; the two lists must be in the same order")
    timings["read_meta_s"] = time.time() - t0

    t0 = time.time()
    dataset = IJBFaces(os.path.join(image_path, "loose_crop"), names, landmarks)
    feats = extract_features(model, dataset, batch_size, workers, device, flip=flip, progress=progress)
    timings["features_s"] = time.time() - t0

    t0 = time.time()
    feats = feats.astype(np.float64)
    if not use_norm_score:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = feats / np.where(norms > 0, norms, 1.0)
    if use_detector_score:
        feats = feats * det_scores[:, None].astype(np.float64)
    template_feats, unique_templates = image2template_feature(feats, templates, medias)
    scores = template_pair_scores(template_feats, unique_templates, t1, t2)
    fpr, tpr, thr = roc_curve_points(labels, scores)
    tars = tar_at_far(fpr, tpr)
    timings["scores_s"] = time.time() - t0

    result = dict(target=target, tar=tars, auc=_auc(fpr, tpr), scores=scores, labels=labels, fpr=fpr, tpr=tpr,
                  thresholds=thr, num_faces=len(names), num_templates=len(unique_templates),
                  num_pairs=len(labels), timings=timings, table=format_table(name, tars))
    if result_dir:
        os.makedirs(result_dir, exist_ok=True)
        result["scores_path"] = os.path.join(result_dir, f"{low}.npy")
        np.save(result["scores_path"], scores.astype(np.float32))
        result["roc_path"] = os.path.join(result_dir, f"{low}_roc.png")
        save_roc_plot(result["roc_path"], {name: (fpr, tpr)}, f"ROC on {target}")
        result["json_path"] = os.path.join(result_dir, f"{low}_tar_far.json")
        with open(result["json_path"], "w") as f:
            json.dump({"target": target, "model": name, "auc": result["auc"],
                       "tar_at_far": {f"{k:.0e}": v for k, v in tars.items()},
                       "use_detector_score": bool(use_detector_score), "use_norm_score": bool(use_norm_score),
                       "flip": bool(flip), "num_faces": len(names), "num_templates": len(unique_templates),
                       "num_pairs": len(labels)}, f, indent=2)
    return result


def check_image_path(image_path, target):
    """Raise :class:`IJBFormatError` (or ``FileNotFoundError``) naming what ``image_path`` lacks of the layout
    in this module's docstring for ``target``: the folder, ``meta/`` and its three lists, ``loose_crop/`` and
    the images the landmark list names. Cheap next to the evaluation: one listing of ``loose_crop``."""
    low = target.lower()
    expected = f"the {target} folder of the IJB release, holding loose_crop/ and meta/{low}_*.txt"
    if not os.path.isdir(image_path):
        what = "is a file" if os.path.exists(image_path) else "does not exist"
        raise FileNotFoundError(f"--image-path {image_path} {what}; expected {expected}")
    meta, crops = os.path.join(image_path, "meta"), os.path.join(image_path, "loose_crop")
    for folder in (meta, crops):
        if not os.path.isdir(folder):
            raise IJBFormatError(f"{image_path} has no {os.path.basename(folder)}/ folder; expected {expected}")
    lists = [f"{low}_name_5pts_score.txt", f"{low}_face_tid_mid.txt", f"{low}_template_pair_label.txt"]
    absent = [name for name in lists if not os.path.isfile(os.path.join(meta, name))]
    if absent:
        other = "IJBB" if target == "IJBC" else "IJBC"
        hint = (f"; it holds {other.lower()}_* lists: pass --target {other}"
                if os.path.isfile(os.path.join(meta, f"{other.lower()}_face_tid_mid.txt")) else "")
        raise IJBFormatError(f"{meta} lacks {', '.join(absent)}{hint}")
    lmk_path = os.path.join(meta, lists[0])
    with open(lmk_path, errors="replace") as f:
        names = [line.split(None, 1)[0] for line in f if line.strip()]
    present = set(os.listdir(crops))
    missing = [n for n in names if n not in present and not os.path.isfile(os.path.join(crops, n))]
    if missing:
        raise FileNotFoundError(f"{crops} lacks {len(missing)} of the {len(names)} images {lmk_path} names, "
                                f"e.g. {', '.join(missing[:3])}")


def _one_line(exc):
    """The message of ``exc`` on one line: an error raised in a DataLoader worker comes back with the worker's
    traceback in its message; its last line is the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(exc).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.splitlines())


def main(argv=None):
    """The command line. Returns :func:`evaluate_ijb`'s result; bad input (a missing or unusable model, an
    ``--image-path`` without the release's layout, an unreadable image) prints one ``error: ...`` line naming
    it on stderr and exits with status 1."""
    parser = argparse.ArgumentParser(prog="python -m partialfc.eval.ijb",
                                     description="IJB-B / IJB-C 1:1 verification, TAR at FAR.")
    parser.add_argument("--model", required=True, help="backbone state_dict (model.pt) or exported .onnx")
    parser.add_argument("--image-path", required=True, help="the IJBC (or IJBB) folder: loose_crop/ and meta/")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--result-dir", default=".", help="where the scores .npy, ROC .png and json go")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4, help="processes decoding and aligning faces")
    parser.add_argument("--use-detector-score", action="store_true",
                        help="weight each face feature by its detector score (insightface's D1 mode)")
    parser.add_argument("--no-norm-score", action="store_true",
                        help="L2-normalize each face feature before pooling (drop insightface's N1 mode)")
    parser.add_argument("--no-flip", action="store_true", help="embed the image only, not image + flip")
    parser.add_argument("--network", default=None)
    parser.add_argument("--embedding-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (InputError, OSError) as exc:  # bad input; anything else is a bug: traceback
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def _run(args):
    from .model_io import load_eval_model, resolve_device

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}")
    check_image_path(args.image_path, args.target)  # before the model loads, and the faces are embedded
    device = resolve_device(args.device)
    model, desc = load_eval_model(args.model, args.network, args.embedding_size, device)
    if not isinstance(model, torch.nn.Module):
        device = torch.device("cpu")
    name = os.path.splitext(os.path.basename(args.model))[0]
    print(f"model: {desc}")
    res = evaluate_ijb(model, args.image_path, args.target, args.result_dir, args.batch_size, args.workers, device,
                       use_detector_score=args.use_detector_score, use_norm_score=not args.no_norm_score,
                       flip=not args.no_flip, name=name, progress=sys.stderr.isatty())
    print(f"{res['num_faces']} faces, {res['num_templates']} templates, {res['num_pairs']} pairs; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()))
    print(res["table"])
    print(f"AUC: {100 * res['auc']:.4f}%   written: {res['scores_path']}, {res['roc_path']}, {res['json_path']}")
    return res


if __name__ == "__main__":
    main()
