from .margins import ADAPTIVE, PRESETS, AdaFace, CurricularFace, margin_from_config, resolve_margin
from .partial_fc import PartialFC, partition_classes
from .sparse_adamw import SparseAdamW, center_optimizer
from .sparse_sgd import SparseSGD

__all__ = ["ADAPTIVE", "AdaFace", "CurricularFace", "PRESETS", "PartialFC", "SparseAdamW", "SparseSGD",
           "center_optimizer", "margin_from_config", "partition_classes", "resolve_margin"]
