"""The datasets' fast read paths (one pread per indexed record; mapped or block-read sequential records with
frames checked in bulk) against the general RecordIO reader, including the records they hand to it."""
import os

import cv2
import numpy as np
import pytest

from partialfc.data import recordio
from partialfc.data.datasets import DataError, IndexedRecordDataset, SequentialRecordDataset
from partialfc.data.recordio import RecordIOError
from partialfc.data.transforms import CorruptImageError, flip_bit, to_tensor_numpy

from conftest import sample_image, write_insightface_rec


def asym_image(i, size=112):
    """sample_image with a bar on its left edge, so that a mirrored decode is told apart."""
    img = sample_image(i, size)
    img[:, :size // 5] = (255, 40, 128)
    return img


def magic_png(i):
    """A PNG whose bytes contain the RecordIO magic word at a 4-byte aligned payload offset (after the
    24-byte IRHeader), so that the writer splits the record into continuation parts."""
    png = cv2.imencode(".png", asym_image(i, size=24))[1].tobytes()
    # PNG readers ignore chunks after IEND; the payload starts at offset 24 of the record (aligned)
    pad = (-len(png)) % 4
    return png + b"\0" * pad + recordio.MAGIC_BYTES + b"tail"


def write_mixed_rec(folder, n=60, num_classes=6):
    """Plain layout with ordinary PNG records, multi-part records (magic word inside) and multi-value
    labels; returns the expected (label, image bytes) per record."""
    os.makedirs(folder, exist_ok=True)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    expect = []
    for i in range(n):
        label = i % num_classes
        if i % 7 == 3:
            payload = magic_png(i)
            rec = recordio.pack(recordio.IRHeader(0, float(label), i, 0), payload)
        elif i % 5 == 1:
            payload = cv2.imencode(".png", asym_image(i))[1].tobytes()
            rec = recordio.pack(recordio.IRHeader(0, [float(label), 0.5], i, 0), payload)
        else:
            payload = cv2.imencode(".png", asym_image(i))[1].tobytes()
            rec = recordio.pack(recordio.IRHeader(0, float(label), i, 0), payload)
        w.write_idx(i, rec)
        expect.append((label, payload))
    w.close()
    return expect


def expected_tensor(payload, flip):
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    if img.shape[:2] != (112, 112):
        img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_LINEAR)
    return to_tensor_numpy(img, flip)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mixed"))
    expect = write_mixed_rec(folder)
    raw = open(os.path.join(folder, "train.rec"), "rb").read()
    assert raw.count(recordio.MAGIC_BYTES) > 60  # continuation parts were written
    return folder, expect


def test_indexed_items_match_the_general_reader(mixed):
    folder, expect = mixed
    ds = IndexedRecordDataset(os.path.join(folder, "train.rec"), seed=5)
    ds.set_epoch(2)
    assert 10 < sum(flip_bit(5, 2, i) for i in range(len(expect))) < 50
    for i, (label, payload) in enumerate(expect):
        img, lab = ds[i]
        assert lab == label
        np.testing.assert_array_equal(img.numpy(), expected_tensor(payload, flip_bit(5, 2, i)).numpy())


@pytest.mark.parametrize("use_mmap", [True, False])
@pytest.mark.parametrize("window", [64, 2000, 1 << 20])  # smaller than a record, a few records, the file
def test_sequential_records_match_the_general_reader(mixed, use_mmap, window):
    folder, expect = mixed
    rec_path = os.path.join(folder, "train.rec")
    seq = SequentialRecordDataset(rec_path, batch_size=4, shuffle_buffer=8, seed=1, chunk_records=9)
    spans = seq.plan(0, 0, 1)
    reader = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), rec_path, "r")
    seen = []
    for i, off, rec in seq.records(spans, window=window, read_window=window, use_mmap=use_mmap):
        assert off == int(seq.offsets[i])
        assert bytes(rec) == reader.read_idx(i)
        seen.append(i)
    assert seen == [i for a, b in spans for i in range(a, b)]


@pytest.mark.parametrize("use_mmap", [True, False])
@pytest.mark.parametrize("window", [64, 2000])
def test_kept_records_stay_valid_after_the_reader_moves_on(mixed, use_mmap, window):
    """keep=True (what the shuffle buffer uses): every record still holds its bytes after the whole pass, when
    the reader has unmapped or overwritten the blocks it read them from; views of mapped blocks are not
    copies, records read into the reused buffer are."""
    folder, _ = mixed
    rec_path = os.path.join(folder, "train.rec")
    seq = SequentialRecordDataset(rec_path, batch_size=4, shuffle_buffer=8, seed=1, chunk_records=9)
    reader = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), rec_path, "r")

    def mappings():  # this process's mappings of the file (the general reader may hold one of its own)
        with open("/proc/self/maps") as f:
            return sorted(line.split()[0] for line in f if line.rstrip().endswith(rec_path))

    import gc
    expected = {i: reader.read_idx(i) for a, b in seq.plan(0, 0, 1) for i in range(a, b)}
    gc.collect()
    before = mappings()
    kept = list(seq.records(seq.plan(0, 0, 1), window=window, read_window=window, use_mmap=use_mmap, keep=True))
    if use_mmap:
        assert len(mappings()) > len(before)  # the kept views hold their blocks mapped
    assert len(kept) == sum(b - a for a, b in seq.plan(0, 0, 1))
    assert all(bytes(rec) == expected[i] for i, _, rec in kept)
    if not use_mmap:  # the reused read buffer: each record must be its own object
        assert all(not isinstance(rec, memoryview) for _, _, rec in kept)
    del kept  # (no loop variable may keep a record alive past this point)
    gc.collect()
    assert mappings() == before  # every block was unmapped once its records were dropped


def test_sequential_epoch_yields_every_sample_once(mixed):
    folder, expect = mixed
    seq = SequentialRecordDataset(os.path.join(folder, "train.rec"), batch_size=6, shuffle_buffer=10, seed=3)
    seq.set_epoch(1)
    got = {}
    for img, label in seq:
        matches = [k for k, (lab, p) in enumerate(expect) if lab == label and k not in got
                   and np.array_equal(img.numpy(), expected_tensor(p, flip_bit(3, 1, k)).numpy())]
        assert matches, "a yielded sample matches no record"
        got[matches[0]] = True
    assert len(got) == len(expect)


def _corrupt_copy(tmp_path, folder, edit):
    data = bytearray(open(os.path.join(folder, "train.rec"), "rb").read())
    idx = open(os.path.join(folder, "train.idx")).read()
    offsets = [int(line.split("\t")[1]) for line in idx.splitlines()]
    data = edit(data, offsets)
    out = tmp_path / "bad"
    os.makedirs(out, exist_ok=True)
    (out / "train.rec").write_bytes(bytes(data))
    (out / "train.idx").write_text(idx)
    return str(out / "train.rec"), offsets


@pytest.mark.parametrize("use_mmap", [True, False])
def test_damaged_frame_names_file_and_offset(mixed, tmp_path, use_mmap):
    folder, _ = mixed

    def smash(data, offsets):
        data[offsets[10]:offsets[10] + 4] = b"\x01\x02\x03\x04"
        return data

    rec, offsets = _corrupt_copy(tmp_path, folder, smash)
    # the plain layout's labels come from every record header at open, so both readers stop there
    with pytest.raises(RecordIOError, match=rf"offset {offsets[10]}: magic word 0x04030201"):
        IndexedRecordDataset(rec)
    kw = dict(num_classes=6, batch_size=4, shuffle_buffer=8, seed=1, chunk_records=64)
    with pytest.raises(RecordIOError, match=rf"offset {offsets[10]}: magic word 0x04030201"):
        SequentialRecordDataset(rec, **kw)
    # the block reader names a frame damaged after the open
    seq = SequentialRecordDataset(os.path.join(folder, "train.rec"), **kw)
    seq.path = rec
    with pytest.raises(RecordIOError, match=rf"invalid RecordIO file .*bad/train.rec.*offset {offsets[10]}: magic"):
        for _ in seq.records(seq.plan(0, 0, 1), use_mmap=use_mmap):
            pass


@pytest.mark.parametrize("use_mmap", [True, False])
def test_truncated_file(mixed, tmp_path, use_mmap):
    folder, _ = mixed
    rec, offsets = _corrupt_copy(tmp_path, folder, lambda data, offsets: data[:offsets[-1] + 20])
    kw = dict(num_classes=6, batch_size=4, shuffle_buffer=8, seed=1, chunk_records=64)
    with pytest.raises(RecordIOError, match=rf"truncated RecordIO file .*offset {offsets[-1]}"):
        SequentialRecordDataset(rec, **kw)  # the label scan at open reads every record's header
    seq = SequentialRecordDataset(os.path.join(folder, "train.rec"), **kw)
    seq.path = rec  # a file cut short after the open: the block reader names it
    with pytest.raises(RecordIOError, match=rf"truncated RecordIO file .*offset {offsets[-1]}"):
        for _ in seq.records(seq.plan(0, 0, 1), use_mmap=use_mmap):
            pass


def test_corrupt_images_fail_or_skip(tmp_path):
    folder = str(tmp_path / "corrupt")
    os.makedirs(folder)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    for i in range(16):
        payload = b"not an image" if i == 5 else cv2.imencode(".png", sample_image(i))[1].tobytes()
        w.write_idx(i, recordio.pack(recordio.IRHeader(0, float(i % 2), i, 0), payload))
    w.close()
    rec = os.path.join(folder, "train.rec")
    with pytest.raises(CorruptImageError, match=r"record key 5 of .*train.rec.* \(offset \d+\) \(12 bytes\)"):
        IndexedRecordDataset(rec, random_flip=False)[5]
    ds = IndexedRecordDataset(rec, random_flip=False, corrupt_images="skip")
    img, label = ds[5]  # substituted by key 6
    np.testing.assert_array_equal(img.numpy(), to_tensor_numpy(sample_image(6), False).numpy())
    assert (label, ds.corrupt.count) == (0, 1)
    seq = SequentialRecordDataset(rec, batch_size=4, shuffle_buffer=4, seed=0)
    with pytest.raises(CorruptImageError, match=r"record key 5 of .*train.rec.* \(offset \d+\)"):
        list(seq)
    seq = SequentialRecordDataset(rec, batch_size=4, shuffle_buffer=4, seed=0, corrupt_images="skip")
    assert len(list(seq)) == 16 and seq.corrupt.count == 1


def test_label_out_of_range_on_the_fast_paths(rec_dirs):
    rec = os.path.join(rec_dirs["plain"], "train.rec")
    ds = IndexedRecordDataset(rec)
    ds.num_classes = 4  # as if the data held labels beyond the configured classes
    ds[0]
    with pytest.raises(DataError, match=r"label 4 of record key \d+ in .*train.rec.* outside \[0, 4\)"):
        for i in range(len(ds)):
            ds[i]
    seq = SequentialRecordDataset(rec, num_classes=10, batch_size=8, seed=0)
    seq.num_classes = 4
    with pytest.raises(DataError, match=r"label \d+ of record key .*train.rec.* outside \[0, 4\)"):
        list(seq)


def test_empty_payload_is_a_corrupt_image(tmp_path):
    folder = str(tmp_path / "empty")
    os.makedirs(folder)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    w.write_idx(0, recordio.pack(recordio.IRHeader(0, 0.0, 0, 0), b""))
    w.write_idx(1, recordio.pack(recordio.IRHeader(0, 1.0, 1, 0), cv2.imencode(".png", sample_image(1))[1].tobytes()))
    w.close()
    with pytest.raises(CorruptImageError, match=r"record key 0 .*\(0 bytes\)"):
        IndexedRecordDataset(os.path.join(folder, "train.rec"))[0]


def test_block_reads_without_preadv(mixed, monkeypatch):
    from partialfc.data import fast_reader
    monkeypatch.setattr(fast_reader, "HAVE_PREADV", False)
    folder, _ = mixed
    rec_path = os.path.join(folder, "train.rec")
    seq = SequentialRecordDataset(rec_path, batch_size=4, shuffle_buffer=8, seed=1, chunk_records=9)
    reader = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), rec_path, "r")
    for i, _, rec in seq.records(seq.plan(0, 0, 1), read_window=3000, use_mmap=False):
        assert bytes(rec) == reader.read_idx(i)


def test_sequential_reads_an_insightface_rec_without_its_idx(tmp_path):
    """The insightface layout (header record 0, identity records after the images) read front to back
    without train.idx: the same images, labels and class count as with the index."""
    with_idx, without_idx = str(tmp_path / "a"), str(tmp_path / "b")
    labels = write_insightface_rec(with_idx, 40, 7)
    write_insightface_rec(without_idx, 40, 7)
    os.remove(os.path.join(without_idx, "train.idx"))
    kw = dict(batch_size=4, shuffle_buffer=8, seed=2, random_flip=False)
    ref = SequentialRecordDataset(os.path.join(with_idx, "train.rec"), **kw)
    seq = SequentialRecordDataset(os.path.join(without_idx, "train.rec"), **kw)
    assert (seq.num_images, seq.num_classes) == (ref.num_images, ref.num_classes) == (40, 7)
    assert np.array_equal(seq.offsets, ref.offsets)
    got, expect = list(seq), list(ref)
    assert [int(y) for _, y in got] == [int(y) for _, y in expect]
    assert all(np.array_equal(a.numpy(), b.numpy()) for (a, _), (b, _) in zip(got, expect))
    assert sorted(int(y) for _, y in got) == sorted(labels.tolist())
