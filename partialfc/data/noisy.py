"""Label noise with its ground truth: a copy of a training set in which a fraction of each identity's photos
carry another identity's label, for measuring how well a cleaning method (``tools.subcenter_clean``) finds them.

    from partialfc.data.noisy import relabel_rec, synthetic_rec
    synthetic_rec(config, "data/synthetic")              # the synthetic identities as a .rec folder
    relabel_rec("data/synthetic", "data/noisy", fraction=0.2, seed=0)

``relabel_rec`` reads ``IN_DIR/train.rec`` + ``train.idx`` (insightface or plain layout) and writes ``OUT_DIR``:

- ``train.rec`` + ``train.idx``: every image of the input in the input's order (so a sample's position is
  the same in both sets), in the plain im2rec layout (keys 0..N-1, a scalar label in each record's IRHeader).
  The image bytes are the input's, unchanged; only the header is written anew, with the label;
- ``property``: ``num_classes,112,112``, the input's class count;
- ``relabelled.tsv``: the ground truth, one ``position<TAB>original label<TAB>label`` line per relabelled
  sample after ``#`` lines naming the fraction, the seed and ``# samples: N`` (``read_relabelled`` reads it);
- a copy of every verification set (``*.bin``) of ``IN_DIR``, so ``val_targets`` resolve as they did.

Of an identity with ``n`` photos, ``round(fraction * n)`` (at most ``n - 1``: every identity keeps a true photo)
are chosen uniformly without replacement, and each gets a label drawn uniformly from the other identities:
closed-set noise, the kind of a crawled set whose photos were filed under the wrong name. The choice is a
function of ``seed`` alone.

``write_plain_rec`` is the writer both this module and ``tools.subcenter_clean --write-rec`` use: records
(IRHeader + image bytes) as they are, through ``recordio.MXIndexedRecordIO``.
"""
import glob
import os
import shutil

import numpy as np

from ..fileio import removed_on_failure, write_atomic
from . import recordio
from .datasets import DataError, IndexedRecordDataset

__all__ = ["GROUND_TRUTH", "copy_verification_sets", "read_relabelled", "relabel_rec", "synthetic_rec",
           "write_plain_rec"]

GROUND_TRUTH = "relabelled.tsv"
SIZE = 112


def write_plain_rec(out_dir, records, num_classes):
    """Write ``records`` (an iterable of record bytes: IRHeader + image) in order as ``out_dir/train.rec`` +
    ``train.idx`` (keys 0, 1, ...) and ``out_dir/property``; each file appears complete or not at all.
    Returns the number of records."""
    os.makedirs(out_dir, exist_ok=True)
    rec_path, idx_path = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    tmp_rec, tmp_idx = rec_path + ".tmp", idx_path + ".tmp"
    with removed_on_failure(rec_path, tmp_rec, tmp_idx):  # a full disk part way leaves no .tmp behind
        writer = recordio.MXIndexedRecordIO(tmp_idx, tmp_rec, "w")
        count = 0
        try:
            for count, record in enumerate(records, 1):
                writer.write_idx(count - 1, record)
        finally:
            writer.close()
        # The index goes first: a reader that finds train.rec finds the index that belongs to it.
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_rec, rec_path)
    write_atomic(os.path.join(out_dir, "property"), lambda f: f.write(f"{int(num_classes)},{SIZE},{SIZE}\n"),
                 mode="w")
    return count


def _copy_file(src, dest):
    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)
    write_atomic(dest, copy)


def copy_verification_sets(src_dir, out_dir):
    """Copy the ``*.bin`` verification sets of ``src_dir`` into ``out_dir``; their names, sorted."""
    names = []
    for path in sorted(glob.glob(os.path.join(glob.escape(src_dir), "*.bin"))):
        dest = os.path.join(out_dir, os.path.basename(path))
        if os.path.abspath(dest) != os.path.abspath(path):
            _copy_file(path, dest)
        names.append(os.path.basename(path))
    return names


def synthetic_rec(config, out_dir, quality=95):
    """The synthetic training set of ``config`` (``partialfc.data.synthetic``: its ``synthetic_*`` keys, ``seed``
    and ``data_root``) as a .rec folder: each image JPEG-encoded (``quality``) under its label, in the arrays'
    order, plus ``synthetic_val.bin`` (pairs of held-out identities). Returns the number of images."""
    import cv2

    from .synthetic import ensure_synthetic

    paths = ensure_synthetic(config)
    images = np.load(paths["train_images"], mmap_mode="r")  # [N, 112, 112, 3] uint8 RGB
    labels = np.load(paths["train_labels"])  # [N]

    def records():
        for i, label in enumerate(labels):
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(np.asarray(images[i]), cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            if not ok:
                raise DataError(f"synthetic image {i} could not be JPEG-encoded")
            yield recordio.pack(recordio.IRHeader(0, float(label), i, 0), jpeg.tobytes())

    count = write_plain_rec(out_dir, records(), int(config["synthetic_ids"]))
    _copy_file(paths["val_bin"], os.path.join(out_dir, "synthetic_val.bin"))
    return count


def choose_relabelled(labels, num_classes, fraction, seed):
    """``(positions [M], new labels [M])``: of each identity's ``n`` samples in ``labels`` [N],
    ``min(n - 1, round(fraction * n))`` chosen uniformly, each given a uniformly drawn other identity.
    Positions ascend."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")  # [N]: positions grouped by identity, in order within each
    starts = np.searchsorted(labels[order], np.arange(num_classes + 1))  # [C + 1]
    positions, targets = [], []
    for identity in range(num_classes):
        own = order[starts[identity]:starts[identity + 1]]
        count = min(max(len(own) - 1, 0), int(np.floor(fraction * len(own) + 0.5)))
        if count == 0:
            continue
        positions.append(rng.choice(own, count, replace=False))
        other = rng.integers(0, num_classes - 1, count)
        targets.append(other + (other >= identity))  # uniform over the identities except this one
    if not positions:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    positions, targets = np.concatenate(positions), np.concatenate(targets)
    by_position = np.argsort(positions)
    return positions[by_position].astype(np.int64), targets[by_position].astype(np.int64)


def relabel_rec(in_dir, out_dir, fraction, seed=0):
    """Write the relabelled copy of ``in_dir``'s training set to ``out_dir`` (see the module docstring).
    Returns a dict: ``samples``, ``relabelled``, ``num_classes``, ``ground_truth`` (the path)."""
    if not 0 <= fraction < 1:
        raise DataError(f"fraction = {fraction!r}: the share of each identity's photos to relabel must be in [0, 1)")
    rec_path = os.path.join(in_dir, "train.rec")
    if not os.path.isfile(rec_path):
        raise DataError(f"{in_dir!r} has no train.rec: relabel_rec copies a .rec training set")
    if os.path.abspath(out_dir) == os.path.abspath(in_dir):
        raise DataError(f"the output folder {out_dir!r} must differ from the input folder")
    source = IndexedRecordDataset(rec_path, os.path.join(in_dir, "train.idx"), random_flip=False)
    num_classes = int(source.num_classes)
    if num_classes < 2:
        raise DataError(f"{rec_path!r} holds {num_classes} identity: relabelling needs at least two")
    labels = np.asarray(source.labels, dtype=np.int64)  # [N]
    positions, targets = choose_relabelled(labels, num_classes, fraction, seed)
    noisy = labels.copy()
    noisy[positions] = targets

    def records():
        for i in range(len(labels)):
            label, image = recordio.split_label(source.file.record(source.offsets[i], int(source.keys[i])))
            if label != labels[i]:
                raise DataError(f"record key {int(source.keys[i])} of {rec_path!r} has label {label} in its "
                                f"header but {int(labels[i])} in the identity records: rebuild the input")
            yield recordio.pack(recordio.IRHeader(0, float(noisy[i]), i, 0), bytes(image))

    count = write_plain_rec(out_dir, records(), num_classes)
    truth = os.path.join(out_dir, GROUND_TRUTH)
    lines = [f"# relabelled samples of {os.path.abspath(rec_path)}: fraction {fraction:g} of each identity, "
             f"seed {seed}\n", f"# samples: {count}\n", "# position\toriginal_label\tlabel\n"]
    lines += [f"{p}\t{labels[p]}\t{t}\n" for p, t in zip(positions.tolist(), targets.tolist())]
    write_atomic(truth, lambda f: f.write("".join(lines)), mode="w")
    copy_verification_sets(in_dir, out_dir)
    return dict(samples=count, relabelled=len(positions), num_classes=num_classes, ground_truth=truth)


def read_relabelled(path):
    """``(positions [M], original labels [M], labels [M], samples)`` of a ``relabelled.tsv`` ground truth."""
    rows, samples = [], None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("# samples:"):
                samples = int(line.split(":")[1])
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 3 or not all(v.lstrip("-").isdigit() for v in fields):
                raise DataError(f"{path!r} line {lineno}: {line!r} is not 'position<TAB>original_label<TAB>label'")
            rows.append([int(v) for v in fields])
    if samples is None:
        raise DataError(f"{path!r} has no '# samples: N' line: not a relabelled.tsv ground truth")
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2], samples
