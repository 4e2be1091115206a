"""Image decoding and the training augmentation shared by every dataset.

Training images become ``FloatTensor[3, 112, 112]``, RGB, normalized as ``(x - 127.5) / 127.5`` — the
input contract of every backbone (arcface_torch's ``transforms.Normalize(mean=0.5, std=0.5)`` on [0, 1]).
Decoding is OpenCV's ``imdecode`` and runs inside the DataLoader worker processes.
"""
import logging

import cv2
import numpy as np
import torch

IMAGE_SIZE = 112
logger = logging.getLogger("partialfc.data")

# Decoding threads inside each worker would fight with the other workers for the cores.
cv2.setNumThreads(1)


class CorruptImageError(ValueError):
    """An image payload that OpenCV cannot decode; the message names the file and key."""


def decode_bgr(buf, where="image"):
    """Decode encoded image bytes into a BGR uint8 array [H, W, 3]; raises CorruptImageError."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None
    if img is None:
        raise CorruptImageError(f"cannot decode {where} ({len(buf)} bytes): not a valid JPEG/PNG image")
    return img


def to_tensor(img_bgr, flip=False):
    """BGR uint8 [H, W, 3] -> normalized RGB float tensor [3, 112, 112], mirrored when ``flip``."""
    if img_bgr.shape[0] != IMAGE_SIZE or img_bgr.shape[1] != IMAGE_SIZE:
        img_bgr = cv2.resize(img_bgr, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    # One strided ufunc pass does the BGR -> RGB swap, the mirror, HWC -> CHW and the uint8 -> float32
    # conversion; numpy is single-threaded, so workers do not contend for an intra-op thread pool.
    src = img_bgr[:, ::-1] if flip else img_bgr
    out = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    np.subtract(src.transpose(2, 0, 1)[::-1], np.float32(127.5), out=out)
    np.divide(out, np.float32(127.5), out=out)
    return torch.from_numpy(out)


def decode_to_tensor(buf, flip=False, where="image"):
    """``where`` (a string, or a callable returning one) names the image in the error message."""
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR) if len(buf) else None
    if img is None:
        raise CorruptImageError(f"cannot decode {where() if callable(where) else where} ({len(buf)} bytes): "
                                f"not a valid JPEG/PNG image")
    return to_tensor(img, flip)


def flip_bit(seed, epoch, index):
    """A deterministic fair coin for (seed, epoch, sample index): splitmix64 of the three."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return bool(x & 1)


class CorruptCounter:
    """Counts images skipped under ``corrupt_images="skip"`` and logs each with a running total."""

    def __init__(self):
        self.count = 0

    def skipped(self, message):
        self.count += 1
        if self.count <= 10 or (self.count & (self.count - 1)) == 0:
            logger.warning("skipping corrupt image #%d in this worker: %s", self.count, message)
