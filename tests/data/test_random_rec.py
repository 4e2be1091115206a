"""rec="random": the I/O-free throughput dataset."""
import pytest
import torch

from partialfc.comm import Communicator
from partialfc.config import default_config
from partialfc.data import build_train_loader
from partialfc.data.datasets import DataError


def _config(**kw):
    cfg = default_config()
    cfg.update(rec="random", num_classes=3_000_000, num_image=96, batch_size=8, num_workers=0, **kw)
    return cfg


def test_random_rec_yields_valid_fixed_size_batches():
    loader = build_train_loader(_config(), Communicator())
    assert len(loader) == 12 and loader.num_classes == 3_000_000
    labels = torch.cat([y for _, y in loader])
    images, _ = next(iter(loader))
    assert images.shape == (8, 3, 112, 112) and float(images.abs().max()) <= 1.0
    assert int(labels.min()) >= 0 and int(labels.max()) < 3_000_000
    assert labels.unique().numel() == 96  # spread over the classes, not one label


def test_random_rec_needs_sizes():
    with pytest.raises(DataError, match="rec='random' needs num_classes and num_image"):
        build_train_loader(dict(_config(), num_image=None), Communicator())
