import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "heavy: deepest backbones (r200, vit_l); they run in the default suite with a single step each",
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small, shared CPU this is several times faster than oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
