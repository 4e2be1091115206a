"""IJB-B / IJB-C 1:1 template verification (TAR at FAR) and 1:N identification, insightface's protocols.

Layout of ``--image-path`` (the ``IJBC`` or ``IJBB`` folder of insightface's IJB release)::

    loose_crop/<image>.jpg                   face images, not aligned
    meta/ijbc_name_5pts_score.txt            <image> x1 y1 ... x5 y5 <detector score>
    meta/ijbc_face_tid_mid.txt               <image> <template id> <media id>   (same order as above)
    meta/ijbc_template_pair_label.txt        <template 1> <template 2> <1 genuine | 0 impostor>   (1:1)
    meta/ijbc_1N_gallery_G1.csv              TEMPLATE_ID,SUBJECT_ID,FILENAME,... header, a row per image (1:N)
    meta/ijbc_1N_gallery_G2.csv              the same columns, the second gallery                    (1:N)
    meta/ijbc_1N_probe_mixed.csv             the same columns, the probe templates                   (1:N)

(``ijbb_*`` for IJB-B, whose galleries are ``ijbb_1N_gallery_S1.csv`` and ``..._S2.csv``.) Each face is
aligned to 112x112 with the ArcFace 5-point template, embedded together with its horizontal flip (the two
embeddings added), optionally multiplied by its detector score, and pooled: faces of the same media (video
frames) are averaged, the media features of a template are summed and the sum is L2-normalized. Each pair is scored by the cosine of its two templates; TAR is
read off the ROC at FAR = 1e-6 ... 1e-1 (the ROC point whose FAR is closest, the highest TAR among
equally close points), as insightface's ``eval_ijbc.py`` reports it.

1:N identification (``--mode 1:N``) pools the gallery and probe templates the same way and searches every
probe template in each gallery (G1, G2 and their union): rank-1/5/10 rates of the probes whose subject is
enrolled, and TPIR at FPIR = 0.01 and 0.1 with the non-mated probes setting the threshold (definitions in
docs/evaluation.md and :func:`evaluate_identification`).

Command line::

    python -m partialfc.eval.ijb --model work_dirs/r50/model.pt --image-path /data/IJB_release/IJBC \
        --target IJBC --result-dir ijbc_r50 --batch-size 256 --workers 8 [--mode 1:1|1:N|both]
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
    "FARS", "FPIRS", "RANKS", "IJBFaces", "IJBFormatError", "check_image_path", "cmc_curve", "det_curve",
    "evaluate_identification", "evaluate_ijb", "evaluate_ijb_1n", "extract_features", "identification_1n",
    "identification_lists", "ijb_face_features", "image2template_feature", "main", "read_face_lists",
    "read_landmarks",
    "read_template_media_list", "read_template_pair_list", "read_template_subject_list", "roc_curve_points",
    "search_gallery", "tar_at_far", "template_pair_scores", "tpir_at_fpir",
]

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
MODES = ("1:1", "1:N", "both")


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


def identification_lists(target):
    """The 1:N meta lists of ``target``: ``({gallery name: file name}, probe file name)``.

    IJB-C names its two galleries G1 and G2, IJB-B S1 and S2; both search ``<target>_1N_probe_mixed.csv``.
    """
    low = target.lower()
    galleries = ("G1", "G2") if target.upper() == "IJBC" else ("S1", "S2")
    return {g: f"{low}_1N_gallery_{g}.csv" for g in galleries}, f"{low}_1N_probe_mixed.csv"


def read_template_subject_list(path):
    """``(templates, subjects)``: the sorted unique template ids of a 1:N csv and the subject of each.

    The csv has a header naming ``TEMPLATE_ID`` and ``SUBJECT_ID`` (other columns are ignored) and one row per
    image, so a template comes back once; rows of one template that name different subjects are an error.
    """
    import csv

    subject_of = {}
    with open(_require(path), newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM before the header
        reader = csv.reader(f)
        header = next(reader, None)
        columns = [c.strip().upper() for c in header or []]
        if "TEMPLATE_ID" not in columns or "SUBJECT_ID" not in columns:
            raise IJBFormatError(f"{path}: expected a header line naming TEMPLATE_ID and SUBJECT_ID, "
                                 f"got {','.join(header or [])!r}")
        ti, si = columns.index("TEMPLATE_ID"), columns.index("SUBJECT_ID")
        for lineno, row in enumerate(reader, 2):
            if not row or not "".join(row).strip():
                continue
            try:
                template, subject = int(row[ti]), int(row[si])
            except (IndexError, ValueError):
                raise IJBFormatError(f"{path}:{lineno}: TEMPLATE_ID and SUBJECT_ID must be integers: "
                                     f"{','.join(row)!r}") from None
            if subject_of.setdefault(template, subject) != subject:
                raise IJBFormatError(f"{path}:{lineno}: template {template} is listed with subjects "
                                     f"{subject_of[template]} and {subject}")
    if not subject_of:
        raise IJBFormatError(f"{path}: lists no templates")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    return templates, np.array([subject_of[t] for t in templates.tolist()], dtype=np.int64)


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
    fig, ax = _plot_figure()
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


def _plot_figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5.5), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def save_det_plot(path, curves, title):
    """Log-log DET plot (PNG) of ``{label: (fpir, fnir)}``; zero rates are drawn at the axes' floor."""
    fig, ax = _plot_figure()
    floor = min([1e-4] + [0.5 * float(np.min(f[f > 0])) for f, _ in curves.values() if (f > 0).any()])
    for label, (fpir, fnir) in curves.items():
        ax.plot(np.maximum(fpir, floor), np.maximum(fnir, floor), lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.0)
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Identification Rate")
    ax.set_ylabel("False Negative Identification Rate")
    ax.set_title(title)
    if curves:
        ax.legend(loc="upper right")
    else:  # every probe is mated in every gallery: FPIR is undefined
        ax.text(0.5, 0.5, "no non-mated probes", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, format="png")


def save_cmc_plot(path, curves, title):
    """CMC plot (PNG) of ``{label: identification rate at ranks 1, 2, ...}``."""
    fig, ax = _plot_figure()
    for label, rates in curves.items():
        ax.plot(np.arange(1, len(rates) + 1), rates, lw=1.5, marker=".",
                label=f"{label} (rank-1 {100 * rates[0]:.2f}%)")
    ax.set_xlim(1, max(len(r) for r in curves.values()) + 0.5)
    ax.set_ylim(0.0, 1.0)
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification Rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------------
# 1:N identification
# --------------------------------------------------------------------------------------------------
def search_gallery(probe_feats, probe_subjects, gallery_feats, gallery_subjects, chunk=2048):
    """Search each probe in a gallery; returns ``(top, mate_score, mate_rank)`` per probe.

    A subject's score is the highest cosine between the probe and that subject's gallery templates (one
    template per subject in IJB-B/C). ``top`` is the best subject score. For a mated probe (its subject is
    enrolled), ``mate_score`` is its subject's score and ``mate_rank`` the number of enrolled subjects scoring
    at least as high, the mate included: a tie with another subject counts against the mate. Non-mated
    probes get ``mate_score`` NaN and ``mate_rank`` 0. Features must be L2-normalized; probes are scored
    ``chunk`` at a time so the ``[P, G]`` score matrix is never held whole.
    """
    probe_feats, gallery_feats = np.asarray(probe_feats, np.float64), np.asarray(gallery_feats, np.float64)
    probe_subjects, gallery_subjects = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    if probe_feats.shape[0] != probe_subjects.shape[0] or gallery_feats.shape[0] != gallery_subjects.shape[0]:
        raise ValueError(f"{probe_feats.shape[0]} probe features for {probe_subjects.shape[0]} subjects, "
                         f"{gallery_feats.shape[0]} gallery features for {gallery_subjects.shape[0]} subjects")
    if gallery_feats.shape[0] == 0:
        raise ValueError("the gallery is empty")
    order = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[order]
    starts = np.flatnonzero(np.r_[True, sorted_subjects[1:] != sorted_subjects[:-1]])
    subjects = sorted_subjects[starts]
    gallery_t = gallery_feats[order].T
    col = np.clip(np.searchsorted(subjects, probe_subjects), 0, len(subjects) - 1)
    mated = subjects[col] == probe_subjects
    n = probe_feats.shape[0]
    top, mate_score, mate_rank = np.empty(n), np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    for s in range(0, n, chunk):
        sims = probe_feats[s:s + chunk] @ gallery_t
        by_subject = np.maximum.reduceat(sims, starts, axis=1) if len(starts) < sims.shape[1] else sims
        top[s:s + chunk] = by_subject.max(axis=1)
        rows = np.flatnonzero(mated[s:s + chunk])
        mate = by_subject[rows, col[s:s + chunk][rows]]
        mate_score[s + rows] = mate
        mate_rank[s + rows] = (by_subject[rows] >= mate[:, None]).sum(axis=1)
    return top, mate_score, mate_rank


def _threshold_at_fpir(nonmated_top, fpir):
    """The lowest threshold ``t`` among the non-mated top scores (or -inf) with ``mean(top > t) <= fpir``."""
    desc = np.sort(np.asarray(nonmated_top, np.float64))[::-1]
    allowed = int(np.floor(fpir * desc.size + 1e-9))  # non-mated probes that may score above the threshold
    return float(desc[allowed]) if allowed < desc.size else -np.inf


def tpir_at_fpir(top, mate_score, mate_rank, fpirs=FPIRS):
    """``{FPIR: (TPIR, threshold, FPIR reached)}`` of one gallery search (:func:`search_gallery`'s output).

    The non-mated probes set the threshold ``t``: the lowest of their top scores (or -inf) at which the
    fraction of them whose top score exceeds ``t`` is at most the target FPIR. TPIR is the fraction of mated
    probes whose mate is rank 1 and scores above ``t``. NaN where there are no mated or no non-mated probes.
    """
    mated = np.asarray(mate_rank) > 0
    nonmated_top = np.asarray(top)[~mated]
    hits = np.asarray(mate_score)[mated & (np.asarray(mate_rank) == 1)]
    out = {}
    for fpir in fpirs:
        if not mated.any() or nonmated_top.size == 0:
            out[float(fpir)] = (float("nan"), float("nan"), float("nan"))
            continue
        t = _threshold_at_fpir(nonmated_top, fpir)
        out[float(fpir)] = (float((hits > t).sum() / mated.sum()), t, float((nonmated_top > t).mean()))
    return out


def det_curve(top, mate_score, mate_rank):
    """DET points ``(fpir, fnir, thresholds)``, one per distinct non-mated top score (descending) and -inf;
    FNIR = 1 - TPIR. ``None`` where there are no mated or no non-mated probes."""
    mated = np.asarray(mate_rank) > 0
    nonmated_top = np.sort(np.asarray(top, np.float64)[~mated])
    if not mated.any() or nonmated_top.size == 0:
        return None
    hits = np.sort(np.asarray(mate_score)[mated & (np.asarray(mate_rank) == 1)])
    thr = np.r_[np.unique(nonmated_top)[::-1], -np.inf]
    above = lambda sorted_scores: sorted_scores.size - np.searchsorted(sorted_scores, thr, side="right")  # noqa: E731
    fpir = above(nonmated_top) / nonmated_top.size
    fnir = 1.0 - above(hits) / mated.sum()
    return fpir, fnir, thr


def cmc_curve(mate_rank, max_rank):
    """Identification rate at ranks ``1 .. max_rank``: the fraction of mated probes whose mate ranks there or
    better. NaN where no probe is mated."""
    ranks = np.asarray(mate_rank)[np.asarray(mate_rank) > 0]
    if ranks.size == 0:
        return np.full(max_rank, np.nan)
    return np.searchsorted(np.sort(ranks), np.arange(1, max_rank + 1), side="right") / ranks.size


def evaluate_identification(probe_feats, probe_subjects, gallery_feats, gallery_subjects, fpirs=FPIRS, ranks=RANKS,
                            cmc_ranks=50):
    """Closed- and open-set metrics of searching the probes in one gallery.

    ``rank`` ({k: rate}): closed set, over the mated probes only, the fraction whose mate ranks k or better.
    ``tpir`` ({FPIR: TPIR}), ``threshold`` and ``fpir_reached``: open set, see :func:`tpir_at_fpir`. Also the
    CMC (ranks 1 .. ``min(cmc_ranks, subjects)``), the DET curve and the probe counts.
    """
    top, mate_score, mate_rank = search_gallery(probe_feats, probe_subjects, gallery_feats, gallery_subjects)
    n_subjects = len(np.unique(gallery_subjects))
    cmc = cmc_curve(mate_rank, max(max(ranks), min(cmc_ranks, n_subjects)))
    open_set = tpir_at_fpir(top, mate_score, mate_rank, fpirs)
    n_mated = int((mate_rank > 0).sum())
    return dict(rank={int(k): float(cmc[k - 1]) for k in ranks},
                tpir={f: v[0] for f, v in open_set.items()},
                threshold={f: v[1] for f, v in open_set.items()},
                fpir_reached={f: v[2] for f, v in open_set.items()},
                cmc=cmc[:max(1, min(cmc_ranks, n_subjects))], det=det_curve(top, mate_score, mate_rank),
                num_gallery_templates=int(len(gallery_subjects)), num_subjects=n_subjects,
                num_mated=n_mated, num_nonmated=int(len(mate_rank) - n_mated),
                top=top, mate_score=mate_score, mate_rank=mate_rank)


def identification_1n(img_feats, templates, medias, galleries, probe, fpirs=FPIRS, ranks=RANKS, sources=None):
    """The 1:N protocol on face features: ``{gallery: evaluate_identification(...)}``.

    ``galleries`` is ``{name: (template ids, subject ids)}`` (two of them: G1/G2 or S1/S2), ``probe`` the
    probes' ``(template ids, subject ids)``. Templates are pooled as in 1:1 (:func:`image2template_feature`)
    from the faces of ``templates``/``medias``. Each gallery is searched on its own, then their union
    (``"G1+G2"``): in IJB-B/C the two galleries hold disjoint subjects and every probe's subject is in one of
    them, so a probe is non-mated in the other gallery and the union is a closed-set search (no FPIR there).
    ``sources`` names the lists in errors: ``{"faces": ..., "probe": ..., <gallery>: ...}``.
    """
    sources = dict(sources or {})
    template_feats, unique_templates = image2template_feature(img_feats, templates, medias)

    def feats_of(ids, which):
        pos = np.clip(np.searchsorted(unique_templates, ids), 0, len(unique_templates) - 1)
        bad = unique_templates[pos] != ids
        if bad.any():
            raise IJBFormatError(f"{which} names {int(bad.sum())} templates without faces in "
                                 f"{sources.get('faces', 'the face list')}, e.g. {np.asarray(ids)[bad][:5].tolist()}")
        return template_feats[pos]

    probe_feats = feats_of(probe[0], sources.get("probe", "the probe list"))
    sets = {name: (feats_of(t, sources.get(name, f"gallery {name}")), np.asarray(s))
            for name, (t, s) in galleries.items()}
    if len(sets) > 1:
        sets["+".join(sets)] = (np.concatenate([f for f, _ in sets.values()]),
                                np.concatenate([s for _, s in sets.values()]))
    return {name: evaluate_identification(probe_feats, probe[1], feats, subjects, fpirs, ranks)
            for name, (feats, subjects) in sets.items()}


def _pct(v, width):
    return f"{'-':>{width}}" if np.isnan(v) else f"{100.0 * v:>{width}.2f}"


def format_table_1n(name, results):
    """The 1:N table: one row per gallery, rank-k rates and TPIR at each FPIR in percent ('-': undefined)."""
    first = next(iter(results.values()))
    head = "Methods".ljust(24) + "".join(f"{'rank-' + str(k):>9}" for k in first["rank"]) \
        + "".join(f"{'TPIR@' + format(f, '.0e'):>12}" for f in first["tpir"])
    rows = []
    for gallery, r in results.items():
        label = f"{name[:22 - len(gallery)]} {gallery}"
        rows.append(label.ljust(24) + "".join(_pct(v, 9) for v in r["rank"].values())
                    + "".join(_pct(v, 12) for v in r["tpir"].values()))
    return "\n".join([head] + rows)


# --------------------------------------------------------------------------------------------------
# the whole protocol
# --------------------------------------------------------------------------------------------------
def read_face_lists(image_path, target="IJBC"):
    """The release's two face lists, checked to name the same images in the same order:
    ``(names, templates, medias, landmarks, detector scores)``."""
    low = target.lower()
    meta = os.path.join(image_path, "meta")
    names_tm, templates, medias = read_template_media_list(os.path.join(meta, f"{low}_face_tid_mid.txt"))
    lmk_path = os.path.join(meta, f"{low}_name_5pts_score.txt")
    names, landmarks, det_scores = read_landmarks(lmk_path)
    if len(names) != len(names_tm):
        raise IJBFormatError(f"{lmk_path} lists {len(names)} faces but {low}_face_tid_mid.txt lists {len(names_tm)}")
    mismatch = [i for i, (a, b) in enumerate(zip(names, names_tm)) if a != b]
    if mismatch:
        i = mismatch[0]
        raise IJBFormatError(f"{lmk_path}:{i + 1}: image {names[i]!r} but {low}_face_tid_mid.txt line {i + 1} "
                             f"names {names_tm[i]!r}; the two lists must be in the same order")
    return names, templates, medias, landmarks, det_scores


def ijb_face_features(model, image_path, target="IJBC", batch_size=128, workers=4, device=None,
                      use_detector_score=False, use_norm_score=True, flip=True, progress=True, lists=None):
    """Every face of the release embedded and weighted as the protocols pool them: a dict with ``names``,
    ``templates``, ``medias`` (the face list), ``feats`` ``[N, D]`` float64 and ``timings``. Both protocols
    (and ``--mode both``) share it, so the faces are embedded once. ``lists``: :func:`read_face_lists`'
    result when already read."""
    timings = {}
    t0 = time.time()
    names, templates, medias, landmarks, det_scores = lists or read_face_lists(image_path, target)
    timings["read_meta_s"] = time.time() - t0

    t0 = time.time()
    dataset = IJBFaces(os.path.join(image_path, "loose_crop"), names, landmarks)
    feats = extract_features(model, dataset, batch_size, workers, device, flip=flip, progress=progress)
    timings["features_s"] = time.time() - t0
    feats = feats.astype(np.float64)
    if not use_norm_score:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = feats / np.where(norms > 0, norms, 1.0)
    if use_detector_score:
        feats = feats * det_scores[:, None].astype(np.float64)
    return dict(names=names, templates=templates, medias=medias, feats=feats, timings=timings,
                use_detector_score=bool(use_detector_score), use_norm_score=bool(use_norm_score), flip=bool(flip))


def _check_target(target):
    target = target.upper()
    if target not in ("IJBC", "IJBB"):
        raise ValueError(f"target must be IJBC or IJBB, got {target!r}")
    return target


def evaluate_ijb(model, image_path, target="IJBC", result_dir=None, batch_size=128, workers=4, device=None,
                 use_detector_score=False, use_norm_score=True, flip=True, name="model", progress=True, faces=None):
    """Run the IJB-B/C 1:1 protocol; returns a dict with ``tar`` ({FAR: TAR}), ``auc``, ``scores``,
    ``labels``, the ROC and, when ``result_dir`` is set, the paths of the files written there. ``faces``
    (:func:`ijb_face_features`' result) skips the embedding, and the face options with it."""
    target = _check_target(target)
    low = target.lower()
    lists = read_face_lists(image_path, target) if faces is None else None  # every list read before embedding
    t1, t2, labels = read_template_pair_list(os.path.join(image_path, "meta", f"{low}_template_pair_label.txt"))
    if faces is None:
        faces = ijb_face_features(model, image_path, target, batch_size, workers, device, use_detector_score,
                                  use_norm_score, flip, progress, lists)
    timings = dict(faces["timings"])

    t0 = time.time()
    template_feats, unique_templates = image2template_feature(faces["feats"], faces["templates"], faces["medias"])
    scores = template_pair_scores(template_feats, unique_templates, t1, t2)
    fpr, tpr, thr = roc_curve_points(labels, scores)
    tars = tar_at_far(fpr, tpr)
    timings["scores_s"] = time.time() - t0

    n_faces = len(faces["names"])
    result = dict(target=target, tar=tars, auc=_auc(fpr, tpr), scores=scores, labels=labels, fpr=fpr, tpr=tpr,
                  thresholds=thr, num_faces=n_faces, num_templates=len(unique_templates),
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
                       "use_detector_score": faces["use_detector_score"], "use_norm_score": faces["use_norm_score"],
                       "flip": faces["flip"], "num_faces": n_faces, "num_templates": len(unique_templates),
                       "num_pairs": len(labels)}, f, indent=2)
    return result


def _json_number(v):
    return None if v is None or not np.isfinite(v) else float(v)


def evaluate_ijb_1n(model, image_path, target="IJBC", result_dir=None, batch_size=128, workers=4, device=None,
                    use_detector_score=False, use_norm_score=True, flip=True, name="model", progress=True,
                    faces=None):
    """Run the IJB-B/C 1:N protocol (:func:`identification_1n`); returns a dict with ``galleries``
    ({gallery: :func:`evaluate_identification`'s dict}), ``table`` and, when ``result_dir`` is set, the paths
    of ``<target>_1n_det.png``, ``<target>_1n_cmc.png`` and ``<target>_1n.json`` written there."""
    target = _check_target(target)
    low = target.lower()
    meta = os.path.join(image_path, "meta")
    gallery_files, probe_file = identification_lists(target)
    lists = read_face_lists(image_path, target) if faces is None else None  # every list read before embedding
    galleries = {g: read_template_subject_list(os.path.join(meta, f)) for g, f in gallery_files.items()}
    probe = read_template_subject_list(os.path.join(meta, probe_file))
    if faces is None:
        faces = ijb_face_features(model, image_path, target, batch_size, workers, device, use_detector_score,
                                  use_norm_score, flip, progress, lists)
    timings = dict(faces["timings"])

    t0 = time.time()
    sources = {"faces": os.path.join(meta, f"{low}_face_tid_mid.txt"), "probe": os.path.join(meta, probe_file),
               **{g: os.path.join(meta, f) for g, f in gallery_files.items()}}
    results = identification_1n(faces["feats"], faces["templates"], faces["medias"], galleries, probe,
                                sources=sources)
    timings["search_s"] = time.time() - t0

    result = dict(target=target, galleries=results, num_faces=len(faces["names"]), num_probes=len(probe[0]),
                  timings=timings, table=format_table_1n(name, results))
    if result_dir:
        os.makedirs(result_dir, exist_ok=True)
        result["det_path"] = os.path.join(result_dir, f"{low}_1n_det.png")
        dets = {g: r["det"][:2] for g, r in results.items() if r["det"] is not None}
        save_det_plot(result["det_path"], dets, f"DET on {target} 1:N ({name})")
        result["cmc_path"] = os.path.join(result_dir, f"{low}_1n_cmc.png")
        save_cmc_plot(result["cmc_path"], {g: r["cmc"] for g, r in results.items()}, f"CMC on {target} 1:N ({name})")
        result["json_path"] = os.path.join(result_dir, f"{low}_1n.json")
        with open(result["json_path"], "w") as f:
            json.dump({"target": target, "model": name, "galleries": {g: {
                "rank": {str(k): _json_number(v) for k, v in r["rank"].items()},
                "tpir_at_fpir": {f"{k:.0e}": _json_number(v) for k, v in r["tpir"].items()},
                "threshold": {f"{k:.0e}": _json_number(v) for k, v in r["threshold"].items()},
                "fpir_reached": {f"{k:.0e}": _json_number(v) for k, v in r["fpir_reached"].items()},
                "cmc": [_json_number(v) for v in r["cmc"]],
                "num_gallery_templates": r["num_gallery_templates"], "num_subjects": r["num_subjects"],
                "num_mated_probes": r["num_mated"], "num_nonmated_probes": r["num_nonmated"]}
                for g, r in results.items()},
                "use_detector_score": faces["use_detector_score"], "use_norm_score": faces["use_norm_score"],
                "flip": faces["flip"], "num_faces": len(faces["names"]), "num_probe_templates": len(probe[0])},
                f, indent=2)
    return result


def check_image_path(image_path, target, mode="1:1"):
    """Raise :class:`IJBFormatError` (or ``FileNotFoundError``) naming what ``image_path`` lacks of the layout
    in this module's docstring for ``target``: the folder, ``meta/`` and the lists ``mode`` reads (the two
    face lists; the pair list for 1:1; the gallery and probe csv files for 1:N), ``loose_crop/`` and the
    images the landmark list names. Cheap next to the evaluation: one listing of ``loose_crop``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    low = target.lower()
    expected = f"the {target} folder of the IJB release, holding loose_crop/ and meta/{low}_*.txt"
    if not os.path.isdir(image_path):
        what = "is a file" if os.path.exists(image_path) else "does not exist"
        raise FileNotFoundError(f"--image-path {image_path} {what}; expected {expected}")
    meta, crops = os.path.join(image_path, "meta"), os.path.join(image_path, "loose_crop")
    for folder in (meta, crops):
        if not os.path.isdir(folder):
            raise IJBFormatError(f"{image_path} has no {os.path.basename(folder)}/ folder; expected {expected}")
    lists = [f"{low}_name_5pts_score.txt", f"{low}_face_tid_mid.txt"]
    if mode in ("1:1", "both"):
        lists.append(f"{low}_template_pair_label.txt")
    if mode in ("1:N", "both"):
        gallery_files, probe_file = identification_lists(target)
        lists += [*gallery_files.values(), probe_file]
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
    """The command line. Returns :func:`evaluate_ijb`'s result (``--mode 1:1``, the default),
    :func:`evaluate_ijb_1n`'s (``1:N``) or ``{"1:1": ..., "1:N": ...}`` (``both``, the faces embedded once);
    bad input (a missing or unusable model, an ``--image-path`` without the release's layout or without the
    lists of the mode, an unreadable image) prints one ``error: ...`` line naming it on stderr and exits with
    status 1."""
    parser = argparse.ArgumentParser(prog="python -m partialfc.eval.ijb",
                                     description="IJB-B / IJB-C 1:1 verification (TAR at FAR) and 1:N "
                                                 "identification (rank-N, TPIR at FPIR).")
    parser.add_argument("--model", required=True, help="backbone state_dict (model.pt) or exported .onnx")
    parser.add_argument("--image-path", required=True, help="the IJBC (or IJBB) folder: loose_crop/ and meta/")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--mode", default="1:1", choices=list(MODES),
                        help="1:1 verification, 1:N identification (gallery and probe csv files), or both")
    parser.add_argument("--result-dir", default=".", help="where the scores .npy, the plots and the json go")
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
    check_image_path(args.image_path, args.target, args.mode)  # before the model loads, and the faces are embedded
    if args.mode in ("1:N", "both"):  # the csv files are read before the faces are embedded, too
        gallery_files, probe_file = identification_lists(args.target)
        for f in [*gallery_files.values(), probe_file]:
            read_template_subject_list(os.path.join(args.image_path, "meta", f))
    device = resolve_device(args.device)
    model, desc = load_eval_model(args.model, args.network, args.embedding_size, device)
    if not isinstance(model, torch.nn.Module):
        device = torch.device("cpu")
    name = os.path.splitext(os.path.basename(args.model))[0]
    print(f"model: {desc}")
    faces = ijb_face_features(model, args.image_path, args.target, args.batch_size, args.workers, device,
                              use_detector_score=args.use_detector_score, use_norm_score=not args.no_norm_score,
                              flip=not args.no_flip, progress=sys.stderr.isatty())
    results = {}
    if args.mode in ("1:1", "both"):
        res = evaluate_ijb(None, args.image_path, args.target, args.result_dir, name=name, faces=faces)
        print(f"{res['num_faces']} faces, {res['num_templates']} templates, {res['num_pairs']} pairs; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()))
        print(res["table"])
        print(f"AUC: {100 * res['auc']:.4f}%   written: {res['scores_path']}, {res['roc_path']}, {res['json_path']}")
        results["1:1"] = res
    if args.mode in ("1:N", "both"):
        res = evaluate_ijb_1n(None, args.image_path, args.target, args.result_dir, name=name, faces=faces)
        print(f"{res['num_faces']} faces, {res['num_probes']} probe templates; "
              + "; ".join(f"{g}: {r['num_gallery_templates']} templates, {r['num_mated']} mated and "
                          f"{r['num_nonmated']} non-mated probes" for g, r in res["galleries"].items())
              + "; " + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()))
        print(res["table"])
        print(f"written: {res['det_path']}, {res['cmc_path']}, {res['json_path']}")
        results["1:N"] = res
    return results if args.mode == "both" else next(iter(results.values()))


if __name__ == "__main__":
    main()
