"""10-fold verification protocol and flip-test embedding against independent computations."""
import pickle

import cv2
import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from partialfc.eval import embed_images, evaluate, load_bin


def _reference_protocol(embeddings, issame, nfolds=10):
    """insightface's calculate_roc written out literally: KFold, one threshold at a time, np.less."""
    emb = normalize(np.asarray(embeddings, dtype=np.float64))
    e1, e2 = emb[0::2], emb[1::2]
    dist = np.sum(np.square(e1 - e2), 1)
    issame = np.asarray(issame)
    thresholds = np.arange(0, 4, 0.01)

    def acc_at(t, d, same):
        pred = np.less(d, t)
        tp = np.sum(np.logical_and(pred, same))
        tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
        return float(tp + tn) / d.size

    accs, chosen = [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(issame))):
        train_acc = [acc_at(t, dist[train], issame[train]) for t in thresholds]
        best = int(np.argmax(train_acc))
        chosen.append(thresholds[best])
        accs.append(acc_at(thresholds[best], dist[test], issame[test]))
    return np.mean(accs), np.std(accs), chosen


def _pairs_with_distances(dists, dim=16, seed=0):
    """Unit-vector pairs whose squared distances are exactly ``dists`` (up to float rounding)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in dists:
        a = rng.normal(size=dim)
        a /= np.linalg.norm(a)
        b = rng.normal(size=dim)
        b -= b.dot(a) * a
        b /= np.linalg.norm(b)
        cos = 1.0 - d / 2.0
        out += [a, cos * a + np.sqrt(max(0.0, 1.0 - cos * cos)) * b]
    return np.stack(out)


def test_hand_checkable_case():
    # 100 pairs: same pairs at squared distance 0.505, different pairs at 2.0, except pair 3
    # (a different pair at distance 0.3, in fold 0). Every training split prefers the first threshold
    # above 0.505, 0.51, which misclassifies only pair 3.
    issame = np.array([i % 2 == 0 for i in range(100)])
    dists = np.where(issame, 0.505, 2.0)
    dists[3] = 0.3
    emb = _pairs_with_distances(dists) * 7.0  # scale does not matter after normalization
    res = evaluate(emb, issame)
    assert res["thresholds"] == pytest.approx([0.51] * 10)
    assert res["best_threshold"] == pytest.approx(0.51)
    folds = np.array([0.9] + [1.0] * 9)
    assert res["fold_accuracies"] == pytest.approx(folds.tolist())
    assert res["accuracy"] == pytest.approx(0.99)
    assert res["std"] == pytest.approx(folds.std())
    assert res["xnorm"] == pytest.approx(7.0)


@pytest.mark.parametrize("n_pairs,seed", [(300, 0), (317, 1), (120, 2)])
def test_matches_literal_insightface_protocol(n_pairs, seed):
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    dists = np.where(issame, rng.normal(1.0, 0.45, n_pairs), rng.normal(1.3, 0.45, n_pairs)).clip(0.0, 3.9)
    emb = _pairs_with_distances(dists, seed=seed) * rng.uniform(5, 30, size=(2 * n_pairs, 1))
    res = evaluate(emb.astype(np.float32), issame)
    acc, std, chosen = _reference_protocol(emb.astype(np.float32), issame)
    assert res["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["std"] == pytest.approx(std, abs=1e-12)
    assert res["thresholds"] == pytest.approx(chosen)
    assert res["best_threshold"] == pytest.approx(np.mean(chosen))
    assert len(set(np.round(chosen, 2))) > 1  # the folds really disagree, so the per-fold choice is tested
    assert res["xnorm"] == pytest.approx(np.linalg.norm(emb, axis=1).mean(), rel=1e-6)


def test_evaluate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2 per pair"):
        evaluate(np.ones((5, 4)), [True, False])
    with pytest.raises(ValueError, match="nrof_folds"):
        evaluate(np.ones((4, 4)), [True, False], nrof_folds=10)


class _HalfAsymmetric(torch.nn.Module):
    """Embeds a left/right-asymmetric statistic so that the flipped view differs from the original."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(6)
        self.bn.running_mean.fill_(0.1)
        self.bn.running_var.fill_(4.0)

    def forward(self, x):
        left = x[:, :, :, :40].mean(dim=(2, 3))
        right = x[:, :, :, 60:].mean(dim=(2, 3))
        return self.bn(torch.cat([left, right], dim=1))


def test_embed_images_adds_flip_and_restores_mode():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 112, 112, 3), dtype=np.uint8)
    model = _HalfAsymmetric().train()
    emb, xnorm = embed_images(model, images, batch_size=4, device="cpu", with_xnorm=True)
    assert model.training  # mode restored

    def ref_view(imgs):
        x = (imgs.astype(np.float64) - 127.5) / 127.5  # NHWC
        feats = np.concatenate([x[:, :, :40].mean(axis=(1, 2)), x[:, :, 60:].mean(axis=(1, 2))], axis=1)
        return (feats - 0.1) / np.sqrt(4.0 + 1e-5)  # eval-mode BN with the running statistics

    v1, v2 = ref_view(images), ref_view(images[:, :, ::-1])
    np.testing.assert_allclose(emb, v1 + v2, rtol=1e-5, atol=1e-6)
    ref_xnorm = np.concatenate([np.linalg.norm(v1, axis=1), np.linalg.norm(v2, axis=1)]).mean()
    assert xnorm == pytest.approx(ref_xnorm, rel=1e-5)
    assert not np.allclose(v1, v2)  # the test model really sees the flip

    model.eval()
    embed_images(model, images, batch_size=3)
    assert not model.training
    with pytest.raises(TypeError, match="uint8"):
        embed_images(model, images.astype(np.float32), 4)


def test_bin_end_to_end_accuracy(tmp_path):
    # Images whose left-half colour encodes identity: same pairs share it, different pairs do not.
    rng = np.random.default_rng(1)
    bins, issame = [], []
    for i in range(40):
        same = i % 2 == 0
        c1 = rng.integers(0, 256, 3)
        c2 = c1 if same else rng.integers(0, 256, 3)
        for c in (c1, c2):
            img = np.zeros((112, 112, 3), np.uint8)
            img[:, :] = c
            img += rng.integers(0, 3, img.shape, dtype=np.uint8)
            bins.append(cv2.imencode(".png", img[:, :, ::-1])[1].tobytes())
        issame.append(same)
    path = tmp_path / "colors.bin"
    path.write_bytes(pickle.dumps((bins, issame)))
    images, flags = load_bin(path)

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)) + 1.5  # strictly positive, so colour differences show in angle

    emb = embed_images(Mean(), images, 16)
    res = evaluate(emb, flags, nrof_folds=10)
    acc, std, _ = _reference_protocol(emb, flags)
    assert res["accuracy"] == pytest.approx(acc) and res["std"] == pytest.approx(std)
    assert res["accuracy"] > 0.9
