"""Training loaders: sharded by rank, fixed per-rank batch size, deterministic reshuffle per epoch.

``build_train_loader(config, comm)`` picks the dataset from ``config.rec``:

* ``"synthetic"``: the embedded synthetic set (``partialfc.data.synthetic``);
* a folder with ``train.rec``: the indexed reader over ``train.rec`` + ``train.idx``, or the shuffled
  sequential reader when ``config.shuffled_rec`` is True;
* any other folder: an image folder, one sub-folder per identity.

Every epoch's permutation (deterministic in ``(config.seed, epoch)``) is cut into global batches of
``size * batch_size`` images, in order, and rank r takes its slice ``[r * b, (r + 1) * b)`` of each (the
remainder, fewer than a global batch, sits out that epoch and differs from epoch to epoch). So a global
batch is the same images whatever the split into ranks (2 x 12 or 3 x 8), and a position in an epoch is a
sample count: ``set_epoch(e, start_sample=n)`` starts epoch e after its first n images without reading them.

``config`` is a complete training config (``partialfc.config``: every key present, its defaults filled in);
the keys read are ``rec``, ``shuffled_rec``, ``num_classes``, ``num_image``, ``batch_size``, ``num_workers``,
``shuffle_buffer``, ``seed`` and ``corrupt_images``, plus the ``synthetic_*`` and ``data_root`` keys of the
synthetic set.
"""
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .datasets import (DataError, ImageFolderDataset, IndexedRecordDataset, RandomFaceDataset,
                       SequentialRecordDataset, SyntheticFaceDataset)

__all__ = ["build_train_loader", "val_bin_path", "TrainLoader", "ShardedSampler", "DataError"]


class ShardedSampler(Sampler):
    """Indices of this rank's share of a random permutation of ``num_samples`` (same on every rank).

    The permutation comes from ``(seed, epoch)``. From ``start_sample`` on it is cut into global batches of
    ``size * batch_size`` entries and this rank takes its ``batch_size`` slice of each, in order; the tail
    that does not fill a global batch sits out. ``start_sample`` need not be a multiple of the global batch
    (a run resumed with another one): the batches then start there, so no image before it is seen again
    and none after it is skipped, except the shorter tail.
    """

    def __init__(self, num_samples, rank, size, batch_size, seed=0):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside [0, {size})")
        self.num_samples, self.rank, self.size = int(num_samples), int(rank), int(size)
        self.batch_size, self.seed, self.epoch, self.start_sample = int(batch_size), int(seed), 0, 0
        self.global_batch = self.batch_size * self.size
        if self.num_samples < self.global_batch:
            raise DataError(f"the dataset holds {self.num_samples} images, fewer than one global batch "
                            f"({self.size} ranks x batch_size {self.batch_size})")

    def set_epoch(self, epoch, start_sample=0):
        """Epoch ``epoch``, from its sample ``start_sample`` (the images of the epoch already trained on)."""
        start_sample = int(start_sample)
        if not 0 <= start_sample <= self.num_samples:
            raise ValueError(f"start_sample {start_sample} is outside [0, {self.num_samples}] (the epoch's images)")
        self.epoch, self.start_sample = int(epoch), start_sample

    @property
    def num_batches(self):
        """Global batches left in the epoch from ``start_sample``."""
        return (self.num_samples - self.start_sample) // self.global_batch

    def __len__(self):
        return self.num_batches * self.batch_size

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        first = self.start_sample + self.rank * self.batch_size  # this rank's first entry in each global batch
        index = (first + self.global_batch * np.arange(self.num_batches)[:, None]
                 + np.arange(self.batch_size)[None, :])
        return iter(perm[index.reshape(-1)].tolist())


def collate(samples):
    """Stack (image, label) samples with numpy: a single-threaded copy, no intra-op thread pool."""
    images = np.stack([img.numpy() for img, _ in samples])
    labels = np.fromiter((int(lab) for _, lab in samples), dtype=np.int64, count=len(samples))
    return torch.from_numpy(images), torch.from_numpy(labels)


class TrainLoader:
    """Iterable of ``(images FloatTensor[b, 3, 112, 112], labels int64[b])`` for one rank.

    With a ``sampler`` the dataset is indexed through it; without one the dataset is iterable and shards
    itself (``num_batches`` per epoch).
    """

    def __init__(self, dataset, batch_size, num_workers, sampler=None):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.sampler = sampler
        self.num_classes = int(dataset.num_classes)
        self.num_images = int(getattr(dataset, "num_images", None) or len(dataset))
        kw = dict(batch_size=self.batch_size, num_workers=int(num_workers), drop_last=True,
                  pin_memory=torch.cuda.is_available(), collate_fn=collate)
        if int(num_workers) > 0:
            kw["prefetch_factor"] = 4
        self._skip = 0  # batches to read and drop at the start of the epoch (a dataset that shards itself)
        if sampler is not None:
            self._loader = DataLoader(dataset, sampler=sampler, **kw)
        else:
            self._loader = DataLoader(dataset, **kw)

    def set_epoch(self, epoch, start_sample=0):
        """Epoch ``epoch`` from its sample ``start_sample`` (counted over all ranks). With a sampler nothing
        before it is read. A dataset that shards itself (the shuffled sequential reader) cannot seek: it
        reads and drops this rank's first ``start_sample // (global batch)`` batches, the global batch being
        its own ``world_size * batch_size``."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_sample)
        else:
            global_batch = self.batch_size * int(getattr(self.dataset, "world_size", 1))
            self._skip = int(start_sample) // global_batch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self):
        if self.sampler is not None:
            return len(self.sampler) // self.batch_size
        return max(0, self.dataset.num_batches - self._skip)

    def __iter__(self):
        # Workers are started per epoch (not persistent) so they see the current epoch's state.
        for i, (images, labels) in enumerate(self._loader):
            if i < self._skip:
                continue
            yield images, labels.long()


def build_dataset(config, rank=0, size=1):
    """The training dataset ``config.rec`` names, and its kind: "synthetic", "random", "indexed", "sequential",
    "folder"."""
    rec, num_classes, seed, corrupt = config["rec"], config["num_classes"], config["seed"], config["corrupt_images"]
    if rec == "synthetic":
        from .synthetic import ensure_synthetic
        paths = ensure_synthetic(config)
        dataset = SyntheticFaceDataset(paths["train_images"], paths["train_labels"], config["synthetic_ids"], seed)
        labels = np.asarray(dataset.labels)
        if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            i = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
            raise DataError(f"label {int(labels[i])} of synthetic sample {i} is outside [0, {num_classes})")
        return dataset, "synthetic"
    if rec == "random":
        return RandomFaceDataset(num_classes, config["num_image"], seed), "random"
    if not isinstance(rec, (str, os.PathLike)) or not os.path.isdir(rec):
        raise DataError(f"config.rec = {rec!r} is neither 'synthetic' nor an existing folder "
                        f"(a folder with train.rec/train.idx, or an image folder)")
    rec = os.fspath(rec)
    rec_path = os.path.join(rec, "train.rec")
    idx_path = os.path.join(rec, "train.idx")
    if os.path.isfile(rec_path):
        if config["shuffled_rec"]:
            return SequentialRecordDataset(
                rec_path, idx_path, num_classes=num_classes, rank=rank, world_size=size,
                batch_size=config["batch_size"], num_workers=config["num_workers"],
                shuffle_buffer=config["shuffle_buffer"], seed=seed, corrupt_images=corrupt), "sequential"
        return IndexedRecordDataset(rec_path, idx_path, num_classes=num_classes, seed=seed,
                                    corrupt_images=corrupt), "indexed"
    return ImageFolderDataset(rec, num_classes=num_classes, seed=seed, corrupt_images=corrupt), "folder"


def read_train_index(path, num_samples):
    """The sample positions listed in ``path`` (one integer a line; ``#`` lines are comments, and a ``# samples:
    N`` line records the size of the set they index), checked against a dataset of ``num_samples``."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError as exc:
        raise DataError(f"train_index {path!r}: cannot read ({exc})") from None
    for line in lines:
        if line.startswith("# samples:") and int(line.split(":")[1]) != num_samples:
            raise DataError(f"train_index {path!r} indexes a set of {int(line.split(':')[1])} samples, but the "
                            f"training set has {num_samples}")
    try:
        kept = np.array([int(line) for line in lines if line and not line.startswith("#")], dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"train_index {path!r}: not a list of sample positions ({exc})") from None
    bad = (kept < 0) | (kept >= num_samples)
    if not len(kept) or bad.any():
        what = f"position {int(kept[bad][0])}" if len(kept) else "no position"
        raise DataError(f"train_index {path!r} holds {what}, outside [0, {num_samples})")
    return kept


class KeptSamples(torch.utils.data.Dataset):
    """The samples of ``dataset`` at the positions ``train_index`` lists (e.g. those tools.subcenter_clean
    kept); the class count stays the dataset's."""

    def __init__(self, dataset, train_index):
        self.dataset, self.kept = dataset, read_train_index(train_index, len(dataset))
        self.num_classes = dataset.num_classes

    def set_epoch(self, epoch):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, i):
        return self.dataset[int(self.kept[i])]


def build_train_loader(config, comm):
    """The loader of rank ``comm.rank`` of ``comm.size`` for ``config`` (see the module docstring)."""
    rank, size = int(comm.rank), int(comm.size)
    batch_size, num_workers = int(config["batch_size"]), int(config["num_workers"])
    dataset, kind = build_dataset(config, rank, size)
    if config.get("train_index"):
        if kind == "sequential":
            raise DataError(f"train_index = {config['train_index']!r} needs random access: not with shuffled_rec=True")
        dataset = KeptSamples(dataset, config["train_index"])
    if kind == "sequential":
        return TrainLoader(dataset, batch_size, num_workers)
    sampler = ShardedSampler(len(dataset), rank, size, batch_size, int(config["seed"]))
    return TrainLoader(dataset, batch_size, num_workers, sampler=sampler)


def val_bin_path(config, name):
    """Path of verification set ``name`` (``<rec>/<name>.bin``), or None when it is not there."""
    rec = config["rec"]
    if rec == "synthetic":
        if name == "synthetic_val":
            from .synthetic import ensure_synthetic
            return ensure_synthetic(config)["val_bin"]
        return None
    path = os.path.join(os.fspath(rec), name + ".bin")
    return path if os.path.isfile(path) else None
