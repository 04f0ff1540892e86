"""Converted checkpoints: a published checkpoint turned once into an Orbax directory.

Loading a 7B HuggingFace checkpoint means re-laying out every tensor; doing that at
every launch wastes minutes. `convert` loads a local HF / big_vision checkpoint through
the validating loaders and writes an Orbax checkpoint with two items:

  params/   the model's parameter pytree (our names and layout, chosen dtype)
  meta/     JSON: the model config it belongs to, the source path and format

`load_converted` restores it onto any device layout (pass shardings) and checks that the
stored config equals the one asked for, so a converted OpenVLA cannot be silently loaded
into a differently-sized model. Writes go to a temporary directory renamed into place
at the end, so an interrupted conversion never leaves a half-written checkpoint behind.
"""

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vla_jax.errors import CheckpointError

FORMAT_VERSION = 1


def _jsonable(config: Any) -> Dict[str, Any]:
  # A config with its own experiment-config layout (`TeacherConfig.to_mapping`) is
  # recorded in it; other dataclasses field by field.
  mapping = config.to_mapping() if hasattr(config, "to_mapping") else dataclasses.asdict(config)
  return json.loads(json.dumps(mapping))


def save_converted(path: str, params: Any, config: Any, *, source: str = "", fmt: str = "",
                   dtype: Optional[str] = None) -> str:
  """Writes `params` (optionally cast to `dtype`) and `config` as an Orbax checkpoint.

  Args:
    path: output directory (must not exist yet).
    params: the parameter pytree.
    config: the model config dataclass the params belong to.
    source, fmt: provenance recorded in the metadata.
    dtype: e.g. "bfloat16" to halve the size; None keeps the params' dtypes.
  Returns:
    The absolute path written.
  """
  meta = {"format_version": FORMAT_VERSION, "config": _jsonable(config),
          "config_type": type(config).__name__, "source": os.fspath(source), "format": fmt}
  return write_params(path, params, {"meta": meta}, dtype=dtype)


def cast_floating(params: Any, dtype: Optional[str]) -> Any:
  """Floating leaves cast to `dtype` (None: unchanged); integer leaves untouched."""
  if dtype is None:
    return params
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def write_params(path: str, params: Any, json_items: Dict[str, Any], *,
                 dtype: Optional[str] = None) -> str:
  """Writes a standalone Orbax checkpoint: a `params` item plus JSON items, atomically.

  Refuses an existing `path`; writes `path + ".partial"` (removing a stale one left by a
  crash) and renames it when complete. Used by conversions and policy exports.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    raise CheckpointError(f"{path} already exists; refusing to overwrite it. Remove it or "
                          "choose another output directory.")
  items = {"params": ocp.args.StandardSave(cast_floating(params, dtype))}
  items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
  tmp = path + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(tmp, ocp.args.Composite(**items))
  os.replace(tmp, path)
  return path


def read_meta(path: str) -> Dict[str, Any]:
  """The JSON metadata of a converted checkpoint."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(os.path.join(path, "params")):
    raise CheckpointError(f"{path} is not a converted checkpoint (no params/ item); create one "
                          "with `python -m vla_jax.main --mode=convert`.")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_converted(path: str, config: Any, abstract_params: Any,
                   shardings: Any = None) -> Tuple[Any, Dict[str, Any]]:
  """Restores a converted checkpoint for `config`, optionally onto `shardings`.

  Args:
    path: the directory written by `save_converted`.
    config: the model config the caller will run; must equal the stored one.
    abstract_params: `jax.ShapeDtypeStruct` pytree of the params (from `jax.eval_shape`).
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    (params, meta).
  """
  path = os.path.abspath(os.fspath(path))
  meta = read_meta(path)
  stored, wanted = meta.get("config"), _jsonable(config)
  # A key absent on one side equals None on the other: conversions made before the
  # teacher registry record `dino: None` beside a SigLIP teacher's `vit`.
  diffs = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
  if diffs:
    raise CheckpointError(
        f"{path} was converted for another model config; differing keys: {diffs}. Use the "
        "config it was converted with, or convert again for this one.")
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params, shardings)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
        path, ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return restored["params"], meta
