"""A dependency-free safetensors reader (and writer) built on numpy memory maps.

Files are read lazily: `open_safetensors` parses only the JSON headers and returns a
reader whose `get(name)` is a zero-copy `np.memmap` view, so a 7B checkpoint is never
held twice in host memory. bfloat16 tensors come back as `ml_dtypes.bfloat16`.
Accepts a single `.safetensors` file, a sharded `*.safetensors.index.json`, or a
directory holding either (HuggingFace `save_pretrained` layout).
"""

import json
import os
import struct
from typing import Dict, Iterator, Mapping

import ml_dtypes
import numpy as np

from vla_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class _SafetensorsFile:
  """One `.safetensors` file: header parsed eagerly, tensors mapped on demand."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{path} is not a safetensors file: it has only {size} bytes "
                              "(a truncated download?). Re-copy the file.")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > _MAX_HEADER or 8 + header_len > size:
        raise CheckpointError(
            f"{path}: header claims {header_len} bytes but the file has {size}; the file is "
            "truncated or not safetensors. Re-copy or re-export it.")
      try:
        header = json.loads(f.read(header_len))
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e}).") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._data_start = 8 + header_len
    self._entries = {}
    end = 0
    for name, info in header.items():
      dtype = _DTYPES.get(info["dtype"])
      if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
      begin, stop = info["data_offsets"]
      if stop - begin != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
        raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape.")
      self._entries[name] = (dtype, tuple(info["shape"]), begin)
      end = max(end, stop)
    if self._data_start + end > size:
      raise CheckpointError(
          f"{path} is truncated: its header describes {self._data_start + end} bytes but the "
          f"file has {size}. Re-copy or re-download the file.")
    self._mmap = None

  def keys(self):
    return self._entries.keys()

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    count = int(np.prod(shape, dtype=np.int64))
    start = self._data_start + begin
    flat = self._mmap[start:start + count * dtype.itemsize].view(dtype)
    return flat.reshape(shape)

  def shape(self, name: str):
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]


class SafetensorsReader(Mapping):
  """Read-only mapping from tensor name to a lazily mapped numpy array."""

  def __init__(self, files: Dict[str, _SafetensorsFile], where: Dict[str, str], source: str):
    self._files = files
    self._where = where
    self.source = source

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(name)
    return self._files[self._where[name]].get(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def shape(self, name: str):
    return self._files[self._where[name]].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._files[self._where[name]].dtype(name)


def open_safetensors(path: str) -> SafetensorsReader:
  """Opens a safetensors checkpoint (file, index json, or directory) for lazy reading."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"No checkpoint at {path!r}. Point to a local .safetensors file, "
                          "an index .json, or a directory saved by `save_pretrained`.")
  if os.path.isdir(path):
    index = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
    single = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if index:
      path = os.path.join(path, index[0])
    elif len(single) == 1:
      path = os.path.join(path, single[0])
    else:
      raise CheckpointError(
          f"{path!r} holds {len(single)} .safetensors files and no *.safetensors.index.json; "
          "point to one file or add the index.")
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{path}: index json has no 'weight_map'.")
    root = os.path.dirname(path)
    files = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(root, shard)
      if not os.path.exists(shard_path):
        raise CheckpointError(f"{path} lists shard {shard!r} which is missing from {root}.")
      files[shard] = _SafetensorsFile(shard_path)
    where = {}
    for name, shard in weight_map.items():
      if name not in files[shard].keys():
        raise CheckpointError(f"Index says {name!r} is in {shard} but it is not there.")
      where[name] = shard
    return SafetensorsReader(files, where, path)
  single_file = _SafetensorsFile(path)
  return SafetensorsReader({path: single_file}, {k: path for k in single_file.keys()}, path)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
  """Writes `tensors` to one safetensors file (used by exports and tests)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(np.asarray(tensors[name]))
    if array.dtype not in _NAMES:
      raise CheckpointError(f"Cannot save {name!r}: dtype {array.dtype} has no safetensors name.")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays:
      f.write(array.tobytes())
  os.replace(tmp, path)
