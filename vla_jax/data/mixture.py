"""Mixing datasets and feeding hosts: weights, shuffle-buffer sizing, per-host batches, global arrays.

Weights are normalised to sum to 1 and, with `balance`, first multiplied by each
dataset's frame count (Octo's `balance_weights`: a dataset twice as large is sampled
twice as often). The frame-level shuffle buffer holds frames *before* image decoding,
so one entry costs the encoded camera images (JPEG bytes) plus the float vectors and the
instruction: a few KB for 64 px JPEGs, ~10-20 KB for 256 px ones (`frame_bytes` measures
it). `shuffle_buffer_entries` caps the buffer to a RAM budget. A global batch is split
into equal per-host batches and `to_global_array` assembles each host's batch into one
`jax.Array` sharded over the mesh's batch axes.
"""

import logging
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from vla_jax.errors import ConfigError


def mixture_weights(weights: Sequence[float], num_frames: Sequence[int],
                    balance: bool) -> np.ndarray:
  """[D] sampling probabilities: weights (x frame counts when balance), normalised."""
  weights = np.asarray(weights, np.float64)
  if balance:
    weights = weights * np.asarray(num_frames, np.float64)
  if weights.sum() <= 0 or (weights < 0).any():
    raise ConfigError(f"Mixture weights must be >= 0 with a positive sum, got {weights.tolist()}.")
  return weights / weights.sum()


def frame_bytes(frames: tf.data.Dataset, samples: int = 32) -> float:
  """Mean host bytes of one undecoded frame (what one shuffle-buffer entry costs)."""
  sizes = []
  for frame in frames.take(samples).as_numpy_iterator():
    leaves = jax.tree_util.tree_leaves(frame)
    sizes.append(sum(len(v) if isinstance(v, bytes) else
                     sum(len(b) for b in np.ravel(v)) if getattr(v, "dtype", None) == object
                     else np.asarray(v).nbytes for v in leaves))
  return float(np.mean(sizes)) if sizes else 0.0


def shuffle_buffer_entries(requested: int, bytes_per_entry: float,
                           ram_budget_mb: Optional[float]) -> int:
  """The shuffle buffer size: `requested`, capped so it fits `ram_budget_mb` (if given)."""
  if ram_budget_mb is None or bytes_per_entry <= 0:
    return requested
  fits = int(ram_budget_mb * 2**20 // bytes_per_entry)
  if fits < requested:
    logging.warning("Shuffle buffer cut from %d to %d frames to fit %.0f MB (%.1f KB/frame).",
                    requested, fits, ram_budget_mb, bytes_per_entry / 1024)
  return max(1, min(requested, fits))


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-host share of the global batch (it must divide evenly)."""
  if global_batch_size % process_count:
    raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by the "
                      f"{process_count} processes; use a multiple of {process_count}.")
  return global_batch_size // process_count


def to_global_array(batch: Dict[str, Any], mesh: jax.sharding.Mesh,
                    batch_axes: Sequence[str] = ("data", "fsdp")) -> Dict[str, Any]:
  """Host batch (numpy leaves [B_host, ...]) -> global jax.Arrays [B_global, ...] on `mesh`.

  The leading axis is sharded over the mesh axes in `batch_axes` that exist; string
  leaves (instructions) stay on the host and are dropped.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))

  def convert(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x)

  numeric = jax.tree_util.tree_map(
      lambda x: x if np.asarray(x).dtype.kind not in "OSU" else None, batch)
  return jax.tree_util.tree_map(convert, numeric)
