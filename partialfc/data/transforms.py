"""Image decoding and the training augmentation shared by every dataset.

Training images become ``FloatTensor[3, 112, 112]``, RGB, normalized as ``(x - 127.5) / 127.5`` — the
input contract of every backbone (arcface_torch's ``transforms.Normalize(mean=0.5, std=0.5)`` on [0, 1]).
Decoding is OpenCV's ``imdecode`` and runs inside the DataLoader worker processes.

The uint8 BGR -> normalized float RGB conversion (plus the mirror) is the compiled op
``torch.ops.partialfc.image_to_tensor`` when ``partialfc._C`` is loaded (and not disabled with
``PARTIALFC_DISABLE_EXT=1``), otherwise ``to_tensor_numpy``; both give the same float32 values.
"""
import logging
import multiprocessing
from multiprocessing.context import get_spawning_popen

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

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


def to_tensor_numpy(img_bgr, flip=False):
    """BGR uint8 [H, W, 3] -> normalized RGB float tensor [3, H, W] with numpy (the reference conversion)."""
    # One strided ufunc pass does the BGR -> RGB swap, the mirror, HWC -> CHW and the uint8 -> float32
    # conversion; numpy is single-threaded, so workers do not contend for an intra-op thread pool.
    src = img_bgr[:, ::-1] if flip else img_bgr
    out = np.empty((3,) + img_bgr.shape[:2], dtype=np.float32)
    np.subtract(src.transpose(2, 0, 1)[::-1], np.float32(127.5), out=out)
    np.divide(out, np.float32(127.5), out=out)
    return torch.from_numpy(out)


_UNRESOLVED = object()
_image_op = _UNRESOLVED  # the compiled op, None (numpy), or not looked up yet in this process
_decoded_op = None  # partialfc._C.decoded_image_to_tensor once resolved (None: use to_tensor)


def compiled_to_tensor():
    """``torch.ops.partialfc.image_to_tensor`` when the compiled op is usable in this process, else None."""
    global _image_op, _decoded_op
    if _image_op is _UNRESOLVED:
        op = fast = None
        try:
            from ..ops import extension
            if extension.enabled() and hasattr(torch.ops.partialfc, "image_to_tensor"):
                op = torch.ops.partialfc.image_to_tensor.default
                # the overload's underlying builtin: the same call without a Python frame per sample
                op = getattr(op, "_op", op)
                # the same kernel called straight from Python on the decoded array (csrc/image_fastpath.cpp),
                # an entry point of the compiled module itself
                from .. import _C as compiled
                fast = getattr(compiled, "decoded_image_to_tensor", None)
        except Exception:  # the package's op module cannot load: numpy it is
            op = fast = None
        _image_op, _decoded_op = op, fast
    return _image_op


def to_tensor(img_bgr, flip=False):
    """BGR uint8 [H, W, 3] -> normalized RGB float tensor [3, 112, 112], mirrored when ``flip``."""
    if img_bgr.shape[0] != IMAGE_SIZE or img_bgr.shape[1] != IMAGE_SIZE:
        img_bgr = cv2.resize(img_bgr, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    op = compiled_to_tensor()
    if op is not None and img_bgr.dtype == np.uint8 and img_bgr.ndim == 3 and img_bgr.shape[2] == 3:
        if not (img_bgr.flags.c_contiguous and img_bgr.flags.writeable):  # torch.from_numpy wants both
            img_bgr = np.array(img_bgr, order="C")
        return op(torch.from_numpy(img_bgr), bool(flip))
    return to_tensor_numpy(img_bgr, flip)


def decode_to_tensor(buf, flip=False, where="image"):
    """Decode encoded image bytes into the training tensor (see ``to_tensor``).

    ``where`` (a string, or a callable returning one) names the image in the error message.
    """
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR) if len(buf) else None
    if img is None:
        raise CorruptImageError(f"cannot decode {where() if callable(where) else where} ({len(buf)} bytes): "
                                f"not a valid JPEG/PNG image")
    return decoded_to_tensor(img, flip)


_DECODED_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


def decoded_to_tensor(img, flip):
    """``to_tensor`` for an array fresh from ``cv2.imdecode(..., cv2.IMREAD_COLOR)`` (contiguous, writable,
    uint8 [H, W, 3]), with the fewest checks: the per-sample path of the datasets. The compiled kernel is
    called without making a tensor of ``img`` or passing through torch's dispatcher (about 2-5 µs per image
    saved; the values are the op's)."""
    fast = _decoded_op
    if fast is not None and img.shape == _DECODED_SHAPE:
        return fast(img, flip)
    return to_tensor(img, flip)


_M64 = 0xFFFFFFFFFFFFFFFF


def flip_bit(seed, epoch, index):
    """A deterministic fair coin for (seed, epoch, sample index): splitmix64 of the three."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) + 1) & _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return bool(x & 1)


def flip_bits(seed, epoch, start, stop):
    """``flip_bit(seed, epoch, i)`` for ``i`` in ``[start, stop)``, vectorized: a bool array."""
    base = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 1) & _M64
    x = np.arange(start, stop, dtype=np.uint64) + np.uint64(base)  # wraps modulo 2**64
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x & np.uint64(1)).astype(bool)


class FlipTable:
    """The flip coins of one epoch, computed 65,536 samples at a time on first use (one bit per sample).

    Per-sample lookups cost a list and a bytes index instead of three 64-bit multiplications in Python.
    """

    BLOCK_BITS = 16  # written out as 16 / 0xFFFF in __call__

    def __init__(self, seed, epoch, size):
        self.seed, self.epoch, self.size = int(seed), int(epoch), int(size)
        self.blocks = [None] * ((self.size + (1 << self.BLOCK_BITS) - 1) >> self.BLOCK_BITS)

    def fill(self, b):
        """Compute block ``b`` of the coins (samples ``b * 65536`` on) and return it."""
        lo = b << self.BLOCK_BITS
        hi = min(lo + (1 << self.BLOCK_BITS), self.size)
        self.blocks[b] = block = np.packbits(flip_bits(self.seed, self.epoch, lo, hi), bitorder="little").tobytes()
        return block

    def __call__(self, index):
        if not 0 <= index < self.size:
            return flip_bit(self.seed, self.epoch, index)
        block = self.blocks[index >> 16] or self.fill(index >> 16)
        return (block[(index & 0xFFFF) >> 3] >> (index & 7)) & 1 == 1


class CorruptCounter:
    """Counts images skipped under ``corrupt_images="skip"`` and logs each with the running total.

    The count lives in shared memory, so that it is one total per dataset over every DataLoader worker and
    every epoch: workers are started afresh each epoch from the main process's dataset, and a count kept in
    a worker's copy would restart at each epoch and in each worker. The main process and each worker id
    count in their own slot (no lock, which a worker started with "spawn" could not share); the total is
    their sum. A copy made by pickling outside a process start (``copy.deepcopy``, ``pickle.dumps``) gets its
    own slots, holding the counts it was made with.
    """

    SLOTS = 256  # slot 0: the main process; worker k: slot 1 + k % 255

    def __init__(self):
        self._slots = multiprocessing.RawArray("q", self.SLOTS)

    @property
    def count(self):
        return int(sum(self._slots))

    def skipped(self, message):
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self._slots[slot] += 1
        n = self.count
        if n <= 10 or (n & (n - 1)) == 0:  # the first ten, then at powers of two
            who = "the main process" if info is None else f"worker {info.id}"
            logger.warning("skipping corrupt image #%d of this reader (a running total over all its workers and "
                           "epochs; %d by %s): %s", n, self._slots[slot], who, message)

    def __getstate__(self):
        if get_spawning_popen() is not None:  # a worker being started: it shares the slots
            return {"slots": self._slots}
        return {"counts": list(self._slots)}

    def __setstate__(self, state):
        if "slots" in state:
            self._slots = state["slots"]
        else:
            self._slots = multiprocessing.RawArray("q", state["counts"])
