"""Training datasets: indexed .rec, shuffled sequential .rec, image folder, synthetic and random.

Every dataset yields ``(FloatTensor[3, 112, 112], int label)``: RGB normalized as ``(x - 127.5) / 127.5``,
mirrored at random (a coin derived from the seed, the epoch and the sample, so runs repeat exactly).
Decoding happens where ``__getitem__``/``__iter__`` runs, i.e. in the DataLoader worker processes.

Two .rec layouts are accepted:

* insightface: record 0 is a header ``IRHeader(flag=2, label=(a, b))`` with an empty payload; image
  records have keys ``1 .. a-1``; records ``a .. b-1`` are one per identity (in label order) with
  ``label=(first image key, end image key)``.
* plain im2rec: every record is an image (scalar label, or ``flag>0`` labels whose first value is the
  class), no header record.

The synthetic set (``SyntheticFaceDataset``, over the arrays ``partialfc.data.synthetic`` generates) and the
I/O-free ``RandomFaceDataset`` follow the same contract (the synthetic one yields its label as a tensor).
The RecordIO layout is ``partialfc.data.recordio``'s; descriptors and block reads are
``partialfc.data.fast_reader``'s.
"""
import logging
import os
import re

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from . import recordio
from .fast_reader import FORK_GENERATION, RecFile, read_spans
from .recordio import (FRAME_FLAG_LABEL, FRAME_SIZE, IR_FLAG_LABEL, IR_HEADER_SIZE, LABEL_VALUE, MAGIC,
                       RecordIOError, header_label, parse_record, read_labels, record_id, split_label, unpack)
from .transforms import (CorruptCounter, CorruptImageError, FlipTable, decode_to_tensor, decoded_to_tensor,
                         flip_bit)

logger = logging.getLogger("partialfc.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_HEAD_END = FRAME_SIZE + IR_HEADER_SIZE  # 32: where the image of a single-part record with a scalar label starts
_ID_RE = re.compile(r"^(?:id_)?(\d+)$")


class DataError(ValueError):
    """Invalid training data (label out of range, class counts that disagree, missing index, empty folder ...)."""


def property_path(folder):
    return os.path.join(folder, "property")


def resolve_num_classes(labels, path, describe, num_classes=None, header_count=None, header_source=None,
                        property_dir=None):
    """The class count of a training set: the one rule every reader applies at open (docs/data.md, "Class
    count").

    ``labels`` are the classes of all images, known without decoding; ``describe(i)`` names the record (key,
    or offset) or folder that label ``i`` came from, in messages about ``path``. ``num_classes`` (the config's) wins when
    given, and must cover every label. Otherwise every available count must agree: the identity range of the
    insightface header record (``header_count``, described by ``header_source``), ``property`` in
    ``property_dir`` (``num_classes,112,112``) and the labels' max + 1. Any disagreement, a negative label or
    one outside the count is a ``DataError`` naming the values and the files they come from.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise DataError(f"{path!r} holds no images")
    neg = np.flatnonzero(labels < 0)
    if neg.size:
        i = int(neg[0])
        raise DataError(f"label {int(labels[i])} of {describe(i)} in {path!r} is negative; labels are class "
                        f"indices 0, 1, ...: fix the data")
    top = int(np.argmax(labels))
    max_label = int(labels[top])
    if num_classes is not None:
        n = int(num_classes)
        if max_label >= n:
            i = int(np.flatnonzero(labels >= n)[0])
            raise DataError(f"label {int(labels[i])} of {describe(i)} in {path!r} is outside [0, {n}) "
                            f"(num_classes = {n} from the config); fix the data or set num_classes to cover it")
        return n
    counts = []  # (count, where it comes from), in order of precedence
    if header_count is not None:
        counts.append((int(header_count), header_source))
    if property_dir is not None:
        prop = read_property(property_dir)
        if prop is not None:
            counts.append((prop, f"property file {property_path(property_dir)!r}"))
    counts.append((max_label + 1, f"the labels of {path!r} (max label {max_label}, {describe(top)})"))
    if len({c for c, _ in counts}) > 1:
        said = "; ".join(f"{c} from {where}" + (f" (too few for label {max_label})" if c <= max_label else "")
                         for c, where in counts)
        raise DataError(f"the class count of {path!r} is ambiguous: {said}. Fix the file that is wrong "
                        f"(property holds 'num_classes,112,112'), or set num_classes in the config")
    return counts[0][0]


def label_mismatch(path, record, header_label_value, label, label_key):
    """The error for an image whose own header label is not the label of the identity record holding it."""
    return DataError(f"{record} of {path!r} has label {header_label_value} in its header, but identity record "
                     f"key {label_key} (label {label}) lists it among its images; the header and the identity "
                     f"records disagree: rebuild the file (python -m partialfc.tools.im2rec)")


def read_index(idx_path, rec_path):
    """The ``key<TAB>offset`` lines of ``idx_path`` as (list of int keys, int64 offsets array)."""
    if not os.path.isfile(idx_path):
        raise DataError(f"index file {idx_path!r} for RecordIO file {rec_path!r} does not exist; "
                        f"create it (python -m partialfc.tools.im2rec) or read the file sequentially "
                        f"with shuffled_rec=True")
    try:
        keys, offsets = recordio.read_index(idx_path)
    except RecordIOError as e:  # a malformed line: a data error of the training set
        raise DataError(str(e)) from None
    offsets = np.asarray(offsets, dtype=np.int64)
    size = os.path.getsize(rec_path)
    bad = np.flatnonzero((offsets < 0) | (offsets + FRAME_SIZE > size))
    if bad.size:
        i = int(bad[0])
        raise RecordIOError(f"index {idx_path!r} points past the end of {rec_path!r}: key {keys[i]}, "
                            f"offset {int(offsets[i])}, file size {size}")
    return keys, offsets


def record_extents(offsets, all_offsets, file_size):
    """Bytes from each of ``offsets`` to the next record start in ``all_offsets`` (or the end of the file):
    the frame, payload and padding of a single-part record, read with one ``pread``."""
    starts = np.unique(np.asarray(all_offsets, dtype=np.int64))
    nxt = np.searchsorted(starts, offsets, side="right")
    ends = np.append(starts, np.int64(file_size))[nxt]
    return ends - offsets


def is_header_record(header, payload):
    """Whether a record is an insightface header or identity record: multi-value label, no image."""
    return header.flag > 0 and len(payload) == 0


class _Augmented:
    """Shared state of the datasets: epoch, seed, flip and the corrupt-image policy."""

    def _init_aug(self, seed, random_flip, corrupt_images):
        if corrupt_images not in ("fail", "skip"):
            raise DataError(f"corrupt_images must be 'fail' or 'skip', got {corrupt_images!r}")
        self.seed = int(seed)
        self.epoch = 0
        self.random_flip = bool(random_flip)
        self._flips = None
        self.corrupt_images = corrupt_images
        self.corrupt = CorruptCounter()

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self._flips = None

    def _flip(self, index):
        """``flip_bit(seed, epoch, index)``, looked up in a per-process table of this epoch's coins."""
        if not self.random_flip:
            return False
        table = self._flips
        if table is None or table.epoch != self.epoch or table.seed != self.seed:
            self._flips = table = FlipTable(self.seed, self.epoch, getattr(self, "num_images", None) or len(self))
        if 0 <= index < table.size:  # FlipTable.__call__, inlined: this runs once per sample
            block = table.blocks[index >> 16] or table.fill(index >> 16)
            return (block[(index & 0xFFFF) >> 3] >> (index & 7)) & 1 == 1
        return table(index)


def insightface_images(rec, path, idx_path, h0, pos, offsets):
    """The images of an insightface-layout file from its .idx: (image keys 1..a-1, their offsets, labels,
    label keys). Labels come from the identity records (one read per identity; ``label_keys`` holds the
    identity record's key); an image outside every identity range takes its own header's label (and its own
    key)."""
    first_id, end_id = int(h0.label[0]), int(h0.label[1])
    image_keys = np.arange(1, first_id, dtype=np.int64)
    missing = [k for k in range(1, first_id) if k not in pos]
    if missing:
        raise DataError(f"{path!r}: header record 0 says image keys 1..{first_id - 1}, but key "
                        f"{missing[0]} is not in {idx_path!r} ({len(missing)} missing)")
    image_offsets = offsets[[pos[k] for k in range(1, first_id)]]
    labels = np.full(len(image_keys), -1, dtype=np.int64)
    label_keys = np.zeros(len(image_keys), dtype=np.int64)
    for ident, key in enumerate(range(first_id, end_id)):
        if key not in pos:
            raise DataError(f"{path!r}: identity record key {key} (label {ident}) is not in {idx_path!r}")
        h = rec.header(offsets[pos[key]], key)
        if np.isscalar(h.label) or len(h.label) < 2:
            raise DataError(f"{path!r}: identity record key {key} has label {h.label!r}, "
                            f"expected (first image key, end image key)")
        lo, hi = int(h.label[0]), int(h.label[1])
        if not 1 <= lo <= hi <= first_id:
            raise DataError(f"{path!r}: identity record key {key} has image range [{lo}, {hi}) "
                            f"outside the image keys [1, {first_id})")
        taken = np.flatnonzero(labels[lo - 1:hi - 1] >= 0)
        if taken.size:
            k = lo + int(taken[0])
            raise DataError(f"{path!r}: image key {k} is in the ranges of identity records key "
                            f"{int(label_keys[k - 1])} and key {key}; each image belongs to one identity")
        labels[lo - 1:hi - 1] = ident
        label_keys[lo - 1:hi - 1] = key
    unlabeled = np.flatnonzero(labels < 0)
    if unlabeled.size:  # images outside every identity range: their own header decides
        labels[unlabeled] = read_labels(path, image_offsets[unlabeled], image_keys[unlabeled])
        label_keys[unlabeled] = image_keys[unlabeled]
    return image_keys, image_offsets, labels, label_keys, end_id - first_id


def header_source(path, h0):
    return f"header record 0 of {path!r} (identity records keys {int(h0.label[0])}..{int(h0.label[1]) - 1})"


class _Labeled:
    """The label bookkeeping both record readers share: ``labels[i]`` (known at open) and ``label_keys[i]``
    (the record that gave it: an identity record in the insightface layout, the image itself otherwise)."""

    def _where(self, i, offset=False):
        if self.keys is None:
            return f"record at offset {int(self.offsets[i])}"
        return f"record key {int(self.keys[i])}" + (f" (offset {int(self.offsets[i])})" if offset else "")

    def _label_where(self, i):
        """The record a label known at open came from (the identity record in the insightface layout)."""
        if self.keys is not None and self.label_keys[i] != self.keys[i]:
            return f"record key {int(self.label_keys[i])}"
        return self._where(i)

    def _check_read_label(self, i, label):
        """A read image's own header label against the one known at open (they differ only in the
        insightface layout, where the identity records gave it, or when the file changed underneath)."""
        known = int(self.labels[i])
        if label != known and self.keys is not None and self.label_keys[i] != self.keys[i]:
            raise label_mismatch(self.path, self._where(i, offset=True), label, known, int(self.label_keys[i]))
        if not 0 <= label < self.num_classes:
            raise DataError(f"label {label} of {self._where(i)} in {self.path!r} (offset {int(self.offsets[i])}) "
                            f"is outside [0, {self.num_classes}) (num_classes = {self.num_classes})")
        if label != known:
            raise DataError(f"{self._where(i, offset=True)} of {self.path!r} has label {label}, but it had label "
                            f"{known} when the file was opened: the file changed during training")


class IndexedRecordDataset(_Augmented, _Labeled, Dataset):
    """Random access over ``train.rec`` + ``train.idx`` (insightface layout or plain im2rec)."""

    def __init__(self, rec_path, idx_path=None, num_classes=None, seed=0, random_flip=True,
                 corrupt_images="fail"):
        self._init_aug(seed, random_flip, corrupt_images)
        self.path = os.fspath(rec_path)
        if not os.path.isfile(self.path):
            raise DataError(f"RecordIO file {self.path!r} does not exist")
        self.idx_path = os.fspath(idx_path) if idx_path else os.path.splitext(self.path)[0] + ".idx"
        keys, offsets = read_index(self.idx_path, self.path)
        self.file = RecFile(self.path)
        pos = dict(zip(keys, range(len(keys))))
        self.layout = "plain"
        if 0 in pos:
            h0, payload0 = unpack(self.file.record(offsets[pos[0]], 0))
            if is_header_record(h0, payload0):
                self.layout = "insightface"
        header_count = source = None
        if self.layout == "insightface":
            self.keys, self.offsets, self.labels, self.label_keys, header_count = insightface_images(
                self.file, self.path, self.idx_path, h0, pos, offsets)
            source = header_source(self.path, h0)
        else:
            self.keys = np.asarray(keys, dtype=np.int64)
            self.offsets = offsets
            self.labels = read_labels(self.path, offsets, keys)
            self.label_keys = self.keys
        if len(self.keys) == 0:
            raise DataError(f"RecordIO file {self.path!r} holds no images")
        self.extents = record_extents(self.offsets, offsets, os.path.getsize(self.path))
        self.num_classes = resolve_num_classes(self.labels, self.path, self._label_where, num_classes,
                                               header_count, source, os.path.dirname(self.path))

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        i = index % len(self.keys)
        # Fast path: one pread of the whole record (its extent is known from the .idx), the frame and the
        # header parsed in place, the JPEG decoded from a view of the read buffer.
        f = self.file
        buf = os.pread(f.raw_fd if f.raw_gen == FORK_GENERATION[0] else f.fd, self.extents.item(i),
                       self.offsets.item(i))
        if len(buf) > _HEAD_END:
            magic, lrec, flag, label = FRAME_FLAG_LABEL.unpack_from(buf)
            # flag 0: a scalar label; 32 < 8 + lrec <= len(buf): a whole single-part record with an IRHeader
            # and a non-empty payload
            if magic == MAGIC and flag == 0 and _HEAD_END < FRAME_SIZE + lrec <= len(buf):
                label = int(label)
                # the label known at open (in range; in the insightface layout the identity record's)
                if label == self.labels.item(i) and label < self.num_classes:
                    img = cv2.imdecode(np.frombuffer(buf, np.uint8, lrec - IR_HEADER_SIZE, _HEAD_END),
                                       cv2.IMREAD_COLOR)
                    if img is not None:
                        return decoded_to_tensor(img, self._flip(index)), label
        return self._getitem_checked(index)

    def _getitem_checked(self, index):
        """``__getitem__`` for everything off the fast path: multi-part records, multi-value labels, damaged
        frames, labels out of range and undecodable images (``corrupt_images``)."""
        n = len(self.keys)
        for attempt in range(n):
            i = (index + attempt) % n
            off, size, key = int(self.offsets[i]), int(self.extents[i]), int(self.keys[i])
            buf = os.pread(self.file.fd, size, off)
            parsed = parse_record(buf, len(buf))
            if parsed is None:  # multi-part record or a damaged frame: the general reader joins or reports it
                header, payload = unpack(self.file.record(off, key, size))
                label = header_label(header)
            else:
                label, payload = parsed
            if label != self.labels[i] or not 0 <= label < self.num_classes:
                self._check_read_label(i, label)
            try:
                img = decode_to_tensor(payload, self._flip(index),
                                       where=lambda: f"record key {key} of {self.path!r} (offset {off})")
            except CorruptImageError as e:
                if self.corrupt_images == "fail":
                    raise
                self.corrupt.skipped(f"{e}; using key {int(self.keys[(i + 1) % n])} instead")
                continue
            return img, label
        raise DataError(f"no decodable image in {self.path!r}")


def sort_class_names(names):
    """Folder names in class order: numerically when all are ``id_<n>`` or ``<n>``, else lexically."""
    names = list(names)
    if names and all(_ID_RE.match(n) for n in names):
        return sorted(names, key=lambda n: (int(_ID_RE.match(n).group(1)), n))
    return sorted(names)


def scan_image_folder(root):
    """[(path, label)], class names: one sub-folder per identity, sorted, labels contiguous from 0."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist")
    classes, samples = [], []
    for name in sort_class_names(e.name for e in os.scandir(root) if e.is_dir()):
        files = sorted(f for f in os.listdir(os.path.join(root, name))
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            continue
        label = len(classes)
        classes.append(name)
        samples.extend((os.path.join(root, name, f), label) for f in files)
    if not samples:
        raise DataError(f"image folder {root!r} has no class sub-folders with images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes


class ImageFolderDataset(_Augmented, Dataset):
    """``root/<identity>/*.jpg``: identities sorted (``id_<n>`` numerically), labels contiguous."""

    def __init__(self, root, num_classes=None, seed=0, random_flip=True, corrupt_images="fail"):
        self._init_aug(seed, random_flip, corrupt_images)
        self.root = os.fspath(root)
        self.samples, self.classes = scan_image_folder(self.root)
        self.labels = np.asarray([lab for _, lab in self.samples], dtype=np.int64)
        self.num_classes = resolve_num_classes(
            self.labels, self.root, lambda i: f"folder {os.path.basename(os.path.dirname(self.samples[i][0]))!r}",
            num_classes, property_dir=self.root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            with open(path, "rb") as f:
                buf = f.read()
            try:
                return decode_to_tensor(buf, self._flip(index), where=lambda: f"file {path!r}"), label
            except CorruptImageError as e:
                if self.corrupt_images == "fail":
                    raise
                self.corrupt.skipped(str(e))
        raise DataError(f"no decodable image in {self.root!r}")


def sequential_offsets(path, idx_path):
    """What the sequential reader knows at open, in file order: a dict with the image records' byte
    ``offsets``, their ``extents`` (bytes to the next record start), ``labels``, ``keys`` (None without an
    .idx), ``label_keys`` (the record each label came from, as in ``insightface_images``), and for the
    insightface layout ``header_count`` (identities in header record 0) and ``header_source``."""
    size = os.path.getsize(path)
    out = dict(header_count=None, header_source=None)
    if idx_path and os.path.isfile(idx_path):
        keys, all_offsets = read_index(idx_path, path)
        pos = dict(zip(keys, range(len(keys))))
        rec = RecFile(path)
        h0 = None
        if 0 in pos:
            h0, p0 = unpack(rec.record(all_offsets[pos[0]], 0))
            h0 = h0 if is_header_record(h0, p0) else None
        if h0 is not None:
            image_keys, offsets, labels, label_keys, out["header_count"] = insightface_images(
                rec, path, idx_path, h0, pos, all_offsets)
            out["header_source"] = header_source(path, h0)
        else:
            image_keys, offsets = np.asarray(keys, dtype=np.int64), all_offsets
            labels = read_labels(path, offsets, keys)
            label_keys = image_keys
        order = np.argsort(offsets, kind="stable")
        out.update(offsets=offsets[order], keys=image_keys[order], labels=labels[order],
                   label_keys=label_keys[order])
        out["extents"] = record_extents(out["offsets"], all_offsets, size)
        return out
    starts, offsets, labels, identities, h0 = [], [], [], [], None
    # The IRHeader and the first two values of a multi-value label: enough for the class of an image and for
    # the identity ranges of the insightface header and identity records, without reading a payload.
    header_bytes = IR_HEADER_SIZE + 2 * LABEL_VALUE.size
    for off, length, first in recordio.scan_records(path, header_bytes=header_bytes):
        starts.append(off)
        if len(first) < IR_HEADER_SIZE:
            raise DataError(f"record at offset {off} of {path!r} is {length} bytes, shorter than an IRHeader")
        flag, label = IR_FLAG_LABEL.unpack_from(first)
        if flag > 0 and length == IR_HEADER_SIZE + 4 * flag:  # header or identity record: labels, no image
            if flag >= 2:
                lo, hi = (int(LABEL_VALUE.unpack_from(first, IR_HEADER_SIZE + 4 * i)[0]) for i in (0, 1))
                if len(starts) == 1:  # insightface header record 0: label = (first identity key, end key)
                    h0 = (lo, hi)
                else:  # an identity record: label = (first image key, end image key)
                    identities.append((len(starts) - 1, lo, hi))
            continue
        if flag > 0:  # a multi-value label: the class is its first value, after the header
            if len(first) < IR_HEADER_SIZE + LABEL_VALUE.size:
                raise DataError(f"record at offset {off} of {path!r} says it has {flag} float32 labels but "
                                f"is only {length} bytes long")
            label = LABEL_VALUE.unpack_from(first, IR_HEADER_SIZE)[0]
        if not np.isfinite(label):
            raise DataError(f"record at offset {off} of {path!r} has label {label}, not a class index")
        offsets.append(off)
        labels.append(int(label))
    offsets = np.asarray(offsets, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    out.update(offsets=offsets, extents=record_extents(offsets, starts, size), labels=labels, keys=None,
               label_keys=None)
    if h0 is not None:
        out["header_count"] = h0[1] - h0[0]
        out["header_source"] = f"header record 0 of {path!r} (identity records keys {h0[0]}..{h0[1] - 1})"
        check_identity_ranges(path, offsets, starts, labels, identities)
    return out


def check_identity_ranges(path, offsets, starts, labels, identities):
    """Without an .idx a record's key is its position in the file (im2rec writes keys in order): every image
    in identity ``k``'s key range must carry label ``k`` in its own header."""
    image_keys = np.searchsorted(np.asarray(starts, dtype=np.int64), offsets)
    for ident, (key, lo, hi) in enumerate(identities):
        a, b = np.searchsorted(image_keys, (lo, hi))
        wrong = np.flatnonzero(labels[a:b] != ident)
        if wrong.size:
            i = int(a + wrong[0])
            raise label_mismatch(path, f"record key {int(image_keys[i])} (offset {int(offsets[i])})",
                                 int(labels[i]), ident, key)


def read_property(folder):
    p = os.path.join(folder, "property")
    if os.path.isfile(p):
        with open(p) as f:
            text = f.read().strip()
        try:
            return int(text.split(",")[0])
        except ValueError:
            raise DataError(f"malformed property file {p!r}: {text!r} (expected 'num_classes,112,112')") from None
    return None


class SequentialRecordDataset(_Augmented, _Labeled, IterableDataset):
    """One front-to-back pass over a (shuffled) .rec per epoch, with an in-memory shuffle buffer.

    The records are cut into contiguous chunks; each epoch the chunk order is permuted from
    ``(seed, epoch)``, the permuted sequence is cut into ``world_size`` equal parts (one per rank), and a
    rank's part into whole-batch pieces (one per DataLoader worker). A worker reads its chunks
    sequentially and draws samples at random from a buffer of ``shuffle_buffer / num_workers`` records.
    Each rank therefore yields exactly ``len(self) // batch_size`` full batches, and across ranks every
    record is used at most once per epoch (exactly once when the count divides the global batch).
    """

    def __init__(self, rec_path, idx_path=None, num_classes=None, rank=0, world_size=1, batch_size=128,
                 num_workers=0, shuffle_buffer=10000, seed=0, random_flip=True, corrupt_images="fail",
                 chunk_records=None):
        self._init_aug(seed, random_flip, corrupt_images)
        self.path = os.fspath(rec_path)
        if not os.path.isfile(self.path):
            raise DataError(f"RecordIO file {self.path!r} does not exist")
        if idx_path is None:
            idx_path = os.path.splitext(self.path)[0] + ".idx"
        scan = sequential_offsets(self.path, idx_path)
        self.offsets, self.extents, self.labels = scan["offsets"], scan["extents"], scan["labels"]
        self.keys, self.label_keys = scan["keys"], scan["label_keys"]
        self.num_images = len(self.offsets)
        self.num_classes = resolve_num_classes(self.labels, self.path, self._label_where, num_classes,
                                               scan["header_count"], scan["header_source"],
                                               os.path.dirname(self.path))
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = int(batch_size)
        self.num_workers = max(int(num_workers), 0)
        self.shuffle_buffer = max(int(shuffle_buffer), 1)
        self.num_batches = self.num_images // (self.batch_size * self.world_size)
        if self.num_batches == 0:
            raise DataError(f"{self.path!r} holds {self.num_images} images, fewer than one global batch "
                            f"({self.world_size} ranks x batch_size {self.batch_size})")
        if chunk_records is None:
            parts = self.world_size * max(self.num_workers, 1) * 8
            chunk_records = max(1, min(4096, self.num_images // parts))
        self.chunk_records = int(chunk_records)
        self.file_size = os.path.getsize(self.path)

    def __len__(self):
        """Samples this rank yields per epoch."""
        return self.num_batches * self.batch_size

    def plan(self, epoch, worker, num_workers):
        """Record-index spans ``[(start, stop)]`` (file order) read by ``worker`` of this rank in ``epoch``."""
        n, c = self.num_images, self.chunk_records
        starts = np.arange(0, n, c)
        rng = np.random.default_rng([self.seed, int(epoch), 0x5EC])
        order = rng.permutation(len(starts))
        per_rank = self.num_batches * self.batch_size
        # batches of this rank split into contiguous whole-batch pieces, one per worker
        base, extra = divmod(self.num_batches, num_workers)
        w_batches = [base + (1 if w < extra else 0) for w in range(num_workers)]
        lo = self.rank * per_rank + sum(w_batches[:worker]) * self.batch_size
        hi = lo + w_batches[worker] * self.batch_size
        spans, pos = [], 0
        for ci in order:
            s = int(starts[ci])
            e = min(s + c, n)
            a, b = max(lo, pos), min(hi, pos + e - s)
            if a < b:
                spans.append((s + a - pos, s + b - pos))
            pos += e - s
            if pos >= hi:
                break
        return spans

    def records(self, spans, window=8 << 20, read_window=1 << 20, use_mmap=True, keep=False):
        """``(record index, offset, payload)`` of every record in ``spans``, read in large sequential blocks
        (``partialfc.data.fast_reader.read_spans``: mapped when resident, else ``preadv`` into a reused buffer;
        payloads are views valid until the next record unless ``keep``)."""
        return read_spans(self.path, self.offsets, self.extents, spans, window, read_window, use_mmap, keep)

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        spans = self.plan(self.epoch, worker, nw)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 0xB0F])
        capacity = max(1, self.shuffle_buffer // nw)
        buf = []
        last = None
        draws, d = rng.random(4096).tolist(), 0
        # keep=True: records from the page cache stay views of their mapped block, with no copy (the block stays
        # mapped while the buffer holds one of its records: about 7x the buffer's bytes of address space, in
        # page-cache pages the kernel can still reclaim); records read from disk into the reader's reused
        # buffer come as copies. Measured: 2-3 µs per image less than copying every record.
        for item in self.records(spans, keep=True):
            if len(buf) < capacity:
                buf.append(item)
                continue
            if d == len(draws):
                draws, d = rng.random(4096).tolist(), 0
            j = int(draws[d] * len(buf))
            d += 1
            out, buf[j] = buf[j], item
            sample = self._decode(out, buf, rng, last)
            last = sample
            yield sample
        rng.shuffle(buf)
        while buf:
            sample = self._decode(buf.pop(), buf, rng, last)
            last = sample
            yield sample

    def _decode(self, item, buf, rng, last):
        i, off, rec = item
        if len(rec) > IR_HEADER_SIZE:  # fast path: a scalar label in range and a decodable image
            flag, label = IR_FLAG_LABEL.unpack_from(rec)
            if flag == 0:
                label = int(label)
                if label == self.labels.item(i) and label < self.num_classes:  # the label known at open
                    img = cv2.imdecode(np.frombuffer(rec, np.uint8, len(rec) - IR_HEADER_SIZE, IR_HEADER_SIZE),
                                       cv2.IMREAD_COLOR)
                    if img is not None:
                        return decoded_to_tensor(img, self._flip(i)), label
        return self._decode_checked(item, buf, rng, last)

    def _decode_checked(self, item, buf, rng, last):
        """``_decode`` off the fast path: multi-value labels, labels out of range, undecodable images."""
        i, off, rec = item
        label, payload = split_label(rec)
        if label != self.labels[i] or not 0 <= label < self.num_classes:
            self._check_read_label(i, label)
        try:
            return decode_to_tensor(payload, self._flip(i),
                                    where=lambda: f"record key {record_id(rec)} of {self.path!r} (offset {off})"), label
        except CorruptImageError as e:
            if self.corrupt_images == "fail":
                raise
            self.corrupt.skipped(f"{e}; a buffered sample is used instead")
            for _ in range(8):
                if not buf:
                    break
                j = int(rng.integers(len(buf)))
                label2, payload2 = split_label(buf[j][2])
                if label2 != self.labels[buf[j][0]] or not 0 <= label2 < self.num_classes:
                    self._check_read_label(buf[j][0], label2)
                try:
                    return decode_to_tensor(payload2, self._flip(buf[j][0])), label2
                except CorruptImageError:
                    continue
            if last is not None:
                return last
            raise


class SyntheticFaceDataset(Dataset):
    """``(FloatTensor [3, 112, 112] in [-1, 1] RGB, int64 label tensor)`` over the synthetic training arrays
    (``partialfc.data.synthetic.ensure_synthetic`` writes them): ``images_path`` uint8 [N, 112, 112, 3] RGB,
    read memory-mapped, and ``labels_path`` int64 [N]."""

    def __init__(self, images_path, labels_path, num_classes, seed=0, random_flip=True):
        self.images = np.load(images_path, mmap_mode="r")
        self.labels = np.load(labels_path)
        self.num_classes = int(num_classes)
        self.random_flip = random_flip
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.from_numpy(np.array(self.images[i]))  # [112, 112, 3] uint8
        # The flip is a function of (seed, epoch, index): the same in every worker and after a resume.
        if self.random_flip and flip_bit(self.seed, self.epoch, i):
            img = img.flip(1)
        img = img.permute(2, 0, 1).float().sub_(127.5).div_(127.5)
        return img, torch.tensor(int(self.labels[i]), dtype=torch.long)


class RandomFaceDataset(Dataset):
    """``rec="random"``: one fixed random image and pseudo-random labels, for throughput runs without I/O
    (like arcface_torch's synthetic speed benchmark)."""

    def __init__(self, num_classes, num_image, seed=0):
        if not num_classes or not num_image:
            raise DataError("rec='random' needs num_classes and num_image in the config")
        self.num_classes, self.num_images = int(num_classes), int(num_image)
        gen = torch.Generator().manual_seed(int(seed))
        self.image = torch.rand(3, 112, 112, generator=gen).mul_(2).sub_(1)
        self.seed = int(seed)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        label = (index * 2654435761 + self.seed) % self.num_classes
        return self.image, label
