"""Evaluation: 1:1 verification on ``.bin`` sets (10-fold) and IJB-B/IJB-C TAR@FAR.

``python -m partialfc.eval.verification`` and ``python -m partialfc.eval.ijb`` are the command lines;
``VerificationHook`` evaluates during training. The names below are imported on first use, so that
running a submodule with ``python -m`` does not import it twice.
"""
import importlib

from .safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load

_LAZY = {
    "BinFormatError": ".verification",
    "VerificationHook": ".verification",
    "embed_images": ".verification",
    "evaluate": ".verification",
    "load_bin": ".verification",
    "evaluate_ijb": ".ijb",
}

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "safe_load", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
