"""partialfc: Partial FC margin-softmax training for face recognition at scale."""
__version__ = "0.1.0"

from .head import PartialFC, SparseAdamW, SparseSGD  # noqa: E402

__all__ = ["PartialFC", "SparseAdamW", "SparseSGD", "__version__"]
