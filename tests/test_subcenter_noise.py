"""Sub-center ArcFace on noisy data, end to end: relabel 20% of each synthetic identity's photos, train K = 3,
clean with tools.subcenter_clean, score the cleaning against the ground truth, and retrain on the cleaned set
against the noisy one. Also the relabelling tool (partialfc.data.noisy) on its own.

The scale (docs/cleaning.md): 100 identities x 20 photos, the small backbone, a 64-d embedding, 200 steps of 64
for the K = 3 run (6.4 epochs) and 150 for each retraining; about 75 s on 2 CPU cores. At this scale the paper's
75 degrees separates: relabelled photos sit about 90 degrees from their label's dominant sub-center (near their
true identity's), and after 6.4 epochs 97% of the clean ones are within 75."""
import json
import os

import numpy as np
import pytest

from partialfc.config import Config
from partialfc.data import recordio
from partialfc.data.datasets import DataError, IndexedRecordDataset
from partialfc.data.loader import read_train_index
from partialfc.data.noisy import GROUND_TRUTH, read_relabelled, relabel_rec, synthetic_rec
from partialfc.tools import subcenter_clean
from test_training import _tiny_config, _train

NOISE = 0.2


def _config(tmp_path, **overrides):
    # ArcFace's margin (m = 0.5), the paper's, at the synthetic config's scale s = 32 (100 identities need no
    # more). Every identity's centers take part in every step (sample_rate = 1), so the three runs differ only
    # in their data and K.
    return _tiny_config(tmp_path, synthetic_ids=100, synthetic_images_per_id=20, synthetic_val_ids=50,
                        synthetic_val_pairs=600, batch_size=64, embedding_size=64, sample_rate=1.0,
                        margin_list=(1.0, 0.5, 0.0), scale=32.0, verbose=0, save_all_states=False, **overrides)


def _verification(output):
    """The held-out pairs' accuracy at the first and at the last evaluation of a run (the VerificationHook's
    metrics.jsonl records)."""
    with open(os.path.join(output, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r.get("target") == "synthetic_val"]
    return records[0]["accuracy"], records[-1]["accuracy"]


def test_subcenter_cleaning_removes_relabelled_photos_and_retraining_verifies_better(tmp_path):
    base = _config(tmp_path)
    assert synthetic_rec(base, str(tmp_path / "synthetic")) == 2000
    noisy = str(tmp_path / "noisy")
    truth = relabel_rec(str(tmp_path / "synthetic"), noisy, NOISE, seed=0)
    positions, _, _, samples = read_relabelled(truth["ground_truth"])
    relabelled = np.zeros(samples, bool)
    relabelled[positions] = True
    assert relabelled.sum() == 400  # 4 of each identity's 20

    # Sub-center ArcFace (K = 3) on the noisy set, then the tool at its default 75 degrees.
    k3 = str(tmp_path / "k3")
    _train(Config(base, output=k3, rec=noisy, num_subcenters=3, max_steps=200, val_targets=[]))
    cleaned = str(tmp_path / "cleaned")
    assert subcenter_clean.main([k3, cleaned, "--write-rec"]) == 0
    kept = np.zeros(samples, bool)
    kept[read_train_index(os.path.join(cleaned, "kept_samples.txt"), samples)] = True
    removed_noisy, kept_clean = 1 - kept[relabelled].mean(), kept[~relabelled].mean()
    assert removed_noisy >= 0.70 and kept_clean >= 0.90, (removed_noisy, kept_clean)
    report = json.load(open(os.path.join(cleaned, "clean_report.json")))
    assert report["kept"] == kept.sum() and report["threshold_deg"] == 75.0

    # Retrain with one center per identity (K = 1), as the paper does once the set is clean, on the cleaned
    # .rec and on the noisy set: the same steps, seed and held-out pairs (copied along with the records).
    retrain = dict(max_steps=150, val_targets=["synthetic_val"])
    _train(Config(base, output=str(tmp_path / "on_cleaned"), rec=cleaned, num_classes=100, **retrain))
    _train(Config(base, output=str(tmp_path / "on_noisy"), rec=noisy, **retrain))
    untrained, on_cleaned = _verification(tmp_path / "on_cleaned")
    untrained_noisy, on_noisy = _verification(tmp_path / "on_noisy")
    assert untrained == untrained_noisy  # the same seeded network before training
    print(f"removed {100 * removed_noisy:.1f}% of the relabelled photos, kept {100 * kept_clean:.1f}% of the "
          f"clean ones; verification {on_cleaned:.4f} after training on the cleaned set, {on_noisy:.4f} on the "
          f"noisy one (untrained {untrained:.4f})")
    # Measured 0.9533 against 0.9017 here, and gaps of 3.0 and 5.0 points with the noise drawn from other seeds
    # (docs/cleaning.md); one point is about a standard error of the difference on 600 pairs.
    assert on_cleaned >= on_noisy + 0.01, (on_cleaned, on_noisy)


def _insightface_rec(folder, counts):
    """An insightface-layout set (header record 0, images, identity records) whose identity c has counts[c]
    images; image bytes b"image <n>" (never decoded here). Returns the image payloads in position order."""
    folder.mkdir(parents=True, exist_ok=True)
    n, ids = sum(counts), len(counts)
    w = recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    w.write_idx(0, recordio.pack(recordio.IRHeader(2, [n + 1, n + 1 + ids], 0, 0), b""))
    payloads, key = [], 1
    for label, count in enumerate(counts):
        for _ in range(count):
            payloads.append(f"image {key}".encode())
            w.write_idx(key, recordio.pack(recordio.IRHeader(0, float(label), key, 0), payloads[-1]))
            key += 1
    for label in range(ids):
        lo = 1 + sum(counts[:label])
        w.write_idx(n + 1 + label, recordio.pack(recordio.IRHeader(2, [lo, lo + counts[label]], 0, 0), b""))
    w.close()
    return payloads


def _records(folder):
    """(labels, image bytes) of a plain-layout set, in key order, read with the recordio reader alone."""
    r = recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "r")
    out = [recordio.unpack(r.read_idx(k)) for k in r.keys]
    r.close()
    return [int(h.label) for h, _ in out], [bytes(p) for _, p in out]


def test_relabel_rec_moves_a_fraction_of_each_identity_and_records_it(tmp_path):
    counts = [10, 7, 3, 1, 5]
    payloads = _insightface_rec(tmp_path / "src", counts)
    (tmp_path / "src" / "pairs.bin").write_bytes(b"verification pairs")
    original = np.repeat(np.arange(5), counts)
    stats = relabel_rec(str(tmp_path / "src"), str(tmp_path / "a"), 0.3, seed=5)
    labels, images = _records(tmp_path / "a")
    # round(0.3 * n) of each identity, at most n - 1: 3.0, 2.1, 0.9, 0.3 -> 0 (n = 1), 1.5 -> 2
    expected = [3, 2, 1, 0, 2]
    changed = np.asarray(labels) != original
    assert [int(changed[original == c].sum()) for c in range(5)] == expected
    assert stats == dict(samples=26, relabelled=8, num_classes=5, ground_truth=str(tmp_path / "a" / GROUND_TRUTH))
    assert images == payloads  # same order, the image bytes untouched
    positions, was, now, samples = read_relabelled(stats["ground_truth"])
    assert samples == 26 and positions.tolist() == np.flatnonzero(changed).tolist()
    assert was.tolist() == original[changed].tolist() and now.tolist() == np.asarray(labels)[changed].tolist()
    # The loader reads the copy: the input's class count, the noisy labels.
    copy = IndexedRecordDataset(str(tmp_path / "a" / "train.rec"), random_flip=False)
    assert copy.num_classes == 5 and copy.labels.tolist() == labels
    assert (tmp_path / "a" / "property").read_text() == "5,112,112\n"
    assert (tmp_path / "a" / "pairs.bin").read_bytes() == b"verification pairs"
    # Seeded: the same seed writes the same files, another seed other choices.
    relabel_rec(str(tmp_path / "src"), str(tmp_path / "b"), 0.3, seed=5)
    relabel_rec(str(tmp_path / "src"), str(tmp_path / "c"), 0.3, seed=6)
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert read_relabelled(str(tmp_path / "b" / GROUND_TRUTH))[0].tolist() == positions.tolist()
    other = read_relabelled(str(tmp_path / "c" / GROUND_TRUTH))
    assert (other[0].tolist(), other[2].tolist()) != (positions.tolist(), now.tolist())


def test_relabel_rec_errors_name_the_value(tmp_path):
    _insightface_rec(tmp_path / "src", [2, 2])
    with pytest.raises(DataError, match=r"fraction = 1.0: the share of each identity's photos to relabel must be in "
                                        r"\[0, 1\)"):
        relabel_rec(str(tmp_path / "src"), str(tmp_path / "out"), 1.0)
    with pytest.raises(DataError, match="has no train.rec: relabel_rec copies a .rec training set"):
        relabel_rec(str(tmp_path / "nothing"), str(tmp_path / "out"), 0.2)
    with pytest.raises(DataError, match="must differ from the input folder"):
        relabel_rec(str(tmp_path / "src"), str(tmp_path / "src"), 0.2)
    (tmp_path / "bad.tsv").write_text("# samples: 4\n1\t0\n")
    with pytest.raises(DataError, match=r"line 2: '1\\t0' is not 'position<TAB>original_label<TAB>label'"):
        read_relabelled(str(tmp_path / "bad.tsv"))
