"""Backbone registry: ``@register_backbone("r50")`` on a factory ``fn(**kwargs) -> nn.Module``."""

_BACKBONES = {}


def register_backbone(name):
    def wrap(factory):
        if name in _BACKBONES:
            raise KeyError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = factory
        return factory

    return wrap


def available_backbones():
    return sorted(_BACKBONES)


def get_model(name, **kwargs):
    """Build a backbone by its arcface_torch name (``r50``, ``mbf``, ``vit_b`` ...)."""
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _BACKBONES[name](**kwargs)
