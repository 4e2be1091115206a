"""5-point face alignment to the ArcFace template (insightface's ``norm_crop``), without scikit-image.

The landmarks are, in order: left eye, right eye, nose tip, left mouth corner, right mouth corner (image
coordinates, x then y). :func:`estimate_norm` fits the least-squares similarity transform (rotation,
uniform scale, translation; Umeyama 1991) that maps them onto the template; :func:`norm_crop` warps the
image with it.
"""
import numpy as np

__all__ = ["ARCFACE_DST", "estimate_norm", "norm_crop", "umeyama"]

# The ArcFace 5-point template for 112x112 crops.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]],
    dtype=np.float32,
)


def umeyama(src, dst, estimate_scale=True):
    """Least-squares similarity transform taking points ``src`` [N, D] onto ``dst`` [N, D].

    Returns the ``(D + 1) x (D + 1)`` homogeneous matrix ``T`` minimizing ``sum ||T(src_i) - dst_i||^2``
    over rotations (no reflection), a uniform scale (when ``estimate_scale``) and a translation.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape != dst.shape:
        raise ValueError(f"umeyama needs two point sets of the same shape [N, D], got {src.shape} and {dst.shape}")
    n, dim = src.shape
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("umeyama: the points contain NaN or Inf")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = np.sum(src_c ** 2) / n
    if src_var <= 1e-12 * max(1.0, np.abs(src).max() ** 2):
        raise ValueError(f"umeyama: the source points coincide, no transform is defined: {src.tolist()}")

    cov = dst_c.T @ src_c / n  # D x D cross-covariance
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(dim)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would reflect: flip the weakest axis
        signs[-1] = -1.0
    rot = u @ np.diag(signs) @ vt
    scale = float(sing @ signs) / src_var if estimate_scale else 1.0

    out = np.eye(dim + 1)
    out[:dim, :dim] = scale * rot
    out[:dim, dim] = dst_mean - scale * rot @ src_mean
    return out


def _template(image_size):
    image_size = int(image_size)
    if image_size % 112 == 0:
        ratio, shift = image_size / 112.0, 0.0
    elif image_size % 128 == 0:  # insightface's 128-pixel variant: same scale as 112, centred horizontally
        ratio = image_size / 128.0
        shift = 8.0 * ratio
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
    dst = ARCFACE_DST.astype(np.float64) * ratio
    dst[:, 0] += shift
    return dst


def estimate_norm(landmark, image_size=112):
    """2x3 affine matrix (float64) mapping the 5 landmarks onto the ArcFace template at ``image_size``."""
    lmk = np.asarray(landmark, dtype=np.float64)
    if lmk.shape == (10,):
        lmk = lmk.reshape(5, 2)
    if lmk.shape != (5, 2):
        raise ValueError(f"landmark must be 5 (x, y) points, got shape {np.shape(landmark)}")
    return umeyama(lmk, _template(image_size))[:2, :]


def norm_crop(img, landmark, image_size=112):
    """Aligned ``image_size x image_size`` crop of ``img`` (any channel order, kept as is)."""
    import cv2

    if img is None or np.ndim(img) not in (2, 3):
        raise ValueError(f"norm_crop needs an HxW or HxWxC image, got {type(img).__name__}")
    m = estimate_norm(landmark, image_size)
    return cv2.warpAffine(img, m, (int(image_size), int(image_size)), borderValue=0.0)
