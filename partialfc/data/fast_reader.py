"""Fast RecordIO reading for the training datasets: descriptors, block reads and page-cache residency.

* ``RecFile``: a read-only descriptor opened lazily once per process (``FORK_GENERATION`` counts forks, so
  a DataLoader worker reopens it without a ``getpid()`` per read) for ``pread``-based record access;
* ``read_spans``: the records of index spans read front to back in large blocks, each block mapped with
  ``mmap`` when its pages are resident (``resident``, through ``mincore`` via ctypes) and read with
  ``preadv`` into one reused buffer otherwise; ``check_block`` checks the frames of a whole block at once
  with numpy and hands out memoryviews of the payloads.

The record layout itself (frame, IRHeader, ``.idx``) is ``partialfc.data.recordio``'s; multi-part records and
damaged frames go to its general reader. Used by ``partialfc.data.datasets`` and the data tools.
"""
import mmap
import os

import numpy as np

from .recordio import FRAME_SIZE, MAGIC, read_header_at, read_record_at

__all__ = ["FORK_GENERATION", "RecFile", "HAVE_PREADV", "MINCORE", "resident", "pread_into", "read_spans",
           "check_block"]

# Bumped in every forked child, so that a descriptor is reopened once per process without a getpid()
# system call per read.
FORK_GENERATION = [0]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: FORK_GENERATION.__setitem__(0, FORK_GENERATION[0] + 1))


class RecFile:
    """A lazily (re)opened read-only descriptor, one per process, for pread-based record access.

    ``fd`` opens the file when needed. A per-record path may read ``raw_fd`` directly while
    ``raw_gen == FORK_GENERATION[0]`` (the descriptor was opened in this process), and ``fd`` otherwise.
    """

    def __init__(self, path):
        self.path = path
        self.raw_fd = None
        self.raw_gen = None

    @property
    def fd(self):
        if self.raw_gen != FORK_GENERATION[0] or self.raw_fd is None:
            self.raw_fd = os.open(self.path, os.O_RDONLY)
            self.raw_gen = FORK_GENERATION[0]
        return self.raw_fd

    def __getstate__(self):
        return {"path": self.path, "raw_fd": None, "raw_gen": None}

    def record(self, offset, key=None, size_hint=8192):
        return read_record_at(self.fd, int(offset), self.path, key, size_hint=max(int(size_hint), 8))

    def header(self, offset, key=None):
        """The IRHeader of the record at ``offset`` without reading its payload."""
        return read_header_at(self.fd, int(offset), self.path, key)


def _libc_mincore():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mincore
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError, ImportError, TypeError):  # no C library to load (not a POSIX system)
        return None


MINCORE = _libc_mincore()  # libc's mincore(addr, length, vec), or None where it cannot be loaded


def resident(mapped):
    """Whether the first and the last page of the read-only ``mmap`` are in the page cache (``mincore``,
    which starts no I/O); False where that cannot be told."""
    if MINCORE is None:
        return False
    n = len(mapped)
    vec = np.zeros(1, np.uint8)
    addr = np.frombuffer(mapped, np.uint8).ctypes.data  # a read-only mapping has no writable ctypes view
    last = (n - 1) - (n - 1) % mmap.PAGESIZE
    for page in (0, last):
        if MINCORE(addr + page, 1, vec.ctypes.data) != 0 or not vec[0] & 1:
            return False
    return True


HAVE_PREADV = hasattr(os, "preadv")


def pread_into(fd, buf, size, offset):
    """Read up to ``size`` bytes at ``offset`` into the start of ``buf``; returns the count (less only at EOF)."""
    view = memoryview(buf)
    got = 0
    while got < size:
        if HAVE_PREADV:
            n = os.preadv(fd, [view[got:size]], offset + got)
        else:
            data = os.pread(fd, size - got, offset + got)
            n = len(data)
            view[got:got + n] = data
        if n <= 0:
            break
        got += n
    return got


def read_spans(path, offsets, extents, spans, window=8 << 20, read_window=1 << 20, use_mmap=True, keep=False):
    """``(record index, offset, payload)`` of every record in ``spans`` (``[(start, stop)]`` ranges of indices
    into ``offsets``, which are sorted in file order, and ``extents``, the bytes from each record start to the
    next one), read in large sequential blocks.

    A block of whole records (about ``window`` bytes) whose pages are in the page cache (``mincore`` of
    its first and last page) is mapped read-only with ``mmap``: no copy at all. Otherwise (the data is
    still on disk, or the file cannot be mapped) the block is read in pieces of about ``read_window``
    bytes with ``preadv`` into one reused buffer, which lets the kernel's read-ahead stream the file. The
    frames of all records of a piece are checked at once with numpy, and each single-part record comes
    out as a memoryview of the piece (no copy). A view is only guaranteed until the next record is
    requested, so a caller that keeps a record copies it; a mapped block is unmapped when its last view
    is released. With ``keep`` every record stays valid for as long as the caller holds it: views of a
    mapped block (which then stays mapped until its last view is dropped), copies of what was read into
    the reused buffer. Multi-part records and damaged frames go through the general reader (``bytes``, or
    a ``RecordIOError`` naming the file and offset).
    """
    ends = offsets + extents
    gran = mmap.ALLOCATIONGRANULARITY
    block = None
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        for start, stop in spans:
            span_ends = ends[start:stop]
            j = start
            while j < stop:
                base = int(offsets[j])
                k = max(j + 1, start + int(np.searchsorted(span_ends, base + window, side="right")))
                size = int(ends[k - 1]) - base
                mapped = None
                if use_mmap and base + size <= file_size:
                    lo = base - base % gran
                    try:
                        mapped = mmap.mmap(fd, base + size - lo, prot=mmap.PROT_READ, offset=lo)
                    except (OSError, ValueError, TypeError):  # no mmap here (file system or OS): read
                        use_mmap = False
                    else:
                        if not resident(mapped):  # on disk: page faults would read 128 KiB at a time
                            mapped.close()
                            mapped = None
                if mapped is not None:
                    yield from check_block(fd, path, offsets, extents, mapped, base - lo, size, j, k)
                    del mapped
                    j = k
                    continue
                while j < k:  # read the block piece by piece
                    base = int(offsets[j])
                    kk = min(k, max(j + 1, start + int(np.searchsorted(span_ends, base + read_window,
                                                                        side="right"))))
                    want = int(ends[kk - 1]) - base
                    if block is None or len(block) < want:
                        block = bytearray(max(read_window, want))
                    got = pread_into(fd, block, want, base)
                    yield from check_block(fd, path, offsets, extents, block, 0, got, j, kk, want, copy=keep)
                    j = kk
    finally:
        os.close(fd)


def check_block(fd, path, offsets, extents, buf, shift, got, j, k, want=None, copy=False):
    """The records ``[j, k)`` (of ``offsets``/``extents``) held in ``buf`` from byte ``shift`` on (``got``
    bytes of them, ``want`` expected): every frame checked at once, then ``(index, offset, memoryview of the
    payload)`` items (copies with ``copy``); records off the fast path come from the general reader on ``fd``."""
    offsets, extents = offsets[j:k], extents[j:k]
    rel = offsets - (int(offsets[0]) - shift)
    if (want is None or got == want) and not (rel & 3).any():  # records are 4-byte aligned in RecordIO
        words = np.frombuffer(buf, np.uint32, (shift + got) >> 2)
        w = rel >> 2
        magic, lrec = words[w], words[w + 1]
        del words
    else:  # odd offsets or a short read: gather the frame bytes one by one
        raw = np.frombuffer(buf, np.uint8, shift + got)
        pos = np.minimum(rel[:, None] + np.arange(FRAME_SIZE), max(shift + got - 1, 0))
        heads = raw[pos].copy().view(np.uint32) if got else np.zeros((k - j, 2), np.uint32)
        magic, lrec = heads[:, 0], heads[:, 1]
        del raw
    stop_at = rel + FRAME_SIZE + lrec  # lrec >= 2**29 (a multi-part record) fails the next test
    good = (magic == MAGIC) & (stop_at <= np.minimum(rel + extents, shift + got))
    view = buf if copy else memoryview(buf)  # slicing a bytearray copies, slicing a memoryview does not
    if good.all():
        # the common case, with no Python bytecode per record: zip and map build the items
        return zip(range(j, k), offsets.tolist(),
                   map(view.__getitem__, map(slice, (rel + FRAME_SIZE).tolist(), stop_at.tolist())))
    # multi-part records and damaged frames: the general reader joins or reports them
    return ((i, off, view[a:b] if ok else read_record_at(fd, off, path)) for i, off, a, b, ok in
            zip(range(j, k), offsets.tolist(), (rel + FRAME_SIZE).tolist(), stop_at.tolist(), good.tolist()))
