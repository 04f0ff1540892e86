"""openpi's websocket wire format: msgpack, with numpy arrays as tagged maps.

An array travels as the map {b"__ndarray__": True, b"data": raw bytes, b"dtype":
dtype.str, b"shape": [dims]}, a numpy scalar as {b"__npgeneric__": True, b"data":
value, b"dtype": dtype.str} (the keys are msgpack bin, as `openpi_client.msgpack_numpy`
writes them; str keys are accepted too). Decoding builds only plain numeric arrays
(bool, int, uint, float) whose byte count matches their shape: a request can never make
the server build an object array.
"""

import math
from typing import Any

import msgpack
import numpy as np

from vla_jax.errors import InputError

_ARRAY, _SCALAR = "__ndarray__", "__npgeneric__"
_NUMERIC_KINDS = "biuf"


def _encode(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    if obj.dtype.kind not in _NUMERIC_KINDS:
      raise TypeError(f"cannot send a {obj.dtype} array; only numeric arrays travel.")
    return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
  if isinstance(obj, np.generic):
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  raise TypeError(f"cannot msgpack a {type(obj).__name__}.")


def _field(obj: dict, name: str) -> Any:
  for key in (name.encode(), name):
    if key in obj:
      return obj[key]
  raise InputError(f"a msgpack numpy map lacks its {name!r} field (has {sorted(map(str, obj))}).")


def _dtype(obj: dict) -> np.dtype:
  descr = _field(obj, "dtype")
  try:
    dtype = np.dtype(descr.decode() if isinstance(descr, bytes) else descr)
  except (TypeError, ValueError, UnicodeDecodeError):
    raise InputError(f"unknown numpy dtype {descr!r} in the request.") from None
  if dtype.kind not in _NUMERIC_KINDS:
    raise InputError(f"arrays must be numeric (bool, int, uint or float), got dtype {dtype}.")
  return dtype


def _decode(obj: dict) -> Any:
  if b"__ndarray__" in obj or _ARRAY in obj:
    dtype, data, shape = _dtype(obj), _field(obj, "data"), _field(obj, "shape")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and d >= 0 for d in shape):
      raise InputError(f"an array's shape must be a list of non-negative ints, got {shape!r}.")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
      raise InputError(f"an array of shape {list(shape)} and dtype {dtype} needs "
                       f"{math.prod(shape) * dtype.itemsize} bytes, the request holds "
                       f"{len(data) if isinstance(data, bytes) else type(data).__name__}.")
    return np.frombuffer(data, dtype).reshape(shape)
  if b"__npgeneric__" in obj or _SCALAR in obj:
    return _dtype(obj).type(_field(obj, "data"))
  return obj


def packb(obj: Any) -> bytes:
  """msgpack bytes of `obj` (nested dicts, lists, str, numbers, numpy arrays)."""
  return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
  """The object in msgpack `data`; numpy maps become arrays. InputError if malformed."""
  try:
    return msgpack.unpackb(data, object_hook=_decode, raw=False)
  except InputError:
    raise
  except UnicodeDecodeError as e:
    raise InputError(f"a msgpack string is not valid UTF-8 ({e}); send text as UTF-8.") from None
  except Exception as e:  # msgpack raises several types for malformed input
    raise InputError(f"the request is not valid msgpack ({type(e).__name__}: {e}); send "
                     "observations packed as openpi_client.msgpack_numpy does.") from None
