"""Training data: MXNet RecordIO (without MXNet), datasets and sharded loaders.

``build_train_loader(config, comm)`` and ``val_bin_path(config, name)`` are what the trainer uses;
``partialfc.data.recordio`` replaces ``mxnet.recordio`` for dataset tools.
"""
from . import recordio
from .datasets import (DataError, ImageFolderDataset, IndexedRecordDataset, SequentialRecordDataset,
                       sort_class_names)
from .loader import ShardedSampler, TrainLoader, build_dataset, build_train_loader, val_bin_path
from .transforms import CorruptImageError

__all__ = [
    "recordio", "build_train_loader", "build_dataset", "val_bin_path", "TrainLoader", "ShardedSampler",
    "IndexedRecordDataset", "SequentialRecordDataset", "ImageFolderDataset", "DataError",
    "CorruptImageError", "sort_class_names",
]
