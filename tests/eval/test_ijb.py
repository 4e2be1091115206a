"""IJB 1:1 protocol on a generated IJB-format fixture, checked against an independent computation."""
import itertools
import json
import os

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

from partialfc.backbones import get_model
from partialfc.data.align import ARCFACE_DST
from partialfc.eval import ijb

FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def _make_fixture(root, target="IJBC", n_ids=10, templates_per_id=3, seed=0):
    """Real folder layout: loose_crop/*.jpg of warped synthetic faces, and the three meta files."""
    rng = np.random.default_rng(seed)
    low = target.lower()
    os.makedirs(root / "loose_crop")
    os.makedirs(root / "meta")
    faces = []
    for _ in range(n_ids):
        base = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 6)
        faces.append(cv2.normalize(base, None, 0, 255, cv2.NORM_MINMAX))
    tid_mid, pts, owner = [], [], {}
    tid, mid, k = 100, 5000, 0
    for ident in range(n_ids):
        for _ in range(templates_per_id):
            tid += 1
            owner[tid] = ident
            for _ in range(rng.integers(1, 4)):  # medias per template
                mid += 1
                for _ in range(rng.integers(1, 3)):  # frames per media
                    k += 1
                    face = np.clip(faces[ident].astype(int) + rng.integers(-25, 26, (112, 112, 3)), 0, 255)
                    a = np.deg2rad(rng.uniform(-25, 25))
                    s = rng.uniform(0.8, 1.6)
                    m = np.array([[s * np.cos(a), -s * np.sin(a), rng.uniform(10, 40)],
                                  [s * np.sin(a), s * np.cos(a), rng.uniform(10, 40)]])
                    loose = cv2.warpAffine(face.astype(np.uint8), m, (230, 220), borderValue=(90, 90, 90))
                    name = f"{k}.jpg"
                    cv2.imwrite(str(root / "loose_crop" / name), loose, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    lmk = ARCFACE_DST.astype(np.float64) @ m[:, :2].T + m[:, 2]
                    score = rng.uniform(0.3, 1.0)
                    tid_mid.append(f"{name} {tid} {mid}")
                    pts.append(" ".join([name] + [f"{v:.4f}" for v in lmk.reshape(-1)] + [f"{score:.6f}"]))
    pairs = [f"{t1} {t2} {int(owner[t1] == owner[t2])}" for t1, t2 in itertools.combinations(sorted(owner), 2)]
    (root / "meta" / f"{low}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / f"{low}_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (root / "meta" / f"{low}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root


def _independent_face_features(root, target, model, use_detector_score):
    """Per-image features written out directly (cv2 alignment, image + flip): ``(feats, templates, medias)``."""
    low = target.lower()
    meta = root / "meta"
    rows = [line.split() for line in (meta / f"{low}_face_tid_mid.txt").read_text().splitlines()]
    templates = np.array([int(r[1]) for r in rows])
    medias = np.array([int(r[2]) for r in rows])
    feats, scores = [], []
    model.eval()
    for line in (meta / f"{low}_name_5pts_score.txt").read_text().splitlines():
        parts = line.split()
        img = cv2.imread(str(root / "loose_crop" / parts[0]))
        lmk = np.array([float(v) for v in parts[1:11]]).reshape(5, 2)
        m, _ = cv2.estimateAffinePartial2D(lmk, ARCFACE_DST.astype(np.float64), method=cv2.LMEDS)
        # cv2's partial-affine fit on exact similarity landmarks equals the least-squares similarity
        crop = cv2.cvtColor(cv2.warpAffine(img, m, (112, 112), borderValue=0.0), cv2.COLOR_BGR2RGB)
        feats.append(torch.from_numpy(crop.transpose(2, 0, 1).copy()).float().div(255).sub(0.5).div(0.5))
        scores.append(float(parts[11]))
    x = torch.stack(feats)
    with torch.no_grad():  # one batch: eval-mode BatchNorm makes this the same as image by image
        feats = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()
    if use_detector_score:
        feats = feats * np.array(scores)[:, None]
    return feats, templates, medias


def _independent(root, target, model, use_detector_score):
    """The protocol written out directly: per-image loop, insightface-style pooling, sklearn ROC."""
    meta = root / "meta"
    feats, templates, medias = _independent_face_features(root, target, model, use_detector_score)
    uniq = np.unique(templates)
    tfeat = np.zeros((len(uniq), feats.shape[1]))
    for i, t in enumerate(uniq):
        sel = templates == t
        tfeat[i] = sum(feats[sel][medias[sel] == mm].mean(axis=0) for mm in np.unique(medias[sel]))
    tfeat = normalize(tfeat)
    lookup = {t: i for i, t in enumerate(uniq)}
    pairs = np.loadtxt(meta / f"{target.lower()}_template_pair_label.txt", dtype=int)
    s = np.array([tfeat[lookup[a]] @ tfeat[lookup[b]] for a, b, _ in pairs])
    fpr, tpr, _ = roc_curve(pairs[:, 2], s)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tars = {far: tpr[min(zip(np.abs(fpr - far), range(len(fpr))))[1]] for far in FARS}
    return s, tars


class _Patches(torch.nn.Module):
    """A discriminative toy embedder: mean colour over a 4x4 grid of cells, projected."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(48, 24)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    return _make_fixture(tmp_path_factory.mktemp("ijb") / "IJBC")


@pytest.mark.parametrize("use_detector_score", [False, True])
def test_tar_at_far_matches_independent_computation(ijbc, tmp_path, use_detector_score):
    model = _Patches()
    res = ijb.evaluate_ijb(model, str(ijbc), "IJBC", str(tmp_path / "out"), batch_size=16, workers=2,
                           device="cpu", use_detector_score=use_detector_score, progress=False)
    ref_scores, ref_tars = _independent(ijbc, "IJBC", model, use_detector_score)
    np.testing.assert_allclose(res["scores"], ref_scores, atol=2e-4)
    for far in FARS:
        assert res["tar"][far] == pytest.approx(ref_tars[far], abs=1e-6)
    assert res["tar"][1e-1] > 0.5  # the toy embedder does separate the synthetic identities

    scores = np.load(res["scores_path"])
    assert scores.shape == (res["num_pairs"],)
    png = cv2.imread(res["roc_path"], cv2.IMREAD_UNCHANGED)
    assert png is not None and png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
    assert png.std() > 0  # something is drawn
    saved = json.loads(open(res["json_path"]).read())
    assert saved["tar_at_far"]["1e-04"] == pytest.approx(res["tar"][1e-4])


@pytest.mark.parametrize("seed", range(4))
def test_roc_and_tar_match_sklearn_on_tied_scores(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    labels = rng.random(n) < 0.2
    scores = np.round(rng.normal(labels * 1.0, 0.7), 1 + seed % 2)  # coarse rounding -> many ties
    fpr, tpr, thr = ijb.roc_curve_points(labels, scores)
    s_fpr, s_tpr, s_thr = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, s_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, s_tpr, atol=1e-12)
    np.testing.assert_allclose(thr[1:], s_thr[1:])
    ref = {far: np.flipud(s_tpr)[min(zip(np.abs(np.flipud(s_fpr) - far), range(len(s_fpr))))[1]]
           for far in FARS}
    got = ijb.tar_at_far(fpr, tpr)
    for far in FARS:
        assert got[far] == pytest.approx(ref[far], abs=1e-12)


def test_pooling_averages_media_then_sums_media():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    templates = np.array([7, 7, 7, 9])
    medias = np.array([1, 1, 2, 3])
    tf, uniq = ijb.image2template_feature(feats, templates, medias)
    assert uniq.tolist() == [7, 9]
    # template 7: mean of media 1 = (2, 0), plus media 2 = (0, 2) -> (2, 2) -> normalized
    np.testing.assert_allclose(tf[0], [np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(tf[1], [0.0, 1.0])


def test_cli_with_a_checkpoint(tmp_path, capsys):
    ijbc = _make_fixture(tmp_path / "IJBC", n_ids=5, templates_per_id=2, seed=1)
    torch.manual_seed(0)
    model = get_model("small", num_features=16, dropout=0.0, fp16=False).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    res = ijb.main(["--model", str(ckpt), "--network", "small", "--embedding-size", "16", "--image-path", str(ijbc),
                    "--target", "IJBC", "--result-dir", str(tmp_path / "res"), "--batch-size", "32",
                    "--workers", "0", "--device", "cpu", "--use-detector-score"])
    out = capsys.readouterr().out
    assert "1e-06" in out and "1e-01" in out and os.path.isfile(res["roc_path"])
    _, ref_tars = _independent(ijbc, "IJBC", model, True)
    for far in FARS:
        assert res["tar"][far] == pytest.approx(ref_tars[far], abs=1e-6)


def test_format_errors_name_the_file(tmp_path):
    root = _make_fixture(tmp_path / "IJBB", target="IJBB", n_ids=2, templates_per_id=2)
    with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
        ijb.evaluate_ijb(_Patches(), str(root), "IJBC", workers=0, progress=False)
    lmk = root / "meta" / "ijbb_name_5pts_score.txt"
    lines = lmk.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-2])
    lmk.write_text("\n".join(lines) + "\n")
    with pytest.raises(ijb.IJBFormatError, match="ijbb_name_5pts_score.txt:2"):
        ijb.evaluate_ijb(_Patches(), str(root), "IJBB", workers=0, progress=False)
