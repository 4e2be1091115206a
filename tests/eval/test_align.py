"""Umeyama similarity fit and the ArcFace 5-point crop."""
import cv2
import numpy as np
import pytest

from partialfc.data.align import ARCFACE_DST, estimate_norm, norm_crop, umeyama


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx],
                     [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def test_template_onto_itself_is_identity():
    np.testing.assert_allclose(estimate_norm(ARCFACE_DST), np.eye(3)[:2], atol=1e-9)
    # 224 = 2 x 112: the template scaled by two
    np.testing.assert_allclose(estimate_norm(ARCFACE_DST * 2, image_size=224), np.eye(3)[:2], atol=1e-9)


@pytest.mark.parametrize("angle,scale,tx,ty", [(17.0, 1.7, 30.0, -12.5), (-65.0, 0.4, 5.0, 200.0),
                                               (179.0, 3.0, -40.0, 7.0)])
def test_known_similarity_is_recovered(angle, scale, tx, ty):
    m = _similarity(angle, scale, tx, ty)
    landmarks = _apply(m, ARCFACE_DST.astype(np.float64))  # the face as it appears in a loose image
    est = estimate_norm(landmarks)  # must undo m
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(est, inv, atol=1e-9)
    # and the forward direction through the generic fit
    np.testing.assert_allclose(umeyama(ARCFACE_DST, landmarks)[:2], m, atol=1e-9)


def test_least_squares_with_noise_beats_perturbations():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 2)) * 30
    dst = _apply(_similarity(30, 1.2, 3, 4), src) + rng.normal(size=(5, 2))
    best = umeyama(src, dst)[:2]
    err = np.sum((_apply(best, src) - dst) ** 2)
    a, b = best[0, 0], best[1, 0]  # a similarity is [[a, -b, tx], [b, a, ty]]
    assert best[0, 1] == pytest.approx(-b) and best[1, 1] == pytest.approx(a)
    for _ in range(200):
        da, db, dx, dy = rng.normal(size=4) * [1e-3, 1e-3, 1e-2, 1e-2]
        m = np.array([[a + da, -(b + db), best[0, 2] + dx], [b + db, a + da, best[1, 2] + dy]])
        assert np.sum((_apply(m, src) - dst) ** 2) >= err - 1e-9


def test_never_reflects():
    mirrored = ARCFACE_DST.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    m = estimate_norm(mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_norm_crop_undoes_a_warp():
    rng = np.random.default_rng(1)
    face = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 3)
    m = _similarity(20, 1.6, 60, 20)
    loose = cv2.warpAffine(face, m, (300, 260), flags=cv2.INTER_CUBIC)
    landmarks = _apply(m, ARCFACE_DST.astype(np.float64))
    crop = norm_crop(loose, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    inner = (slice(10, 102), slice(10, 102))
    diff = np.abs(crop[inner].astype(int) - face[inner].astype(int))
    assert diff.mean() < 3.0


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="5"):
        estimate_norm(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="coincide"):
        estimate_norm(np.ones((5, 2)))
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        estimate_norm(ARCFACE_DST, image_size=100)
