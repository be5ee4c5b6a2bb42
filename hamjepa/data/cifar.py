"""CIFAR's pickled batches, read without letting a file run code.

torchvision's on-disk CIFAR files (`cifar-10-batches-py/`, `cifar-100-python/`) are pickles: a dict of byte
strings, lists and numpy arrays per batch. Plain pickle.load would run whatever a crafted file names (any
importable callable), so `read_batch` unpickles with CifarUnpickler, which resolves only the handful of globals
a real batch contains (numpy's array constructors, numpy.dtype, the latin-1 bytes helpers of Python 2 and 3
pickles) to constructors that build exactly those things, and refuses anything else in one sentence before
calling it. sources.read_cifar turns the dicts into images.

Shapes are checked before anything is allocated: a pickled array names its shape and dtype before its bytes,
and a crafted file can ask for any size (a 32 TiB array is a few dozen bytes of pickle). Every array constructor
here refuses a shape whose bytes exceed MAX_ARRAY_BYTES, and an array's state (its shape, dtype and raw bytes)
must describe exactly the bytes the file holds, with no object dtype, before numpy sees it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hamjepa import paths
from hamjepa.errors import UserError

try:  # CIFAR's pickled arrays; numpy 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


# The largest array a CIFAR batch holds is CIFAR-100's training images, 50,000 x 3,072 bytes (146 MiB).
MAX_ARRAY_BYTES = 256 * 2**20
MAX_DIMENSIONS = 8


class TooLarge(pickle.UnpicklingError):
    """An array larger than MAX_ARRAY_BYTES (or with an unreadable shape), refused before it is allocated."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _nbytes(shape, dtype) -> int:
    """The bytes an array of `shape` and `dtype` would take, checked against MAX_ARRAY_BYTES first."""
    if isinstance(shape, int):
        shape = (shape,)
    if (not isinstance(shape, tuple) or len(shape) > MAX_DIMENSIONS
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise TooLarge(f"an array of shape {str(shape)[:60]}, which is not a shape")
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects")
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise TooLarge(f"an array of shape {shape} ({nbytes:,} bytes)")
    return nbytes


class _CheckedArray(np.ndarray):
    """What numpy's pickled-array constructor builds here: its state is checked before numpy takes it (BUILD
    calls __setstate__), and read_batch turns it back into a plain ndarray."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an array state numpy never writes")
        shape, dtype, _, raw = state[-4:]
        nbytes = _nbytes(shape, dtype)
        if not isinstance(raw, bytes) or len(raw) != nbytes:
            raise pickle.UnpicklingError("an array whose bytes do not match its shape")
        super().__setstate__(state)


class _NdarrayName:
    """What the name numpy.ndarray resolves to: the subtype argument of numpy's constructor, never called itself
    (a batch never calls it; a crafted file would, with any shape)."""

    def __new__(cls, shape=(), dtype=float, *args, **kwargs):
        _nbytes(shape, dtype)  # a huge shape is said as such
        raise pickle.UnpicklingError("numpy.ndarray called directly")


def _array(subtype, shape, dtype):
    """numpy's pickled-array constructor, for plain ndarrays only (no subclass's __setstate__ runs)."""
    if subtype is not _NdarrayName:
        raise pickle.UnpicklingError("an array subclass")
    _nbytes(shape, dtype)
    return _np_reconstruct(_CheckedArray, shape, dtype)


def _array_from_buffer(buffer, dtype, shape, order):
    """numpy's constructor for arrays pickled with protocol 5 (contiguous buffer, then reshape)."""
    if len(memoryview(buffer).cast("B")) != _nbytes(shape, dtype):
        raise pickle.UnpicklingError("an array whose bytes do not match its shape")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _plain(value):
    """`value` with every checked array turned back into a plain ndarray (a view: nothing is copied)."""
    if isinstance(value, _CheckedArray):
        return value.view(np.ndarray)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


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
    ("numpy", "ndarray"): _NdarrayName,
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
    found = paths.kind(path)
    if found != "a regular file":  # a named pipe would block the read until a writer came
        raise UserError(f"CIFAR file '{path}' is {found}, not a regular file; {fix}.")
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise UserError(f"CIFAR file '{path}' cannot be read ({error.strerror or type(error).__name__}); "
                        f"{fix}.") from None
    except _RefusedGlobal as refused:
        raise UserError(f"CIFAR file '{path}' was refused without running it: it asks for "
                        f"'{refused.qualified}', which a CIFAR batch never contains; {fix}.") from None
    except TooLarge as refused:
        raise UserError(f"CIFAR file '{path}' was refused before allocating anything: it asks for "
                        f"{refused.what}, larger than any CIFAR batch holds (at most {MAX_ARRAY_BYTES:,} bytes "
                        f"per array); {fix}.") from None
    except MemoryError:  # a size that passed the checks yet does not fit: still one sentence
        raise UserError(f"CIFAR file '{path}' asks for more memory than this machine has; {fix}.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as error:
        raise UserError(f"CIFAR file '{path}' is not a CIFAR batch ({type(error).__name__}); {fix}.") from None
    batch = _plain(batch)
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray):
        raise UserError(f"CIFAR file '{path}' is not a CIFAR batch (no b'data' array in a dict); {fix}.")
    return batch
