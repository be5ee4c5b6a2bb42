"""CIFAR's pickled batches, read without letting a file run code.

torchvision's on-disk CIFAR files (`cifar-10-batches-py/`, `cifar-100-python/`) are pickles: a dict of byte
strings, lists and numpy arrays per batch. Plain pickle.load would run whatever a crafted file names (any
importable callable), so `read_batch` unpickles with CifarUnpickler, which resolves only the handful of globals
a real batch contains (numpy's array constructors, numpy.dtype, the latin-1 bytes helpers of Python 2 and 3
pickles) to constructors that build exactly those things, and refuses anything else in one sentence before
calling it. sources.read_cifar turns the dicts into images.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hamjepa.errors import UserError

try:  # CIFAR's pickled arrays; numpy 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _array(subtype, shape, dtype):
    """numpy's pickled-array constructor, for plain ndarrays only (no subclass's __setstate__ runs)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("an array subclass")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _array_from_buffer(buffer, dtype, shape, order):
    """numpy's constructor for arrays pickled with protocol 5 (contiguous buffer, then reshape)."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    """How Python 3 pickles bytes for protocol 2 (`_codecs.encode(text, 'latin1')`, `bytes()` when empty)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("bytes in an unexpected encoding")
    return text.encode("latin1")


# Every global a CIFAR batch may name, by (module, name) as written in the file (Python 2's cPickle, or
# Python 3 with any protocol, numpy 1 or 2), mapped to what it may build. Anything else is refused.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _array,
    ("numpy._core.multiarray", "_reconstruct"): _array,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _latin1_bytes,
    ("__builtin__", "bytes"): _latin1_bytes,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _CIFAR_GLOBALS: no import, no call of anything else."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id")


def read_batch(path: Path) -> dict:
    """A CIFAR batch as a dict, or one sentence (UserError) when the file is anything else."""
    fix = "delete the folder and let the download (data.download = true) fetch the dataset again"
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as refused:
        raise UserError(f"CIFAR file '{path}' was refused without running it: it asks for "
                        f"'{refused.qualified}', which a CIFAR batch never contains; {fix}.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as error:
        raise UserError(f"CIFAR file '{path}' is not a CIFAR batch ({type(error).__name__}); {fix}.") from None
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray):
        raise UserError(f"CIFAR file '{path}' is not a CIFAR batch (no b'data' array in a dict); {fix}.")
    return batch
