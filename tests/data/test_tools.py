"""im2rec, shuffle_rec, make_bin and unpack_glint360k, and the corrupt-image policy of the loaders."""
import hashlib
import os
import pickle
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import comm, make_config, sample_image, sample_index, write_insightface_rec, write_plain_rec
from partialfc.data import build_train_loader, recordio
from partialfc.data.datasets import IndexedRecordDataset
from partialfc.data.transforms import CorruptImageError
from partialfc.tools import im2rec, make_bin, shuffle_rec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import unpack_glint360k  # noqa: E402


def face(i):
    rng = np.random.default_rng(i)
    img = cv2.resize(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
    return img


def jpeg_dataset(folder, counts):
    """insightface-layout .rec of JPEG faces; identity c has counts[c] images. Returns [(payload, label)]."""
    labels = np.repeat(np.arange(len(counts)), counts)
    os.makedirs(folder)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    n, k = len(labels), len(counts)
    w.write_idx(0, recordio.pack((2, [n + 1, n + 1 + k], 0, 0), b""))
    items = []
    for i, lab in enumerate(labels):
        buf = cv2.imencode(".jpg", face(i), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        w.write_idx(i + 1, recordio.pack((0, float(lab), i + 1, 0), buf))
        items.append((buf, int(lab)))
    ends = np.cumsum(counts)
    for c in range(k):
        w.write_idx(n + 1 + c, recordio.pack((2, [ends[c] - counts[c] + 1, ends[c] + 1], 0, 0), b""))
    w.close()
    return items


def records(folder):
    ds = IndexedRecordDataset(os.path.join(folder, "train.rec"), random_flip=False)
    return ds, [(recordio.unpack(ds.file.record(o))[1], int(lab)) for o, lab in zip(ds.offsets, ds.labels)]


def test_unpack_im2rec_loader_round_trip(tmp_path):
    counts = [3, 1, 4, 2, 5, 1, 2, 3, 2, 1, 1, 3]          # 12 identities: id_10, id_11 sort after id_9
    items = jpeg_dataset(str(tmp_path / "src"), counts)
    assert unpack_glint360k.main([str(tmp_path / "src"), str(tmp_path / "faces"), "--num-workers", "2"]) == 0
    assert sorted(os.listdir(tmp_path / "faces"), key=lambda s: int(s[3:])) == [f"id_{c}" for c in range(12)]
    assert sorted(os.listdir(tmp_path / "faces" / "id_4")) == [f"4_{n}.jpg" for n in range(5)]
    im2rec.main([str(tmp_path / "faces"), str(tmp_path / "packed"), "--num-workers", "2"])
    assert open(tmp_path / "packed" / "property").read().strip() == "12,112,112"
    ds, got = records(str(tmp_path / "packed"))
    assert ds.layout == "insightface"
    assert got == items                                     # same JPEG bytes, same labels, same order
    # and through the indexed loader: each image decoded exactly as the original bytes, labels kept
    want = {}
    for buf, lab in items:
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        want[(img.tobytes())] = lab
    loader = build_train_loader(make_config(rec=str(tmp_path / "packed"), batch_size=28), comm(0, 1))
    seen = 0
    for images, labels in loader:
        for t, lab in zip(images, labels):
            hwc = np.rint(t.numpy() * 127.5 + 127.5).astype(np.uint8).transpose(1, 2, 0)
            key = hwc.tobytes() if hwc.tobytes() in want else np.ascontiguousarray(hwc[:, ::-1]).tobytes()
            assert want[key] == int(lab)
            seen += 1
    assert seen == 28


def test_unpack_is_resumable(tmp_path):
    jpeg_dataset(str(tmp_path / "src"), [2, 3, 2])
    out = str(tmp_path / "faces")
    s = unpack_glint360k.unpack_dataset(str(tmp_path / "src"), out, num_workers=1, progress=False)
    assert (s["images_written"], s["skipped"]) == (7, 0)
    mtime = os.path.getmtime(os.path.join(out, "id_0", "0_0.jpg"))
    os.rename(os.path.join(out, "id_1"), os.path.join(out, "id_1.partial"))   # an interrupted identity
    os.remove(os.path.join(out, "id_1.partial", "1_2.jpg"))
    s = unpack_glint360k.unpack_dataset(str(tmp_path / "src"), out, num_workers=1, progress=False)
    assert (s["images_written"], s["skipped"]) == (3, 2)
    assert sorted(os.listdir(out)) == ["id_0", "id_1", "id_2"]
    assert len(os.listdir(os.path.join(out, "id_1"))) == 3
    assert os.path.getmtime(os.path.join(out, "id_0", "0_0.jpg")) == mtime


def test_unpack_include_and_verify(tmp_path, capsys):
    jpeg_dataset(str(tmp_path / "root" / "a"), [2, 1])
    jpeg_dataset(str(tmp_path / "root" / "b"), [1, 1, 1])
    assert unpack_glint360k.main([str(tmp_path / "root"), str(tmp_path / "out"), "--include", "a,b",
                                  "--num-workers", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "out" / "a")) == ["id_0", "id_1"]
    assert sorted(os.listdir(tmp_path / "out" / "b")) == ["id_0", "id_1", "id_2"]
    a = str(tmp_path / "root" / "a")
    md5 = {n: hashlib.md5(open(os.path.join(a, n), "rb").read()).hexdigest() for n in ("train.rec", "train.idx")}
    ok, lines = unpack_glint360k.verify(a, known={"release X": md5, "release Y": {"train.rec": "0" * 32,
                                                                                   "train.idx": "1" * 32}},
                                        progress=False)
    assert ok and all("matches Glint360K release X" in line for line in lines)
    assert unpack_glint360k.main([a, "--verify"]) == 1       # a generated file matches no published sum
    out = capsys.readouterr().out
    assert "matches no published Glint360K sum" in out and "2a74c71c4d20e770273f103eda97e878" in out
    with pytest.raises(SystemExit) as e:
        unpack_glint360k.run_cli(unpack_glint360k.main, [str(tmp_path / "root"), "--include", "zz", "--verify"])
    assert e.value.code == 1
    assert "has no train.rec" in capsys.readouterr().err


def test_im2rec_from_lst_remaps_labels(tmp_path):
    os.makedirs(tmp_path / "img")
    lines = []
    for i, lab in enumerate([10, 3, 7, 3, 10, 10]):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), face(i))   # PNG 112x112 -> re-encoded as JPEG
        lines.append(f"{i}\t{lab}\timg/{i}.png")
    (tmp_path / "a.lst").write_text("\n".join(lines) + "\n")
    im2rec.main([str(tmp_path / "a.lst"), str(tmp_path / "out"), "--num-workers", "1"])
    ds, got = records(str(tmp_path / "out"))
    assert [lab for _, lab in got] == [0, 0, 1, 2, 2, 2]     # 3 -> 0, 7 -> 1, 10 -> 2, grouped
    assert all(buf[:3] == b"\xff\xd8\xff" for buf, _ in got)
    dec = cv2.imdecode(np.frombuffer(got[0][0], np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(dec.astype(int) - face(1).astype(int)).mean() < 6     # file 1 has label 3 -> first


def test_im2rec_bad_input(tmp_path, capsys):
    os.makedirs(tmp_path / "faces" / "id_0")
    cv2.imwrite(str(tmp_path / "faces" / "id_0" / "a.jpg"), face(0))
    (tmp_path / "faces" / "id_0" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SystemExit) as e:
        im2rec.run_cli(im2rec.main, [str(tmp_path / "faces"), str(tmp_path / "o"), "--num-workers", "1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: cannot decode image" in err and "id_0/b.jpg" in err
    s = im2rec.pack_dataset(im2rec.list_folder(str(tmp_path / "faces")), str(tmp_path / "o"), num_workers=1,
                            skip_corrupt=True, progress=False)
    assert (s["images"], s["skipped"]) == (1, 1)
    (tmp_path / "bad.lst").write_text("0\tx\tfoo.jpg\n")
    with pytest.raises(im2rec.ToolError, match=r"bad.lst' line 1: label 'x' is not a number"):
        im2rec.read_lst(str(tmp_path / "bad.lst"), str(tmp_path))
    with pytest.raises(SystemExit):
        im2rec.main(["--help"])


def test_im2rec_corrupt_message_names_file(tmp_path):
    os.makedirs(tmp_path / "f" / "x")
    (tmp_path / "f" / "x" / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(im2rec.ToolError, match=r"cannot decode image .*x/b.jpg"):
        im2rec.pack_dataset(im2rec.list_folder(str(tmp_path / "f")), str(tmp_path / "o"), num_workers=1,
                            progress=False)


@pytest.mark.parametrize("layout", ["insight", "plain"])
def test_shuffle_rec(tmp_path, layout):
    src = str(tmp_path / "src")
    (write_insightface_rec if layout == "insight" else write_plain_rec)(src, 96, 6)
    s = shuffle_rec.shuffle_rec(src, str(tmp_path / "shuf"), seed=3, progress=False)
    assert s["images"] == 96 and s["num_classes"] == 6
    _, before = records(src)
    ds, after = records(str(tmp_path / "shuf"))
    assert ds.layout == "plain" and sorted(before) == sorted(after) and before != after
    assert open(tmp_path / "shuf" / "property").read().strip() == "6,112,112"
    loader = build_train_loader(make_config(rec=str(tmp_path / "shuf"), shuffled_rec=True, batch_size=8,
                                            shuffle_buffer=16), comm(0, 1))
    assert loader.num_classes == 6
    ids = [sample_index(t) for images, _ in loader for t in images]
    assert sorted(ids) == list(range(96))
    with pytest.raises(SystemExit):
        shuffle_rec.run_cli(shuffle_rec.main, [str(tmp_path / "nothing"), str(tmp_path / "o2")])


def test_make_bin(tmp_path):
    os.makedirs(tmp_path / "img")
    for i in range(4):
        big = cv2.resize(face(i), (150, 150))
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), big)
    (tmp_path / "pairs.txt").write_text("img/0.png img/1.png 1\nimg/2.png img/3.png 0\nimg/0.png img/3.png false\n")
    lmk = [[50, 60], [100, 60], [75, 85], [55, 110], [95, 110]]
    (tmp_path / "lmk.txt").write_text("img/2.png " + " ".join(str(v) for p in lmk for v in p) + "\n")
    make_bin.main([str(tmp_path / "pairs.txt"), str(tmp_path / "t.bin"), "--landmarks", str(tmp_path / "lmk.txt"),
                   "--num-workers", "1"])
    with open(tmp_path / "t.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    assert issame == [True, False, False] and len(bins) == 6
    imgs = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in bins]
    assert all(im.shape == (112, 112, 3) for im in imgs)
    resized = cv2.resize(cv2.resize(face(0), (150, 150)), (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(imgs[0].astype(int) - resized.astype(int)).mean() < 4
    try:
        from partialfc.data.align import norm_crop
    except ImportError:
        norm_crop = None
    if norm_crop is not None:
        aligned = norm_crop(cv2.resize(face(2), (150, 150)), np.asarray(lmk, np.float32), 112)
        assert np.abs(imgs[2].astype(int) - aligned.astype(int)).mean() < 4
    try:
        from partialfc.eval.verification import load_bin
    except ImportError:
        return
    data, same = load_bin(str(tmp_path / "t.bin"))
    assert list(same) == [True, False, False]
    (tmp_path / "bad.txt").write_text("a.png b.png maybe\n")
    with pytest.raises(make_bin.ToolError, match=r"bad.txt' line 1: expected 'path1 path2 same"):
        make_bin.read_pairs(str(tmp_path / "bad.txt"), str(tmp_path))


def _corrupt_rec(folder):
    """plain .rec of 32 PNG images where key 5 holds broken bytes."""
    os.makedirs(folder)
    w = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    for i in range(32):
        buf = b"\xff\xd8\xff broken" if i == 5 else cv2.imencode(".png", sample_image(i))[1].tobytes()
        w.write_idx(i, recordio.pack((0, float(i % 4), i, 0), buf))
    w.close()


@pytest.mark.parametrize("shuffled", [False, True])
def test_corrupt_images_fail_or_skip(tmp_path, shuffled, caplog):
    _corrupt_rec(str(tmp_path / "c"))
    cfg = make_config(rec=str(tmp_path / "c"), batch_size=8, shuffled_rec=shuffled, corrupt_images="fail")
    with pytest.raises(CorruptImageError, match=r"record key 5 of .*train.rec.* \(offset \d+\)"):
        for _ in build_train_loader(cfg, comm(0, 1)):
            pass
    cfg.corrupt_images = "skip"
    loader = build_train_loader(cfg, comm(0, 1))
    with caplog.at_level("WARNING", logger="partialfc.data"):
        batches = list(loader)
    assert len(batches) == 4 and all(x.shape == (8, 3, 112, 112) for x, _ in batches)
    ids = [sample_index(t) for x, _ in batches for t in x]
    assert 5 not in ids and len(set(ids)) == 31
    assert "skipping corrupt image #1" in caplog.text and "key 5" in caplog.text
    labels = torch.cat([y for _, y in batches])
    assert all(int(lab) == i % 4 for lab, i in zip(labels, ids))
