"""MXNet RecordIO without MXNet.

Drop-in replacements for ``mxnet.recordio``: ``MXRecordIO``, ``MXIndexedRecordIO``, ``IRHeader``,
``pack``, ``unpack``, ``pack_img`` and ``unpack_img`` take the same arguments and behave the same, so a
script ports by changing ``from mxnet import recordio`` into ``from partialfc.data import recordio``.
Files written here are byte-identical to files written by MXNet (tests/fixtures holds MXNet-made files).

File format (dmlc-core RecordIO, little-endian as written on x86):

* a record is ``magic (uint32 0xced7230a) | lrec (uint32) | payload | zero padding to 4 bytes``;
* ``lrec``'s upper 3 bits are a continuation flag ``cflag``, its lower 29 bits the part's length;
* a payload that contains the magic word at a 4-byte-aligned offset is written as several parts split at
  those offsets with the magic word itself dropped: cflag 1 for the first part, 2 for middle parts, 3 for
  the last one (0 is a record in one part). The reader joins the parts and puts the magic words back;
* a record must be shorter than 2**29 bytes.

An ``.idx`` file has one ``key<TAB>byte offset`` line per record. A record written by ``pack`` starts
with the image record header ``IRHeader`` (struct ``IfQQ``: flag, label, id, id2). When ``flag > 0`` the
label is ``flag`` float32 values that follow the header, and the header's own label field is 0.

This module is the one definition of these layouts in the package: the frame constants (``MAGIC``,
``LEN_MASK``, ``FRAME`` ...), the IRHeader structs (``IR_HEADER`` and the precompiled prefixes the datasets'
per-record paths unpack in one call), record encoding and decoding, and the ``.idx`` parser
(``parse_index``/``read_index``). Datasets, fast readers, tools and scripts use these public names.
"""
import numbers
import os
import struct
from collections import namedtuple

import numpy as np

__all__ = [
    "MXRecordIO", "MXIndexedRecordIO", "IRHeader", "pack", "unpack", "pack_img", "unpack_img",
    "RecordIOError", "MAGIC", "MAGIC_BYTES", "MAX_RECORD_BYTES", "CFLAG_SHIFT", "LEN_MASK", "FRAME",
    "FRAME_SIZE", "IR_FORMAT", "IR_HEADER", "IR_HEADER_SIZE", "IR_FLAG_LABEL", "FRAME_FLAG_LABEL",
    "LABEL_VALUE", "encode_record", "read_record_at", "read_header_at", "scan_records", "parse_index",
    "read_index", "parse_record", "header_label", "split_label", "record_id", "read_labels",
]

# --- the frame: magic | lrec (cflag << 29 | length) | payload | padding to 4 bytes ---
MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_RECORD_BYTES = 1 << 29          # records must be strictly shorter than this
CFLAG_SHIFT = 29                    # lrec >> CFLAG_SHIFT is the continuation flag
LEN_MASK = (1 << CFLAG_SHIFT) - 1   # lrec & LEN_MASK is the part's length
FRAME = struct.Struct("<II")        # magic, lrec
FRAME_SIZE = FRAME.size             # 8

# --- the image record header at the start of a payload written by ``pack`` ---
IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
IR_FORMAT = "IfQQ"
IR_HEADER = struct.Struct("<" + IR_FORMAT)
IR_HEADER_SIZE = IR_HEADER.size      # 24
# Precompiled prefixes for the per-record paths of the datasets (one ``unpack_from`` each):
IR_FLAG_LABEL = struct.Struct("<" + IR_FORMAT[:2])               # flag, scalar label: an IRHeader's first 8 bytes
FRAME_FLAG_LABEL = struct.Struct(FRAME.format + IR_FORMAT[:2])   # magic, lrec, flag, label: a record's first 16
LABEL_VALUE = struct.Struct("<f")    # one float32 value of a multi-value label (``flag > 0``)


class RecordIOError(ValueError):
    """A RecordIO file (or its .idx) is malformed; the message names the file, key and offset."""


def _where(path, offset, key=None):
    k = "" if key is None else f", key {key!r}"
    return f"{path!r}{k}, offset {offset}"


def encode_record(payload):
    """The framed bytes dmlc-core's RecordIOWriter::WriteRecord emits for ``payload``."""
    size = len(payload)
    if size >= MAX_RECORD_BYTES:
        raise RecordIOError(
            f"RecordIO records must be shorter than 2**29 = {MAX_RECORD_BYTES} bytes; got {size} bytes")
    splits = []
    if MAGIC_BYTES in payload:
        lower = size & ~3
        words = np.frombuffer(payload, dtype="<u4", count=lower // 4)
        splits = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out = []
    start = 0
    for pos in splits:
        cflag = 1 if start == 0 else 2
        out.append(FRAME.pack(MAGIC, (cflag << CFLAG_SHIFT) | (pos - start)))
        out.append(payload[start:pos])
        start = pos + 4
    cflag = 3 if splits else 0
    out.append(FRAME.pack(MAGIC, (cflag << CFLAG_SHIFT) | (size - start)))
    out.append(payload[start:])
    pad = (-size) & 3
    if pad:
        out.append(b"\x00" * pad)
    return b"".join(out)


def _read_part(read, path, offset, key):
    """One framed part via ``read(n)``; returns (cflag, data, bytes consumed) or None at a clean EOF."""
    head = read(8)
    if not head:
        return None
    if len(head) < 8:
        raise RecordIOError(f"truncated RecordIO file {_where(path, offset, key)}: "
                            f"{len(head)} bytes left where an 8-byte record header was expected")
    magic, lrec = FRAME.unpack(head)
    if magic != MAGIC:
        raise RecordIOError(f"invalid RecordIO file {_where(path, offset, key)}: magic word 0x{magic:08x}, "
                            f"expected 0x{MAGIC:08x} (not a .rec file, corrupted, or the offset is not a "
                            f"record start)")
    cflag = lrec >> CFLAG_SHIFT
    length = lrec & LEN_MASK
    padded = (length + 3) & ~3
    data = read(padded)
    if len(data) < length:
        raise RecordIOError(f"truncated RecordIO file {_where(path, offset, key)}: the record says "
                            f"{length} bytes but only {len(data)} remain")
    return cflag, data[:length], 8 + padded


def _read_record(read, path, offset, key=None):
    """A whole (joined) record via ``read(n)``: (payload, bytes consumed), or None at a clean EOF."""
    part = _read_part(read, path, offset, key)
    if part is None:
        return None
    cflag, data, used = part
    if cflag == 0:
        return data, used
    if cflag != 1:
        raise RecordIOError(f"invalid RecordIO file {_where(path, offset, key)}: the record starts with "
                            f"continuation flag {cflag} (expected 0 or 1)")
    pieces = [data]
    while True:
        part = _read_part(read, path, offset + used, key)
        if part is None:
            raise RecordIOError(f"truncated RecordIO file {_where(path, offset, key)}: the file ends "
                                f"inside a multi-part record")
        cflag, data, n = part
        used += n
        if cflag not in (2, 3):
            raise RecordIOError(f"invalid RecordIO file {_where(path, offset + used - n, key)}: "
                                f"continuation flag {cflag} inside a multi-part record")
        pieces.append(MAGIC_BYTES)
        pieces.append(data)
        if cflag == 3:
            return b"".join(pieces), used


def read_record_at(fd, offset, path="<fd>", key=None, size_hint=8192):
    """Read the record that starts at byte ``offset`` of the open file descriptor ``fd`` with pread.

    Safe to share ``fd`` between threads and forked processes (no file position is involved).
    """
    buf = os.pread(fd, size_hint, offset)
    if len(buf) >= 8:
        magic, lrec = FRAME.unpack_from(buf)
        length = lrec & LEN_MASK
        if magic == MAGIC and lrec >> CFLAG_SHIFT == 0 and len(buf) >= 8 + length:
            return buf[8:8 + length]
    pos = [offset]

    def read(n):
        data = os.pread(fd, n, pos[0])
        pos[0] += len(data)
        return data

    rec = _read_record(read, path, offset, key)
    if rec is None:
        raise RecordIOError(f"offset past the end of RecordIO file {_where(path, offset, key)} "
                            f"(file size {os.fstat(fd).st_size})")
    return rec[0]


def read_header_at(fd, offset, path="<fd>", key=None):
    """The IRHeader of the record that starts at byte ``offset`` of ``fd``, without reading its payload
    (one 64-byte pread; the whole record only when its label does not fit in those bytes)."""
    head = os.pread(fd, 64, offset)
    if len(head) >= FRAME_SIZE + IR_HEADER_SIZE:
        magic, lrec = FRAME.unpack_from(head)
        length = lrec & LEN_MASK
        if magic == MAGIC and lrec >> CFLAG_SHIFT in (0, 1) and length >= IR_HEADER_SIZE:
            flag = IR_HEADER.unpack_from(head, FRAME_SIZE)[0]
            if IR_HEADER_SIZE + 4 * flag <= min(length, len(head) - FRAME_SIZE):
                return unpack(head[FRAME_SIZE:FRAME_SIZE + min(length, 64 - FRAME_SIZE)])[0]
    return unpack(read_record_at(fd, offset, path, key))[0]


def parse_record(buf, size):
    """``(class label, payload memoryview)`` of the single-part record framed at the start of ``buf`` (``size``
    bytes of it read), or None when it needs the general reader (multi-part record, bad frame, short read)."""
    if size < FRAME_SIZE + IR_HEADER_SIZE:
        return None
    magic, lrec, flag, label = FRAME_FLAG_LABEL.unpack_from(buf)
    start = FRAME_SIZE + IR_HEADER_SIZE + 4 * flag
    end = FRAME_SIZE + lrec  # lrec < 2**29 exactly when the continuation flag is 0
    if magic != MAGIC or end > size or start > end:
        return None
    label = int(label) if flag == 0 else int(LABEL_VALUE.unpack_from(buf, FRAME_SIZE + IR_HEADER_SIZE)[0])
    return label, memoryview(buf)[start:end]


def scan_records(path, header_bytes=0):
    """Walk a .rec file without reading payloads: yields (offset, payload length, first bytes).

    ``first bytes`` holds up to ``header_bytes`` bytes of the payload (for IRHeader inspection).
    Multi-part records are joined for the length and the first bytes.
    """
    with open(path, "rb", buffering=1 << 20) as f:
        offset = 0
        size = os.fstat(f.fileno()).st_size
        while offset < size:
            start = offset
            total = 0
            first = b""
            expect_more = True
            first_part = True
            while expect_more:
                f.seek(offset)
                head = f.read(8)
                if len(head) < 8:
                    raise RecordIOError(f"truncated RecordIO file {_where(path, offset)}: "
                                        f"{len(head)} bytes left where an 8-byte record header was expected")
                magic, lrec = FRAME.unpack(head)
                if magic != MAGIC:
                    raise RecordIOError(f"invalid RecordIO file {_where(path, offset)}: magic word "
                                        f"0x{magic:08x}, expected 0x{MAGIC:08x}")
                cflag, length = lrec >> CFLAG_SHIFT, lrec & LEN_MASK
                if first_part and cflag not in (0, 1):
                    raise RecordIOError(f"invalid RecordIO file {_where(path, offset)}: the record starts "
                                        f"with continuation flag {cflag}")
                if not first_part and cflag not in (2, 3):
                    raise RecordIOError(f"invalid RecordIO file {_where(path, offset)}: continuation flag "
                                        f"{cflag} inside a multi-part record")
                if offset + 8 + length > size:
                    raise RecordIOError(f"truncated RecordIO file {_where(path, start)}: the record says "
                                        f"{length} bytes but only {size - offset - 8} remain")
                if len(first) < header_bytes:
                    if not first_part:
                        first += MAGIC_BYTES
                    first += f.read(min(length, header_bytes - len(first) + 4))
                total += length + (0 if first_part else 4)
                offset += 8 + ((length + 3) & ~3)
                expect_more = cflag in (1, 2)
                first_part = False
            yield start, total, first[:header_bytes]


def parse_index(lines, idx_path, key_type=int):
    """The ``key<TAB>byte offset`` lines of an ``.idx`` file as (list of keys, list of int offsets).

    Blank lines are skipped; a malformed line raises a ``RecordIOError`` naming ``idx_path`` and the line.
    """
    keys, offsets = [], []
    for lineno, line in enumerate(lines, 1):
        parts = line.strip().split("\t")
        if parts == [""]:
            continue
        try:
            key = key_type(parts[0])
            pos = int(parts[1])
        except (ValueError, IndexError):
            raise RecordIOError(f"malformed line {lineno} in index file {idx_path!r}: "
                                f"{line.rstrip()!r} (expected 'key<TAB>offset')") from None
        keys.append(key)
        offsets.append(pos)
    return keys, offsets


def read_index(idx_path, key_type=int):
    """``parse_index`` of the file ``idx_path``."""
    with open(idx_path) as f:
        return parse_index(f, idx_path, key_type)


class MXRecordIO:
    """Sequential RecordIO reader (``flag="r"``) or writer (``flag="w"``), as ``mxnet.recordio.MXRecordIO``."""

    def __init__(self, uri, flag):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.pid = None
        self.is_open = False
        self.handle = None
        self.open()

    def open(self):
        if self.flag == "w":
            self.handle = open(self.uri, "wb")
            self.writable = True
        elif self.flag == "r":
            self.handle = open(self.uri, "rb", buffering=1 << 20)
            self.writable = False
        else:
            raise ValueError(f"Invalid flag {self.flag}")
        self.pid = os.getpid()
        self.is_open = True

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        """Pickling closes the file; the unpickled object reopens it (as MXNet does)."""
        is_open = self.is_open
        self.close()
        d = dict(self.__dict__)
        d["is_open"] = is_open
        d["handle"] = None
        return d

    def __setstate__(self, d):
        self.__dict__ = d
        is_open = d["is_open"]
        self.is_open = False
        self.handle = None
        if is_open:
            self.open()

    def _check_pid(self, allow_reset=False):
        if self.pid != os.getpid():
            if allow_reset:
                self.reset()
            else:
                raise RuntimeError("Forbidden operation in multiple processes")

    def close(self):
        if not self.is_open:
            return
        self.handle.close()
        self.handle = None
        self.is_open = False
        self.pid = None

    def reset(self):
        """Reopen: a reader goes back to the start of the file (a writer truncates it, as MXNet's)."""
        self.close()
        self.open()

    def write(self, buf):
        assert self.writable
        self._check_pid(allow_reset=False)
        if len(buf) >= MAX_RECORD_BYTES:
            raise RecordIOError(f"RecordIO records must be shorter than 2**29 = {MAX_RECORD_BYTES} bytes; "
                                f"got {len(buf)} bytes for {self.uri!r}")
        self.handle.write(encode_record(bytes(buf)))

    def read(self):
        """The next record's bytes, or None at the end of the file."""
        assert not self.writable
        self._check_pid(allow_reset=True)
        offset = self.handle.tell()
        rec = _read_record(self.handle.read, self.uri, offset, getattr(self, "_current_key", None))
        return None if rec is None else rec[0]

    def tell(self):
        """Byte offset of the next record to be written or read."""
        return self.handle.tell()


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a ``key<TAB>offset`` index for random access, as ``mxnet.recordio.MXIndexedRecordIO``."""

    def __init__(self, idx_path, uri, flag, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.idx = {}
        self.keys = []
        self.key_type = key_type
        self.fidx = None
        if flag == "r":
            if not os.path.isfile(idx_path):
                raise FileNotFoundError(f"index file {idx_path!r} of RecordIO file {os.fspath(uri)!r} "
                                        f"does not exist")
        super().__init__(uri, flag)

    def open(self):
        super().open()
        self.idx = {}
        self.keys = []
        self.fidx = open(self.idx_path, self.flag)
        if not self.writable:
            self.keys, offsets = parse_index(self.fidx, self.idx_path, self.key_type)
            self.idx = dict(zip(self.keys, offsets))

    def close(self):
        if not self.is_open:
            return
        super().close()
        self.fidx.close()

    def __getstate__(self):
        d = super().__getstate__()
        d["fidx"] = None
        return d

    def seek(self, idx):
        """Position the reader at the record of key ``idx``."""
        assert not self.writable
        self._check_pid(allow_reset=True)
        pos = self.idx[idx]
        size = os.fstat(self.handle.fileno()).st_size
        if pos < 0 or pos >= size:
            raise RecordIOError(f"offset past the end of RecordIO file {_where(self.uri, pos, idx)} "
                                f"(file size {size}); the index {self.idx_path!r} does not match the file")
        self.handle.seek(pos)

    def tell(self):
        assert self.writable
        return self.handle.tell()

    def read_idx(self, idx):
        """The record of key ``idx``."""
        self.seek(idx)
        self._current_key = idx
        try:
            rec = self.read()
        finally:
            self._current_key = None
        if rec is None:
            raise RecordIOError(f"offset past the end of RecordIO file {_where(self.uri, self.idx[idx], idx)}")
        return rec

    def write_idx(self, idx, buf):
        """Append a record under key ``idx``."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self.fidx.write("%s\t%d\n" % (str(key), pos))
        self.idx[key] = pos
        self.keys.append(key)


def pack(header, s):
    """Prefix ``s`` with an IRHeader; a non-scalar label is stored as float32 values after the header."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + s
    return IR_HEADER.pack(*header) + s


def unpack(s):
    """Split a record into (IRHeader, payload bytes); a multi-value label comes back as a float32 array."""
    if len(s) < IR_HEADER_SIZE:
        raise RecordIOError(f"record of {len(s)} bytes is shorter than the {IR_HEADER_SIZE}-byte IRHeader")
    header = IRHeader(*IR_HEADER.unpack_from(s))
    s = s[IR_HEADER_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise RecordIOError(f"record says it has {header.flag} float32 labels but holds only "
                                f"{len(s)} bytes after the header")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[header.flag * 4:]
    return header, s


def header_label(header):
    """The class of an IRHeader: its scalar label, or the first value of a multi-value label."""
    label = header.label
    if not np.isscalar(label):
        label = label[0]
    return int(label)


def split_label(rec):
    """``(class label, payload memoryview)`` of a record's bytes (IRHeader + payload), as ``unpack`` +
    ``header_label`` would give, without building the header."""
    if len(rec) < IR_HEADER_SIZE:
        unpack(rec)  # raises the RecordIOError naming the sizes
    flag, label = IR_FLAG_LABEL.unpack_from(rec)
    if flag == 0:
        return int(label), memoryview(rec)[IR_HEADER_SIZE:]
    header, payload = unpack(rec)  # multi-value label: validates the label count
    return header_label(header), payload


def record_id(rec):
    """The ``id`` field of the IRHeader at the start of a record's bytes."""
    return IR_HEADER.unpack_from(rec)[2]


def read_labels(path, offsets, keys=None, block=1 << 16):
    """The class (``header_label``) of each record starting at ``offsets`` of ``path``, without reading
    payloads: an int64 array in the order of ``offsets``.

    The first 36 bytes of every record (frame, IRHeader, first label value) are gathered from a memory map,
    ``block`` records at a time; a record those bytes do not settle (a multi-part record, a damaged frame, a
    non-finite label) goes through ``read_header_at``, which reads it whole or raises the error naming it
    (with its key from ``keys``, when given).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    out = np.empty(len(offsets), dtype=np.int64)
    size = os.path.getsize(path)
    if len(offsets) == 0:
        return out
    if size == 0:
        raise RecordIOError(f"RecordIO file {path!r} is empty but {len(offsets)} records are expected")
    head = FRAME_SIZE + IR_HEADER_SIZE + LABEL_VALUE.size
    data = np.memmap(path, dtype=np.uint8, mode="r")
    span = np.arange(head, dtype=np.int64)
    fd = None
    try:
        for lo in range(0, len(offsets), block):
            off = offsets[lo:lo + block]
            raw = np.ascontiguousarray(data[np.minimum(off[:, None] + span, size - 1)]).view("<u4")
            magic, lrec, flag = raw[:, 0], raw[:, 1], raw[:, 2].astype(np.int64)
            length = (lrec & LEN_MASK).astype(np.int64)
            values = np.where(flag == 0, raw[:, 3], raw[:, 8]).view("<f4")
            ok = ((magic == MAGIC) & (lrec >> CFLAG_SHIFT == 0) & (off + FRAME_SIZE + length <= size)
                  & (length >= IR_HEADER_SIZE + 4 * flag) & ((flag == 0) | (length >= head - FRAME_SIZE))
                  & np.isfinite(values) & (np.abs(values) < 2.0 ** 62))
            labels = np.trunc(values).astype(np.int64)
            for j in np.flatnonzero(~ok):  # the general reader joins multi-part records or names the damage
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                key = None if keys is None else keys[lo + j]
                label = read_header_at(fd, int(off[j]), path, key).label
                value = float(label if np.isscalar(label) else label[0])
                if not np.isfinite(value) or abs(value) >= 2.0 ** 62:
                    raise RecordIOError(f"record {_where(path, int(off[j]), key)} has label {value}, "
                                        f"not a class index")
                labels[j] = int(value)
            out[lo:lo + len(off)] = labels
    finally:
        if fd is not None:
            os.close(fd)
        del data
    return out


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - opencv is a hard requirement of the project
        raise ImportError("pack_img/unpack_img need OpenCV: pip install opencv-python-headless") from e
    return cv2


def unpack_img(s, iscolor=-1):
    """Split a record into (IRHeader, image decoded by ``cv2.imdecode(buf, iscolor)``)."""
    header, s = unpack(s)
    img = np.frombuffer(s, dtype=np.uint8)
    img = _cv2().imdecode(img, iscolor)
    return header, img


def pack_img(header, img, quality=95, img_fmt=".jpg"):
    """Encode ``img`` (BGR, as OpenCV) with ``cv2.imencode`` and pack it after the header."""
    cv2 = _cv2()
    encode_params = None
    if img_fmt.upper() in (".JPG", ".JPEG"):
        encode_params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif img_fmt.upper() == ".PNG":
        encode_params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    if encode_params is None:
        ret, buf = cv2.imencode(img_fmt, img)
    else:
        ret, buf = cv2.imencode(img_fmt, img, encode_params)
    assert ret, "failed to encode image"
    return pack(header, buf.tobytes())
