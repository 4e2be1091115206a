"""tools/subcenter_clean: the dominant sub-center rule, the tool's errors, and ``--write-rec`` (the kept records
copied byte for byte). The check on noisy data at CPU scale is tests/test_subcenter_noise.py."""
import json
import math

import cv2
import numpy as np
import pytest
import torch

from partialfc.backbones import build_backbone
from partialfc.config import Config, default_config
from partialfc.data import recordio
from partialfc.data.datasets import IndexedRecordDataset
from partialfc.data.loader import DataError, read_train_index
from partialfc.tools import ToolError
from partialfc.tools.im2rec import list_folder, pack_dataset
from partialfc.tools.subcenter_clean import clean, embed_dataset, main


def test_dominant_subcenter_and_angle_threshold():
    # Identity 0: sub-centers e0, e1, e2; two samples nearest e1 (dominant), one at 80 degrees from it.
    centers = torch.eye(3)
    near = torch.tensor([[0.1, 1.0, 0.0], [0.0, 1.0, 0.2]])
    far = torch.tensor([[math.sin(math.radians(80)), math.cos(math.radians(80)), 0.0]])
    x = torch.nn.functional.normalize(torch.cat([near, far]), dim=1)
    keep, angle, dominant, count = clean(x, torch.zeros(3, dtype=torch.long), centers, 3)
    assert dominant.tolist() == [1] and count.tolist() == [3]
    assert keep.tolist() == [True, True, False]
    assert angle[2].item() == pytest.approx(80.0, abs=1e-4)
    assert clean(x, torch.zeros(3, dtype=torch.long), centers, 3, threshold_deg=85.0)[0].all()


def test_a_run_without_subcenters_or_shards_is_named(tmp_path):
    torch.save(dict(weight=torch.zeros(4, 2), class_start=0, num_classes=4, world_size=1, num_subcenters=1),
               tmp_path / "softmax_fc_rank_0.pt")
    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(ToolError, match="was trained with num_subcenters = 1"):
        main([str(tmp_path), str(tmp_path / "out")])
    torch.save(dict(weight=torch.zeros(6, 2), class_start=0, num_classes=4, world_size=2, num_subcenters=3),
               tmp_path / "softmax_fc_rank_0.pt")
    with pytest.raises(ToolError, match="softmax_fc_rank_1.pt missing"):
        main([str(tmp_path), str(tmp_path / "out")])


def test_train_index_is_checked_against_the_set(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("# samples: 10\n0\n3\n9\n")
    assert read_train_index(str(path), 10).tolist() == [0, 3, 9]
    with pytest.raises(DataError, match="indexes a set of 10 samples, but the training set has 12"):
        read_train_index(str(path), 12)
    path.write_text("0\n10\n")
    with pytest.raises(DataError, match=r"position 10, outside \[0, 10\)"):
        read_train_index(str(path), 10)


def _image_set(tmp_path, counts):
    """An image folder (identity c: counts[c] noise images) and its insightface-layout .rec (tools.im2rec)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for label, count in enumerate(counts):
        (folder / f"id_{label}").mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(folder / f"id_{label}" / f"{i}.png"), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    pack_dataset(list_folder(str(folder)), str(tmp_path / "set"), num_workers=1, progress=False)
    (tmp_path / "set" / "pairs.bin").write_bytes(b"verification pairs")
    return folder, tmp_path / "set"


def _k2_run(run, rec, num_classes, centers_of):
    """A finished K = 2 run over ``rec`` with a seeded small backbone; ``centers_of(embeddings [N, D], labels)``
    gives its [C*2, D] centers. Returns the embeddings the tool will see."""
    config = Config(default_config(), network="small", embedding_size=16, rec=str(rec))
    torch.manual_seed(0)
    backbone = build_backbone(config).eval()
    embeddings, labels = embed_dataset(backbone, IndexedRecordDataset(str(rec / "train.rec")), 64)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(network="small", embedding_size=16, rec=str(rec))))
    torch.save(backbone.state_dict(), run / "model.pt")
    torch.save(dict(weight=centers_of(embeddings, labels), class_start=0, num_classes=num_classes, world_size=1,
                    num_subcenters=2), run / "softmax_fc_rank_0.pt")
    return embeddings, labels


def test_write_rec_copies_the_kept_records_byte_for_byte(tmp_path):
    counts = [5, 6, 4, 5]
    folder, rec = _image_set(tmp_path, counts)
    first = np.cumsum([0] + counts[:-1])  # [C]: position of each identity's first image

    def centers_of(e, y):
        # Identities 0-2: their first two samples are the sub-centers; identity 3: the opposite of its, so every
        # sample of it is far from both and it loses them all.
        rows = torch.stack([e[first], e[first + 1]], dim=1)  # [C, 2, D]
        rows[3] = -rows[3]
        return rows.reshape(8, -1)

    e, y = _k2_run(tmp_path / "run", rec, 4, centers_of)
    angle = clean(e, y, centers_of(e, y), 2)[1]  # [N] degrees to the dominant sub-center (the rule tested above)
    threshold = float(angle[y < 3].median())  # a cut through identities 0-2; identity 3's samples are all beyond
    out = tmp_path / "clean"
    assert main([str(tmp_path / "run"), str(out), "--write-rec", "--threshold", str(threshold)]) == 0
    kept = read_train_index(str(out / "kept_samples.txt"), 20)
    assert 0 < len(kept) < 15 and not (y[kept] == 3).any()
    src = recordio.MXIndexedRecordIO(str(rec / "train.idx"), str(rec / "train.rec"), "r")
    copy = recordio.MXIndexedRecordIO(str(out / "train.idx"), str(out / "train.rec"), "r")
    assert copy.keys == list(range(len(kept)))
    assert [copy.read_idx(k) for k in copy.keys] == [src.read_idx(int(i) + 1) for i in kept]  # image keys 1..N
    assert (out / "property").read_text() == "4,112,112\n"
    assert (out / "pairs.bin").read_bytes() == b"verification pairs"
    report = json.loads((out / "clean_report.json").read_text())
    assert report["cleaned_rec"] == str(out / "train.rec") and report["cleaned_rec_needs_num_classes"] is True
    assert report["angle_percentiles_deg"]["50"] == pytest.approx(float(np.percentile(angle.numpy(), 50)), abs=0.01)
    assert report["angle_percentiles_deg"]["99"] > 90  # identity 3's samples, opposite their centers
    # Identity 3 lost every sample: the labels stop at 2, so the class count is the config's to give.
    with pytest.raises(DataError, match="the class count of .* is ambiguous: 4 from property file"):
        IndexedRecordDataset(str(out / "train.rec"))
    cleaned = IndexedRecordDataset(str(out / "train.rec"), num_classes=4)
    assert cleaned.labels.tolist() == y[kept].tolist()
    with pytest.raises(ToolError, match="--write-rec copies the records of a .rec training set, and rec = .* is an "
                                        "image folder: train on the kept samples with train_index="):
        main([str(tmp_path / "run"), str(out), "--rec", str(folder), "--write-rec"])
    with pytest.raises(ToolError, match="holds the training set itself: --write-rec needs another folder"):
        main([str(tmp_path / "run"), str(rec), "--write-rec"])
