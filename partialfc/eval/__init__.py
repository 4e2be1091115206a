"""Evaluation: 1:1 verification on ``.bin`` sets (10-fold) and IJB-B/IJB-C TAR@FAR.

``python -m partialfc.eval.verification`` and ``python -m partialfc.eval.ijb`` are the command lines;
``VerificationHook`` evaluates during training.
"""
from .safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load
from .verification import BinFormatError, VerificationHook, embed_images, evaluate, load_bin

__all__ = [
    "BinFormatError", "RestrictedUnpickler", "UnsafePickleError", "VerificationHook",
    "embed_images", "evaluate", "load_bin", "safe_load",
]
