"""build_train_loader: sharding, fixed batches, per-epoch reshuffle, dataset selection, label checks."""
import os

import numpy as np
import pytest
import torch

from conftest import comm, labels_for, make_config, sample_image, sample_index, write_insightface_rec
from partialfc.data import DataError, build_train_loader, val_bin_path


def epoch_ids(cfg, size, epoch):
    """Sample ids each rank sees in ``epoch`` (and checks batch shapes and labels on the way)."""
    per_rank = []
    for rank in range(size):
        loader = build_train_loader(cfg, comm(rank, size))
        loader.set_epoch(epoch)
        ids = []
        nb = 0
        for images, labels in loader:
            nb += 1
            assert images.shape == (cfg.batch_size, 3, 112, 112) and images.dtype == torch.float32
            assert labels.shape == (cfg.batch_size,) and labels.dtype == torch.int64
            batch = [sample_index(t) for t in images]
            expect = labels_for(loader.num_images, 10)
            assert labels.tolist() == [int(expect[i]) for i in batch]
            ids += batch
        assert nb == len(loader)
        per_rank.append(ids)
    return per_rank


@pytest.mark.parametrize("layout", ["insight", "plain"])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_every_image_once_per_epoch(rec_dirs, layout, shuffled, size):
    cfg = make_config(rec=rec_dirs[layout], shuffled_rec=shuffled, shuffle_buffer=40, batch_size=8)
    n = rec_dirs["n"]                      # 240 = 2*8*15 = 3*8*10: every image fits
    e1 = epoch_ids(cfg, size, 1)
    assert len({len(ids) for ids in e1}) == 1                       # equal per-rank lengths
    assert len(e1[0]) == n // size
    flat = [i for ids in e1 for i in ids]
    assert sorted(flat) == list(range(n))                           # each image exactly once
    e2 = epoch_ids(cfg, size, 2)
    assert sorted(i for ids in e2 for i in ids) == list(range(n))
    assert e1 != e2                                                 # a different order
    assert epoch_ids(cfg, size, 1) == e1                            # deterministic in (seed, epoch)


@pytest.mark.parametrize("shuffled", [False, True])
def test_remainder_dropped_and_workers(rec_dirs, shuffled):
    # 240 images, 3 ranks x batch 7: 11 batches per rank, 9 images sit out the epoch
    cfg = make_config(rec=rec_dirs["insight"], shuffled_rec=shuffled, batch_size=7, num_workers=2,
                      shuffle_buffer=30)
    ranks = epoch_ids(cfg, 3, 0)
    assert [len(r) for r in ranks] == [77, 77, 77]
    flat = [i for r in ranks for i in r]
    assert len(set(flat)) == len(flat) == 231


def test_loader_attributes(rec_dirs):
    loader = build_train_loader(make_config(rec=rec_dirs["insight"], batch_size=16), comm(0, 2))
    assert (len(loader), loader.num_classes, loader.num_images) == (7, 10, 240)
    loader = build_train_loader(make_config(rec=rec_dirs["plain"], batch_size=16, num_classes=12),
                                comm(1, 2))
    assert (loader.num_classes, loader.num_images) == (12, 240)


def test_random_flip_mirrors_images(tmp_path):
    import cv2
    from partialfc.data import recordio
    img = np.zeros((112, 112, 3), np.uint8)
    img[:, :56] = (0, 0, 255)                                       # left half red (BGR)
    w = recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for i in range(64):
        w.write_idx(i, recordio.pack_img((0, float(i % 2), i, 0), img, quality=1, img_fmt=".png"))
    w.close()
    loader = build_train_loader(make_config(rec=str(tmp_path), batch_size=64), comm(0, 1))
    images, _ = next(iter(loader))
    left_red = images[:, 0, :, :56].mean(dim=(1, 2)) > 0.9
    right_red = images[:, 0, :, 56:].mean(dim=(1, 2)) > 0.9
    assert bool((left_red ^ right_red).all())                      # each image whole, maybe mirrored
    assert 10 < int(right_red.sum()) < 54                           # both orientations occur
    expect = torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).astype(np.float32))
    first = images[left_red][0]
    assert torch.equal(first, (expect - 127.5) / 127.5)           # RGB, (x - 127.5) / 127.5


def test_image_folder(tmp_path):
    import cv2
    root = tmp_path / "faces"
    n = 0
    names = ["id_2", "id_10", "id_1"]                               # numeric order: 1, 2, 10
    for name in names:
        os.makedirs(root / name)
        for k in range(8):
            cv2.imwrite(str(root / name / f"{k}.png"), sample_image(n))
            n += 1
    cfg = make_config(rec=str(root), batch_size=4)
    loader = build_train_loader(cfg, comm(0, 1))
    assert (loader.num_classes, loader.num_images, len(loader)) == (3, 24, 6)
    want = {"id_1": 0, "id_2": 1, "id_10": 2}
    got = {}
    for images, labels in loader:
        for t, lab in zip(images, labels):
            got[sample_index(t)] = int(lab)
    assert got == {i: want[names[i // 8]] for i in range(24)}


def test_label_out_of_range_is_an_error_at_open(tmp_path, rec_dirs):
    cfg = make_config(rec=rec_dirs["plain"], num_classes=5)
    with pytest.raises(DataError, match=r"label 5 of record key 120 in .*train.rec.* outside \[0, 5\)"):
        build_train_loader(cfg, comm(0, 1))
    cfg = make_config(rec=rec_dirs["insight"], num_classes=9)
    with pytest.raises(DataError, match=r"label 9 of record key 250 in .*train.rec.*outside \[0, 9\)"):
        build_train_loader(cfg, comm(0, 1))


def test_label_out_of_range_sequential_at_open(rec_dirs):
    cfg = make_config(rec=rec_dirs["insight"], num_classes=9, shuffled_rec=True)
    with pytest.raises(DataError, match=r"label 9 of record key 250 in .*train.rec.* outside \[0, 9\)"):
        build_train_loader(cfg, comm(0, 1))


def test_rec_key_errors(tmp_path):
    with pytest.raises(DataError, match="neither 'synthetic' nor an existing folder"):
        build_train_loader(make_config(rec=str(tmp_path / "nope")), comm(0, 1))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no class sub-folders"):
        build_train_loader(make_config(rec=str(tmp_path / "empty")), comm(0, 1))


def test_too_small_for_one_global_batch(rec_dirs):
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_loader(make_config(rec=rec_dirs["plain"], batch_size=100), comm(0, 3))


def test_val_bin_path(rec_dirs, tmp_path):
    open(os.path.join(rec_dirs["plain"], "lfw.bin"), "wb").close()
    cfg = make_config(rec=rec_dirs["plain"])
    assert val_bin_path(cfg, "lfw") == os.path.join(rec_dirs["plain"], "lfw.bin")
    assert val_bin_path(cfg, "agedb_30") is None


def _synthetic_cfg(tmp_path):
    return make_config(rec="synthetic", data_root=str(tmp_path / "cache"), synthetic_ids=6,
                       synthetic_images_per_id=4, synthetic_val_ids=4, synthetic_val_pairs=20, batch_size=4)


def test_synthetic(tmp_path):
    pytest.importorskip("partialfc.data.synthetic")
    cfg = _synthetic_cfg(tmp_path)
    ranks = []
    for rank in range(2):
        loader = build_train_loader(cfg, comm(rank, 2))
        assert (loader.num_classes, loader.num_images, len(loader)) == (6, 24, 3)
        loader.set_epoch(0)
        labels = []
        for images, lab in loader:
            assert images.shape == (4, 3, 112, 112) and lab.dtype == torch.int64
            assert float(images.abs().max()) <= 1.0
            labels += lab.tolist()
        ranks.append(labels)
    counts = np.bincount(ranks[0] + ranks[1], minlength=6)
    assert counts.tolist() == [4] * 6
    path = val_bin_path(cfg, "synthetic_val")
    assert path and os.path.isfile(path)
    assert val_bin_path(cfg, "lfw") is None
