"""The embedded synthetic face-like identity dataset.

Each identity is a seeded set of facial traits: face shape and skin tone, eye spacing, size and color,
brows, nose, mouth, hair style and color, glasses, and a few marks. Each sample renders those traits and
then varies them the way photos vary: pose (shift, scale, rotation), expression (mouth, brows), lighting
(gain, gamma, color cast, a gradient), background, sensor noise, blur and mirror flip. Nuisances are
strong enough that an untrained network cannot verify pairs, while the traits are learnable.

Generated on first use into ``<data_root>/synthetic-<hash>/``:
- ``train_images.npy`` uint8 [N, 112, 112, 3] RGB and ``train_labels.npy`` int64 [N];
- ``synthetic_val.bin``: verification pairs over held-out identities in the insightface ``.bin`` layout,
  a pickle of ``(list of JPEG bytes, list of bool)``.

``partialfc.data.datasets.SyntheticFaceDataset`` reads the training arrays.
"""
import hashlib
import json
import os
import pickle

import cv2
import numpy as np

from ..fileio import write_atomic

SIZE = 112
_VERSION = 3  # bump when rendering changes, so caches are regenerated


def _identity_traits(identity, seed):
    rng = np.random.default_rng([seed, identity, 17])
    skin = rng.uniform([90, 60, 40], [240, 200, 170])
    return dict(
        face_w=rng.uniform(30, 42), face_h=rng.uniform(40, 52), jaw=rng.uniform(0.75, 1.0),
        skin=skin,
        eye_dx=rng.uniform(13, 22), eye_y=rng.uniform(-12, -2), eye_r=rng.uniform(3.5, 7.5),
        eye_color=rng.uniform(0, 160, 3), eye_shape=rng.uniform(0.5, 1.0),
        brow_dy=rng.uniform(6, 11), brow_len=rng.uniform(7, 16), brow_w=int(rng.integers(1, 5)),
        brow_tilt=rng.uniform(-4, 4),
        nose_len=rng.uniform(8, 18), nose_w=rng.uniform(3, 9),
        mouth_y=rng.uniform(14, 26), mouth_w=rng.uniform(8, 20), mouth_curve=rng.uniform(-5, 5),
        lip=skin * rng.uniform(0.4, 0.8) + np.array([60, 0, 0]),
        hair=rng.uniform(0, 255, 3) * rng.choice([0.2, 1.0]), hair_top=rng.uniform(2, 16),
        hair_side=rng.uniform(0, 1), fringe=rng.uniform(-8, 6), hair_style=int(rng.integers(0, 3)),
        glasses=bool(rng.random() < 0.25),
        marks=rng.uniform([-25, -25, 1.0], [25, 30, 2.5], size=(int(rng.integers(0, 4)), 3)),
        ears=rng.uniform(4, 8),
    )


def _render(t, rng):
    """One photo of identity traits ``t``: an RGB uint8 [112, 112, 3] image."""
    bg_a, bg_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, SIZE)[:, None, None]
    img = (bg_a * (1 - ramp) + bg_b * ramp).repeat(SIZE, axis=1).astype(np.float32)
    img = np.ascontiguousarray(img)
    cx, cy = SIZE / 2 + rng.normal(0, 1), SIZE / 2 + 4 + rng.normal(0, 1)
    tone = t["skin"] * rng.uniform(0.95, 1.05)
    hair = tuple(float(c) for c in t["hair"])
    aa = cv2.LINE_AA
    # Hair behind the head, ears, then the face.
    if t["hair_style"] > 0:
        cv2.ellipse(img, (int(cx), int(cy - 4)), (int(t["face_w"] + 4 + 6 * t["hair_side"]),
                    int(t["face_h"] + t["hair_top"])), 0, 180 if t["hair_style"] == 1 else 150,
                    360 if t["hair_style"] == 1 else 390, hair, -1, aa)
    for side in (-1, 1):
        cv2.ellipse(img, (int(cx + side * t["face_w"]), int(cy)), (int(t["ears"]), int(t["ears"] * 1.6)), 0, 0,
                    360, tuple(float(c) for c in tone * 0.9), -1, aa)
    cv2.ellipse(img, (int(cx), int(cy)), (int(t["face_w"]), int(t["face_h"] * t["jaw"])), 0, 0, 180,
                tuple(float(c) for c in tone), -1, aa)
    cv2.ellipse(img, (int(cx), int(cy)), (int(t["face_w"]), int(t["face_h"] * 0.9)), 0, 180, 360,
                tuple(float(c) for c in tone), -1, aa)
    # Hair on top of the forehead.
    cv2.ellipse(img, (int(cx), int(cy - t["face_h"] * 0.55)), (int(t["face_w"] * 0.95), int(t["hair_top"] + 6)),
                0, 180, 360, hair, -1, aa)
    cv2.rectangle(img, (int(cx - t["face_w"] * 0.8), int(cy - t["face_h"] * 0.6)),
                  (int(cx + t["face_w"] * 0.8), int(cy - t["face_h"] * 0.6 + max(t["fringe"], 0))), hair, -1, aa)
    # Eyes, brows (expression moves them a little), glasses.
    raise_brow = rng.normal(0, 0.6)
    for side in (-1, 1):
        ex, ey = cx + side * t["eye_dx"], cy + t["eye_y"]
        cv2.ellipse(img, (int(ex), int(ey)), (int(t["eye_r"] + 2), int((t["eye_r"] + 1) * t["eye_shape"])), 0, 0,
                    360, (235, 235, 235), -1, aa)
        cv2.circle(img, (int(ex + rng.normal(0, 0.4)), int(ey)), int(max(t["eye_r"] * 0.7, 1.5)),
                   tuple(float(c) for c in t["eye_color"]), -1, aa)
        by = ey - t["brow_dy"] - raise_brow
        x0, x1 = ex - side * t["brow_len"] / 2, ex + side * t["brow_len"] / 2
        cv2.line(img, (int(x0), int(by + t["brow_tilt"])), (int(x1), int(by - t["brow_tilt"])), hair,
                 t["brow_w"] + 1, aa)
        if t["glasses"]:
            cv2.circle(img, (int(ex), int(ey)), int(t["eye_r"] + 5), (20, 20, 20), 1, aa)
    # Nose and mouth.
    ny = cy + t["eye_y"] + t["nose_len"]
    nose = np.array([[cx, cy + t["eye_y"] + 2], [cx - t["nose_w"], ny], [cx + t["nose_w"], ny]], np.int32)
    cv2.polylines(img, [nose], False, tuple(float(c) for c in tone * 0.6), 1, aa)
    my = cy + t["mouth_y"]
    smile = t["mouth_curve"] + rng.normal(0, 0.8)
    xs = np.linspace(-t["mouth_w"], t["mouth_w"], 9)
    mouth = np.stack([cx + xs, my + smile * (1 - (xs / t["mouth_w"]) ** 2)], 1).astype(np.int32)
    cv2.polylines(img, [mouth], False, tuple(float(c) for c in t["lip"]), 2, aa)
    for mx, mym, mr in t["marks"]:
        cv2.circle(img, (int(cx + mx), int(cy + mym)), int(mr), tuple(float(c) for c in tone * 0.45), -1, aa)

    # Pose.
    angle, scale = rng.normal(0, 4), rng.uniform(0.94, 1.06)
    m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
    m[:, 2] += rng.normal(0, 2.5, 2)
    img = cv2.warpAffine(img, m, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)
    # Lighting: gain, color cast, a directional gradient, gamma.
    gx, gy = rng.normal(0, 0.15, 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    light = (1 + gx * xx + gy * yy)[:, :, None]
    img = img * light * rng.uniform(0.8, 1.2) * rng.uniform(0.92, 1.08, 3)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.85, 1.2)
    # Sensor: blur and noise.
    if rng.random() < 0.3:
        k = int(rng.choice([3, 5]))
        img = cv2.GaussianBlur(img, (k, k), 0)
    img = img + rng.normal(0, rng.uniform(2, 5), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def _params(config):
    return dict(version=_VERSION, ids=int(config.synthetic_ids), per_id=int(config.synthetic_images_per_id),
                val_ids=int(config.synthetic_val_ids), val_pairs=int(config.synthetic_val_pairs),
                seed=int(config.seed))


def synthetic_root(config):
    params = _params(config)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = config.get("data_root") or os.environ.get("PARTIALFC_DATA",
                                                     os.path.join(os.path.expanduser("~"), ".cache", "partialfc"))
    return os.path.join(base, f"synthetic-{digest}")


def _paths(root):
    return dict(train_images=os.path.join(root, "train_images.npy"),
                train_labels=os.path.join(root, "train_labels.npy"),
                val_bin=os.path.join(root, "synthetic_val.bin"))


def _progress(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", mininterval=1.0)


def _generate(root, p):
    os.makedirs(root, exist_ok=True)
    paths = _paths(root)
    n = p["ids"] * p["per_id"]
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = np.repeat(np.arange(p["ids"], dtype=np.int64), p["per_id"])
    with _progress(n, "synthetic train") as bar:
        for identity in range(p["ids"]):
            traits = _identity_traits(identity, p["seed"])
            rng = np.random.default_rng([p["seed"], identity, 1])
            for k in range(p["per_id"]):
                images[identity * p["per_id"] + k] = _render(traits, rng)
            bar.update(p["per_id"])

    # Held-out identities: ids after the training ones, so no training identity is ever in a pair.
    rng = np.random.default_rng([p["seed"], 2])
    per_val = 8
    val_ids = np.arange(p["ids"], p["ids"] + p["val_ids"])
    photos = {}
    with _progress(p["val_ids"] * per_val, "synthetic val") as bar:
        for identity in val_ids:
            traits = _identity_traits(int(identity), p["seed"])
            render_rng = np.random.default_rng([p["seed"], int(identity), 3])
            photos[int(identity)] = [_render(traits, render_rng) for _ in range(per_val)]
            bar.update(per_val)
    bins, issame = [], []
    for pair in range(p["val_pairs"]):
        same = pair % 2 == 0
        a = int(rng.choice(val_ids))
        b = a if same else int(rng.choice(val_ids[val_ids != a]))
        i, j = rng.choice(per_val, 2, replace=False) if same else rng.integers(0, per_val, 2)
        for identity, k in ((a, i), (b, j)):
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photos[identity][k], cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            bins.append(buf.tobytes())
        issame.append(same)

    write_atomic(paths["train_labels"], lambda f: np.save(f, labels))
    write_atomic(paths["val_bin"], lambda f: pickle.dump((bins, issame), f, protocol=4))
    # The image array goes last: its presence marks a complete cache.
    write_atomic(paths["train_images"], lambda f: np.save(f, images))


def ensure_synthetic(config):
    """Paths of the synthetic train arrays and val ``.bin``, generating them on first use."""
    root = synthetic_root(config)
    paths = _paths(root)
    if not all(os.path.exists(v) for v in paths.values()):
        _generate(root, _params(config))
    return paths
