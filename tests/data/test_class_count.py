"""The class count every training-set reader settles at open (config num_classes, the insightface header
record, ``property``, the labels), the label checks against it and against the identity records, and the
running total of skipped corrupt images."""
import logging
import os
import re

import cv2
import numpy as np
import pytest

from partialfc.data import DataError, build_train_loader, recordio
from partialfc.data.datasets import ImageFolderDataset, IndexedRecordDataset, SequentialRecordDataset

from conftest import comm, labels_for, make_config, sample_image, write_plain_rec

READERS = ["indexed", "sequential", "sequential_scan"]  # sequential_scan: no .idx, the file's frames scanned


def png_record(key, label):
    return recordio.pack_img(recordio.IRHeader(0, float(label), key, 0), sample_image(key), quality=3,
                             img_fmt=".png")


def write_insightface(folder, labels, header_labels=None):
    """insightface layout: header record 0, image keys 1..n (each with ``header_labels[i]`` in its own header,
    ``labels`` by default), then one identity record per class holding the image range of ``labels``."""
    os.makedirs(folder, exist_ok=True)
    labels = np.asarray(labels)
    header_labels = labels if header_labels is None else np.asarray(header_labels)
    n, c = len(labels), int(labels.max()) + 1
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    w.write_idx(0, recordio.pack(recordio.IRHeader(2, [n + 1, n + 1 + c], 0, 0), b""))
    for i in range(n):
        w.write_idx(i + 1, png_record(i + 1, header_labels[i]))
    for k in range(c):
        keys = np.flatnonzero(labels == k) + 1
        w.write_idx(n + 1 + k, recordio.pack(recordio.IRHeader(2, [keys.min(), keys.max() + 1], 0, 0), b""))
    w.close()


def write_property(folder, value):
    path = os.path.join(folder, "property")
    with open(path, "w") as f:
        f.write(f"{value},112,112\n")
    return path


def offsets_of(folder):
    keys, offsets = recordio.read_index(os.path.join(folder, "train.idx"))
    return dict(zip(keys, offsets))


def open_reader(reader, folder, **kw):
    rec = os.path.join(folder, "train.rec")
    if reader == "indexed":
        return IndexedRecordDataset(rec, **kw)
    if reader == "sequential_scan" and os.path.isfile(os.path.join(folder, "train.idx")):
        os.remove(os.path.join(folder, "train.idx"))
    return SequentialRecordDataset(rec, batch_size=4, shuffle_buffer=8, **kw)


def max_label_record(reader, key, offset):
    """How the readers name the record a label came from: by key with an .idx, by offset without one."""
    return f"record at offset {offset}" if reader == "sequential_scan" else f"record key {key}"


# --- the class count: sources that disagree ---


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("prop", [50, 10])
def test_property_that_disagrees_with_the_labels_of_a_plain_file(tmp_path, reader, prop):
    folder = str(tmp_path / "plain")
    write_plain_rec(folder, 40, 20)  # labels 0,0,1,1,...,19,19 at keys 0..39
    prop_path = write_property(folder, prop)
    offsets = offsets_of(folder)
    rec = os.path.join(folder, "train.rec")
    with pytest.raises(DataError) as e:
        open_reader(reader, folder)
    msg = str(e.value)
    too_few = " (too few for label 19)" if prop < 20 else ""
    assert msg == (f"the class count of {rec!r} is ambiguous: {prop} from property file {prop_path!r}{too_few}; "
                   f"20 from the labels of {rec!r} (max label 19, {max_label_record(reader, 38, offsets[38])}). "
                   f"Fix the file that is wrong (property holds 'num_classes,112,112'), or set num_classes in "
                   f"the config")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("prop", [50, 10])
def test_property_that_disagrees_with_the_insightface_header(tmp_path, reader, prop):
    folder = str(tmp_path / "insight")
    write_insightface(folder, labels_for(40, 20))  # images 1..40, identity records 41..60
    prop_path = write_property(folder, prop)
    offsets = offsets_of(folder)
    rec = os.path.join(folder, "train.rec")
    with pytest.raises(DataError) as e:
        open_reader(reader, folder)
    msg = str(e.value)
    too_few = " (too few for label 19)" if prop < 20 else ""
    # with an .idx the labels come from the identity records (label 19: key 60); without, from image key 39
    where = max_label_record(reader, 60, offsets[39])
    assert msg.startswith(f"the class count of {rec!r} is ambiguous: 20 from header record 0 of {rec!r} "
                          f"(identity records keys 41..60); {prop} from property file {prop_path!r}{too_few}; "
                          f"20 from the labels of {rec!r} (max label 19, {where}). Fix the file"), msg
    assert msg.endswith("or set num_classes in the config")


@pytest.mark.parametrize("reader", READERS)
def test_explicit_num_classes_wins_and_must_cover_every_label(tmp_path, reader):
    folder = str(tmp_path / "insight")
    write_insightface(folder, labels_for(40, 20))
    write_property(folder, 50)  # disagrees with the header, but the config decides
    assert open_reader(reader, folder, num_classes=64).num_classes == 64
    rec = os.path.join(folder, "train.rec")
    with pytest.raises(DataError, match=r"^label 19 of (record key 60|record at offset \d+) in "
                                        + f"'{rec}'" + r" is outside \[0, 19\) \(num_classes = 19 from the config\)"):
        open_reader(reader, folder, num_classes=19)


@pytest.mark.parametrize("reader", READERS)
def test_stray_label_in_a_plain_file_is_an_error_not_more_classes(tmp_path, reader):
    labels = labels_for(40, 10)
    labels[17] = 500
    folder = str(tmp_path / "stray")
    write_plain_rec(folder, 40, 10, labels=labels)
    prop_path = write_property(folder, 10)
    offsets = offsets_of(folder)
    rec = os.path.join(folder, "train.rec")
    with pytest.raises(DataError) as e:
        open_reader(reader, folder)
    assert (f"10 from property file {prop_path!r} (too few for label 500); 501 from the labels of {rec!r} "
            f"(max label 500, {max_label_record(reader, 17, offsets[17])})") in str(e.value)
    os.remove(prop_path)
    if reader == "sequential_scan":
        write_plain_rec(folder, 40, 10, labels=labels)  # open_reader removed the .idx
    with pytest.raises(DataError) as e:
        open_reader(reader, folder, num_classes=10)
    assert str(e.value).startswith(f"label 500 of {max_label_record(reader, 17, offsets[17])} in {rec!r} is "
                                   f"outside [0, 10) (num_classes = 10 from the config)")


@pytest.mark.parametrize("reader", READERS)
def test_negative_label_is_an_error_at_open(tmp_path, reader):
    labels = labels_for(40, 10)
    labels[4] = -3
    folder = str(tmp_path / "neg")
    write_plain_rec(folder, 40, 10, labels=labels)
    offsets = offsets_of(folder)
    rec = os.path.join(folder, "train.rec")
    with pytest.raises(DataError) as e:
        open_reader(reader, folder, num_classes=10)
    assert str(e.value).startswith(f"label -3 of {max_label_record(reader, 4, offsets[4])} in {rec!r} is negative")


def write_folder(root, names, per=2):
    n = 0
    for name in names:
        os.makedirs(os.path.join(root, name))
        for k in range(per):
            cv2.imwrite(os.path.join(root, name, f"{k}.png"), sample_image(n))
            n += 1


def test_image_folder_follows_the_same_rule(tmp_path):
    root = str(tmp_path / "faces")
    write_folder(root, ["id_0", "id_1", "id_2"])
    assert ImageFolderDataset(root).num_classes == 3
    prop_path = write_property(root, 3)
    assert ImageFolderDataset(root).num_classes == 3  # a property that agrees
    write_property(root, 5)
    with pytest.raises(DataError) as e:
        ImageFolderDataset(root)
    assert str(e.value).startswith(f"the class count of {root!r} is ambiguous: 5 from property file "
                                   f"{prop_path!r}; 3 from the labels of {root!r} (max label 2, folder 'id_2')")
    assert ImageFolderDataset(root, num_classes=8).num_classes == 8
    with pytest.raises(DataError) as e:
        ImageFolderDataset(root, num_classes=2)
    assert str(e.value).startswith(f"label 2 of folder 'id_2' in {root!r} is outside [0, 2) "
                                   f"(num_classes = 2 from the config)")


# --- valid sets: the right count, the same in every reader ---


@pytest.mark.parametrize("layout", ["insightface", "plain"])
@pytest.mark.parametrize("with_property", [False, True])
def test_valid_sets_load_with_the_same_count_in_every_reader(tmp_path, layout, with_property):
    folder = str(tmp_path / "ok")
    labels = labels_for(40, 20)
    if layout == "insightface":
        write_insightface(folder, labels)
    else:
        write_plain_rec(folder, 40, 20)
    if with_property:
        write_property(folder, 20)
    loader = build_train_loader(make_config(rec=folder, batch_size=8, shuffled_rec=False), comm(0, 1))
    assert loader.num_classes == 20
    assert sorted(int(y) for _, lab in loader for y in lab) == labels.tolist()
    indexed = IndexedRecordDataset(os.path.join(folder, "train.rec"))
    sequential = open_reader("sequential", folder)
    scanned = open_reader("sequential_scan", folder)  # removes the .idx
    assert (indexed.num_classes, sequential.num_classes, scanned.num_classes) == (20, 20, 20)
    assert indexed.layout == layout
    for ds in (indexed, sequential, scanned):
        assert sorted(ds.labels.tolist()) == labels.tolist()
    assert np.array_equal(sequential.offsets, scanned.offsets)
    assert sorted(int(y) for _, y in scanned) == labels.tolist()


# --- a label that disagrees with its identity record ---


def mismatched_set(tmp_path):
    """insightface set where image key 5 sits in identity 2's range (identity record key 43) but its own
    header says label 7."""
    folder = str(tmp_path / "mismatch")
    labels = labels_for(40, 20)
    header_labels = labels.copy()
    header_labels[4] = 7
    write_insightface(folder, labels, header_labels)
    rec = os.path.join(folder, "train.rec")
    expect = (f"record key 5 (offset {offsets_of(folder)[5]}) of {rec!r} has label 7 in its header, but identity "
              f"record key 43 (label 2) lists it among its images")
    return folder, expect


def test_identity_mismatch_indexed(tmp_path):
    folder, expect = mismatched_set(tmp_path)
    ds = IndexedRecordDataset(os.path.join(folder, "train.rec"), random_flip=False)
    ds[3]  # its neighbours read fine
    with pytest.raises(DataError) as e:
        ds[4]
    assert str(e.value).startswith(expect)


def test_identity_mismatch_sequential_with_idx(tmp_path):
    folder, expect = mismatched_set(tmp_path)
    ds = open_reader("sequential", folder)
    with pytest.raises(DataError) as e:
        list(ds)
    assert str(e.value).startswith(expect)


def test_identity_mismatch_sequential_scan_at_open(tmp_path):
    folder, expect = mismatched_set(tmp_path)
    with pytest.raises(DataError) as e:
        open_reader("sequential_scan", folder)
    assert str(e.value).startswith(expect)


# --- skipped corrupt images: a running total over workers and epochs ---


def write_corrupt_rec(folder):
    """plain .rec of 32 PNG images, 4 classes, where key 5 holds bytes no decoder accepts."""
    os.makedirs(folder)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    for i in range(32):
        buf = b"\xff\xd8\xff broken" if i == 5 else cv2.imencode(".png", sample_image(i))[1].tobytes()
        w.write_idx(i, recordio.pack((0, float(i % 4), i, 0), buf))
    w.close()


@pytest.mark.parametrize("shuffled", [False, True])
def test_skipped_images_count_across_epochs_and_workers(tmp_path, shuffled):
    folder = str(tmp_path / "c")
    write_corrupt_rec(folder)
    cfg = make_config(rec=folder, batch_size=8, num_workers=2, shuffled_rec=shuffled, corrupt_images="skip")
    loader = build_train_loader(cfg, comm(0, 1))
    log_path = str(tmp_path / "training.log")
    handler = logging.FileHandler(log_path)  # as the trainer's log file: forked workers write to it too
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("partialfc.data")
    logger.addHandler(handler)
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            assert sum(len(y) for _, y in loader) == 32
            assert loader.dataset.corrupt.count == epoch + 1  # one skip per epoch, in whichever worker
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = [line for line in open(log_path).read().splitlines() if "skipping corrupt image" in line]
    assert len(lines) == 2, lines
    for n, line in enumerate(lines, 1):
        assert re.match(rf"skipping corrupt image #{n} of this reader \(a running total over all its workers and "
                        rf"epochs; \d by worker [01]\): cannot decode record key 5 of .*train.rec", line), line
