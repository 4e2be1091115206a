"""Face-recognition backbones, named as arcface_torch's ``get_model`` names them.

Every factory takes ``num_features`` (the embedding size), ``dropout`` and ``fp16`` keyword arguments and
returns an ``nn.Module`` mapping ``[N, 3, 112, 112]`` images normalized to [-1, 1] to ``[N, num_features]``.
"""
from .registry import available_backbones, get_model, register_backbone

# Importing a module registers the backbones it defines.
from . import small  # noqa: F401,E402
from . import iresnet  # noqa: F401,E402
from . import mobilefacenet  # noqa: F401,E402
from . import vit  # noqa: F401,E402



def build_backbone(config):
    """Backbone for a training config (``config.network``, ``config.embedding_size``, ``config.fp16``)."""
    kwargs = dict(num_features=config.embedding_size, dropout=config.get("dropout", 0.0), fp16=config.fp16)
    if config.get("gradient_checkpointing", False):
        kwargs["checkpointing"] = True
    return get_model(config.network, **kwargs)


__all__ = ["available_backbones", "build_backbone", "get_model", "register_backbone"]
