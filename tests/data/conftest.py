"""Small generated datasets for the data tests.

Each image is one flat colour that encodes its sample number, stored as PNG (lossless), so a decoded
(and possibly mirrored) image tells which sample it was.
"""
import os
import sys
import types

import numpy as np
import pytest

from partialfc.data import recordio

sys.path.insert(0, os.path.dirname(__file__))


def sample_image(i, size=112):
    """BGR image whose colour encodes i (0 <= i < 32768)."""
    b, g, r = (i % 32) * 8, ((i // 32) % 32) * 8, ((i // 1024) % 32) * 8
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = (b, g, r)
    return img


def sample_index(tensor):
    """Inverse of sample_image for a normalized RGB tensor [3, H, W]."""
    rgb = np.rint(tensor.numpy().reshape(3, -1).mean(axis=1) * 127.5 + 127.5).astype(int)
    r, g, b = (int(v) // 8 for v in rgb)
    return b + 32 * g + 1024 * r


def labels_for(n, num_classes):
    return np.sort(np.arange(n) % num_classes)


def _pack(header, img, fmt):
    return recordio.pack_img(header, img, quality=3 if fmt == ".png" else 95, img_fmt=fmt)


def write_insightface_rec(folder, n, num_classes, fmt=".png", labels=None):
    """insightface layout: header record 0, images 1..n, identity records n+1..n+num_classes."""
    os.makedirs(folder, exist_ok=True)
    labels = labels_for(n, num_classes) if labels is None else np.asarray(labels)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    w.write_idx(0, recordio.pack(recordio.IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b""))
    for i in range(n):
        w.write_idx(i + 1, _pack(recordio.IRHeader(0, float(labels[i]), i + 1, 0), sample_image(i), fmt))
    for c in range(num_classes):
        keys = np.flatnonzero(labels == c) + 1
        w.write_idx(n + 1 + c, recordio.pack(recordio.IRHeader(2, [keys.min(), keys.max() + 1], 0, 0), b""))
    w.close()
    return labels


def write_plain_rec(folder, n, num_classes, fmt=".png", labels=None):
    """im2rec layout without a header record: keys 0..n-1 are images."""
    os.makedirs(folder, exist_ok=True)
    labels = labels_for(n, num_classes) if labels is None else np.asarray(labels)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    for i in range(n):
        w.write_idx(i, _pack(recordio.IRHeader(0, float(labels[i]), i, 0), sample_image(i), fmt))
    w.close()
    return labels


def make_config(**kw):
    from partialfc.config import default_config
    cfg = default_config()
    cfg.update(num_workers=0, batch_size=8, seed=7)
    cfg.update(kw)
    return cfg


def comm(rank, size):
    return types.SimpleNamespace(rank=rank, size=size, local_rank=rank)


@pytest.fixture(scope="session")
def rec_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recs")
    n, c = 240, 10
    write_insightface_rec(str(root / "insight"), n, c)
    write_plain_rec(str(root / "plain"), n, c)
    return {"insight": str(root / "insight"), "plain": str(root / "plain"), "n": n, "c": c}
