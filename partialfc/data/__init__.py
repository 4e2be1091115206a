"""Training data: MXNet RecordIO (without MXNet), datasets and sharded loaders.

``build_train_loader(config, comm)`` and ``val_bin_path(config, name)`` are what the trainer uses;
``partialfc.data.recordio`` replaces ``mxnet.recordio`` for dataset tools.

Modules: ``recordio`` (the RecordIO frame, IRHeader and ``.idx`` layouts, reader and writer), ``fast_reader``
(per-process descriptors, block reads, page-cache residency), ``datasets`` (every training dataset),
``loader`` (sharded loaders from a config), ``transforms`` (decoding and augmentation), ``synthetic``
(the synthetic set's generator), ``align`` (face alignment).
"""
from . import recordio
from .datasets import (DataError, ImageFolderDataset, IndexedRecordDataset, RandomFaceDataset,
                       SequentialRecordDataset, SyntheticFaceDataset, sort_class_names)
from .loader import ShardedSampler, TrainLoader, build_dataset, build_train_loader, val_bin_path
from .transforms import CorruptImageError

__all__ = [
    "recordio", "build_train_loader", "build_dataset", "val_bin_path", "TrainLoader", "ShardedSampler",
    "IndexedRecordDataset", "SequentialRecordDataset", "ImageFolderDataset", "SyntheticFaceDataset",
    "RandomFaceDataset", "DataError", "CorruptImageError", "sort_class_names",
]
