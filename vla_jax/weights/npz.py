"""big_vision's `.npz` checkpoint format: flat `/`-joined keys, bf16 stored as void.

big_vision saves a parameter pytree as an `.npz` whose keys are the tree paths joined by
`/` (e.g. `Transformer/encoderblock_0/LayerNorm_0/scale`). numpy has no bfloat16, so
bf16 arrays are stored as 2-byte void (`|V2`) and must be viewed back. A path may name a
subtree with `file.npz:sub/tree` (e.g. `paligemma.npz:img` for the vision tower); a
leading `params/` in the file is looked through.
"""

import os
import zipfile
from typing import Any, Dict, Mapping, Tuple

import ml_dtypes
import numpy as np

from vla_jax.errors import CheckpointError


def split_subtree(path: str) -> Tuple[str, str]:
  """`"dir/f.npz:img/x"` -> `("dir/f.npz", "img/x")`; no colon gives an empty subtree."""
  path = os.fspath(path)
  base, sep, subtree = path.rpartition(":")
  if sep and base.endswith(".npz"):
    return base, subtree.strip("/")
  return path, ""


def recover_dtype(array: np.ndarray) -> np.ndarray:
  """Views big_vision's void-encoded bfloat16 (`|V2`) arrays as `ml_dtypes.bfloat16`."""
  if array.dtype == np.dtype("V2"):
    return array.view(ml_dtypes.bfloat16)
  return array


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads a big_vision `.npz` (optionally `file.npz:subtree`) into a flat dict.

  Returns `{"a/b/c": array}` with the subtree prefix removed.
  """
  file_path, subtree = split_subtree(path)
  if not os.path.exists(file_path):
    raise CheckpointError(f"No .npz checkpoint at {file_path!r}.")
  try:
    with np.load(file_path, allow_pickle=False) as data:
      flat = {k: recover_dtype(data[k]) for k in data.files}
  except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
    raise CheckpointError(f"{file_path} is not a readable .npz file ({e}); it may be "
                          "truncated. Re-copy it.") from None
  if not subtree:
    return flat
  for prefix in (subtree + "/", "params/" + subtree + "/"):
    selected = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if selected:
      return selected
  tops = sorted({k.split("/")[0] for k in flat})
  raise CheckpointError(f"{file_path} has no subtree {subtree!r}; top-level keys are {tops}.")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
  """Nested dict -> flat `/`-joined dict (the big_vision key convention)."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """Flat `/`-joined dict -> nested dict."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def save_npz(path: str, tree: Mapping[str, Any]) -> None:
  """Saves a params pytree in big_vision's layout (bf16 written as `|V2`)."""
  flat = {}
  for name, value in flatten(tree).items():
    array = np.asarray(value)
    if array.dtype == ml_dtypes.bfloat16:
      array = array.view("V2")
    flat[name] = array
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)
