"""A restricted unpickler for verification ``.bin`` files.

A ``.bin`` set is a pickle, and unpickling an arbitrary pickle runs whatever callables it names. The
unpickler here resolves only an explicit table of harmless globals: builtin containers and scalars,
``bytes``/``bytearray``, the numpy array and dtype reconstruction that real ``.bin`` files contain, and
``_codecs.encode`` restricted to the latin-1 round trip that protocol-2 pickles use for ``bytes``.
Every other global is refused with :class:`UnsafePickleError`, before anything is called.
"""
import codecs
import io
import pickle

import numpy as np

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "safe_load"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global that is not on the allow-list."""


def _numpy_multiarray():
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:
        from numpy.core.numeric import _frombuffer
    return _frombuffer


_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: ``encode(str, 'latin1')`` only."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise UnsafePickleError(
            f"_codecs.encode is only admitted as encode(str, 'latin1'), got encoding {encoding!r}"
        )
    return codecs.encode(text, "latin1")


def _allowed_globals():
    multiarray = _numpy_multiarray()
    table = {}
    for module in ("builtins", "__builtin__"):
        for name, obj in (
            ("list", list), ("tuple", tuple), ("dict", dict), ("set", set), ("frozenset", frozenset),
            ("bytes", bytes), ("bytearray", bytearray),
            ("bool", bool), ("int", int), ("float", float), ("str", str),
        ):
            table[(module, name)] = obj
    table[("__builtin__", "unicode")] = str
    table[("__builtin__", "long")] = int
    table[("_codecs", "encode")] = _latin1_encode
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        # ndarray.__reduce__ (protocols 0-4) and numpy scalars (e.g. a numpy.bool_ in an issame list).
        table[(module, "_reconstruct")] = multiarray._reconstruct
        table[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        # ndarray.__reduce_ex__(5): frombuffer(data, dtype).reshape(shape) over in-band bytes.
        table[(module, "_frombuffer")] = _numpy_frombuffer()
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    return table


_ALLOWED = None


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the allow-listed globals.

    ``source`` names the file in error messages.
    """

    def __init__(self, file, source="<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused to load global '{module}.{name}': a verification .bin may only "
                f"contain builtin containers, bytes, bool/int/float/str and numpy arrays "
                f"(this file is not a plain .bin set and may run code if unpickled normally)"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused persistent id {pid!r} in a .bin pickle")


def safe_load(data_or_file, source="<pickle>", encoding="bytes"):
    """Unpickle bytes or a binary file object with :class:`RestrictedUnpickler`.

    ``encoding='bytes'`` keeps Python-2 ``str`` objects (the JPEG buffers of old .bin files) as bytes.
    """
    if isinstance(data_or_file, (bytes, bytearray, memoryview)):
        data_or_file = io.BytesIO(data_or_file)
    return RestrictedUnpickler(data_or_file, source=source, encoding=encoding).load()
