"""Checksums of saved checkpoints: one per array and per JSON item, to catch damaged files.

A bit flipped on disk can decode into a valid but wrong array (garbage or NaN) that
Orbax reads without error; a checksum recorded when the step was saved and compared
after every restore turns that into a clear fault. `make_record` builds the JSON record
saved beside the items (`vla_jax.train.checkpoint` writes it as one more item of the same
step, so it commits with them); `describe_mismatch` compares restored items against it.

Array checksums are computed on device, where the arrays live, from their logical values:
one jitted pass over each array per save or restore (a few integer operations per element,
exact integer sums), so the result is the same on any mesh and any number of hosts, and
only 8 bytes per array come back to the host. Each array also records its dtype and shape, so a
restore target built by another config is told apart from damage.
"""

import json
import zlib
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

FORMAT = 1


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser on uint32: each input bit flips every output bit w.p. ~1/2."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words, one per element (8-byte types: a last axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape: Tuple[int, ...]) -> jax.Array:
  """uint32 [*shape]: the row-major index of every element mod 2^32, without a reshape.

  Reshaping a sharded array could move it between devices; iotas are built in place.
  """
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride = stride * shape[axis] % 2**32
  return index


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 [2] of one array: a weighted and a mixed sum of its words, mod 2^32.

  The weighted sum, sum_i w_i (2i + 1), changes under every single-bit flip (an odd
  weight times 2^k is never 0 mod 2^32); the sum of fmix32(w_i ^ i * golden ratio)
  misses other damage with probability ~2^-32. Integer sums are exact in any order, so
  the value does not depend on the sharding or on how the reduction is split.
  """
  words = _words(jnp.asarray(x))
  index = _positions(words.shape)
  weighted = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  mixed = jnp.sum(_fmix32(words ^ (index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([weighted, mixed])


# Compiled once per distinct shape and dtype (a train state has few: the tiny preset's
# 367 arrays have 24), shared by the train state, the params, saves and restores.
_leaf_checksum_jit = jax.jit(_leaf_checksum)


def _checksum(x: jax.Array) -> jax.Array:
  """uint32 [2] of `x` on its devices; the host holds it (replicated) when this returns."""
  total = _leaf_checksum_jit(x)
  if len(x.sharding.device_set) == 1:
    return total  # read later with the others: no need to wait
  # A sum over devices ends in an all-reduce. Many of them in flight at once can starve
  # XLA:CPU's shared thread pool (a rendezvous timeout with fake devices): one at a time.
  total = total.block_until_ready()
  # Replicated: every process holds all of it, also when other hosts hold other shards.
  return total.addressable_data(0) if total.sharding.is_fully_replicated else total


def array_checksums(tree: Any) -> Dict[str, Dict[str, Any]]:
  """{leaf path (`jax.tree_util.keystr`): {"checksum": 16 hex digits, "dtype", "shape"}}.

  Each array is summed where it is (any mesh, any number of hosts); the results come to
  the host in one transfer of 8 bytes per array.
  """
  with_paths = [(path, jnp.asarray(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)]
  sums = jax.device_get([_checksum(x) for _, x in with_paths])
  return {jax.tree_util.keystr(path): {"checksum": "%08x%08x" % (int(a), int(b)),
                                       "dtype": x.dtype.name, "shape": list(x.shape)}
          for (path, x), (a, b) in zip(with_paths, sums)}


def json_checksum(value: Any) -> str:
  """CRC32 (8 hex digits) of the canonical JSON text of `value`."""
  return f"{zlib.crc32(json.dumps(value, sort_keys=True).encode()):08x}"


def make_record(arrays: Mapping[str, Any], json_items: Mapping[str, Any]) -> Dict[str, Any]:
  """The JSON record: {"format", "record": its own CRC, item: {path: ...} or CRC}.

  Args:
    arrays: {item name: pytree of arrays}, e.g. {"train_state": ..., "params": ...}.
    json_items: {item name: the JSON value saved}, e.g. {"assets": ...}.
  """
  record = {"format": FORMAT, **{name: array_checksums(tree) for name, tree in arrays.items()},
            **{name: json_checksum(value) for name, value in json_items.items()}}
  return {**record, "record": json_checksum(record)}


def record_problem(record: Any) -> Optional[str]:
  """Why `record` cannot be trusted (damaged, unknown format), or None."""
  if not isinstance(record, dict) or "record" not in record:
    return "its checksums item is damaged"
  rest = {k: v for k, v in record.items() if k != "record"}
  if record["record"] != json_checksum(rest):
    return "its checksums item is damaged (it does not match its own checksum)"
  if rest.get("format") != FORMAT:
    return (f"its checksums are of format {rest.get('format')!r}; this version of vla_jax "
            f"reads format {FORMAT}")
  return None


def fit_problem(recorded: Mapping[str, Any], target: Any, name: str = "") -> Optional[str]:
  """How a restore target's arrays differ from the saved ones (paths, shapes), or None.

  Args:
    recorded: the record's entry of one item ({path: {"checksum", "dtype", "shape"}}).
    target: the pytree the item is to be restored into; `name` prefixes its paths.
  """
  wanted = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
  extra = [name + p for p in sorted(set(recorded) - set(wanted))]
  missing = [name + p for p in sorted(set(wanted) - set(recorded))]
  if extra or missing:
    parts = ([f"it holds {len(extra)} array(s) this model does not have (first: {extra[:2]})"]
             if extra else []) + (
             [f"it lacks {len(missing)} array(s) this model has (first: {missing[:2]})"]
             if missing else [])
    return " and ".join(parts)
  for path, x in wanted.items():
    saved = tuple(recorded[path]["shape"])
    if saved != tuple(x.shape):
      return f"it holds {name}{path} with shape {saved}, this model builds {tuple(x.shape)}"
  return None


def with_saved_dtypes(recorded: Mapping[str, Any], target: Any) -> Any:
  """`target` (ShapeDtypeStructs) with the dtypes the arrays were saved in.

  Restoring in the saved dtype keeps the bytes checkable; the caller casts afterwards.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, recorded[jax.tree_util.keystr(p)]["dtype"],
                                        sharding=getattr(x, "sharding", None)), target)


def describe_mismatch(record: Mapping[str, Any], restored: Mapping[str, Any],
                      json_names: Tuple[str, ...] = ()) -> Optional[str]:
  """The first restored item or array unlike its recorded checksum, in words, or None.

  Args:
    record: `make_record`'s record (checked with `record_problem` first).
    restored: {item name: restored pytree of arrays, or JSON value for `json_names`}.
  """
  for name, value in restored.items():
    if name in json_names:
      if record.get(name) != json_checksum(value):
        return f"the JSON item {name} does not match the checksum recorded when it was saved"
      continue
    recorded, got = record.get(name) or {}, array_checksums(value)
    bad = [path for path, entry in got.items()
           if recorded.get(path, {}).get("checksum") != entry["checksum"]]
    if bad:
      more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
      return (f"array {name}{bad[0]}{more} does not match the checksum recorded when it was "
              "saved (its bytes changed on disk)")
  return None
