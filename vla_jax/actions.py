"""Actions as tokens (OpenVLA's ActionTokenizer) and normalisation with dataset statistics.

OpenVLA normalises each action dimension to [-1, 1] with the dataset's 1st/99th
percentiles (BOUNDS_Q99), cuts [-1, 1] into `n_bins` uniform bins and writes bin k
(1..n_bins) as token id `vocab_size - k`, i.e. onto the last `n_bins` ids of the base
vocabulary ([31744, 31999] for Llama-2). Decoding maps an id back to a bin centre.
Every function here runs on numpy input (float64 bin edges: exactly OpenVLA's numbers)
and on jax input, jitted or not (one implementation, written against an array module).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import InputError


def _xp(*arrays):
  """jnp if any input is a jax array (or tracer), else numpy."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_finite(name: str, x) -> None:
  """InputError on NaN/inf, for values we can see (not inside jit)."""
  if _is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
    raise InputError(f"{name} must be finite; found NaN or inf in an array of shape "
                     f"{np.shape(x)}. Check the policy output / dataset statistics.")


def _edges_for(dtype, edges64: np.ndarray) -> np.ndarray:
  """Bin edges in `dtype` such that `x >= edge` equals float64 `x >= edges64` for any x
  of that dtype: each edge is rounded *up* to the next representable value."""
  edges = edges64.astype(dtype)
  below = edges.astype(np.float64) < edges64
  return np.where(below, np.nextafter(edges, np.asarray(np.inf, dtype)), edges)


@dataclasses.dataclass(frozen=True)
class ActionTokenizer:
  """OpenVLA's action discretisation: `n_bins` uniform bins on [low, high] -> last ids.

  Attributes:
    vocab_size: size of the base tokenizer's vocabulary (32000 for Llama-2), without
      any added padding tokens.
    n_bins: number of bin edges (`np.linspace(low, high, n_bins)`); there are
      n_bins - 1 bin centres.
    low, high: the clipping range of normalised actions.
  """
  vocab_size: int = 32000
  n_bins: int = 256
  low: float = -1.0
  high: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.n_bins, int) and 2 <= self.n_bins < self.vocab_size):
      raise InputError(f"ActionTokenizer needs 2 <= n_bins < vocab_size, got n_bins="
                       f"{self.n_bins}, vocab_size={self.vocab_size}.")
    if not self.low < self.high:
      raise InputError(f"ActionTokenizer needs low < high, got [{self.low}, {self.high}].")

  @property
  def bins(self) -> np.ndarray:
    """Bin edges [n_bins] (float64), as OpenVLA: linspace(low, high, n_bins)."""
    return np.linspace(self.low, self.high, self.n_bins)

  @property
  def bin_centers(self) -> np.ndarray:
    """Bin centres [n_bins - 1] (float64)."""
    bins = self.bins
    return (bins[:-1] + bins[1:]) / 2.0

  def token_range(self) -> Tuple[int, int]:
    """(first, last) action token ids, inclusive: (vocab_size - n_bins, vocab_size - 1)."""
    return self.vocab_size - self.n_bins, self.vocab_size - 1

  def is_action_token(self, ids):
    """Bool array like `ids`: True where an id is one of the action tokens."""
    first, last = self.token_range()
    return (ids >= first) & (ids <= last)

  def encode(self, actions):
    """Normalised actions [..., A] (float) -> token ids [..., A] (int32).

    Clips to [low, high], then `np.digitize(action, bins)` in 1..n_bins and id =
    vocab_size - bin. numpy input uses OpenVLA's float64 edges; jax input compares
    against edges rounded so the result is identical for float32 actions.
    """
    xp = _xp(actions)
    if not xp.issubdtype(actions.dtype, xp.floating):
      raise InputError(f"ActionTokenizer.encode expects float actions, got dtype "
                       f"{actions.dtype}.")
    _check_finite("ActionTokenizer.encode(actions)", actions)
    if xp is jnp and actions.dtype != jnp.float64:
      actions = actions.astype(jnp.float32)  # bf16/fp16 policy outputs: compare in fp32
    actions = xp.clip(actions, self.low, self.high)
    if xp is np:
      edges = self.bins
    else:
      edges = jnp.asarray(_edges_for(np.dtype(actions.dtype), self.bins))
    # np.digitize(x, increasing bins) == searchsorted(bins, x, side="right").
    discretized = xp.searchsorted(edges, actions, side="right")
    return (self.vocab_size - discretized).astype(xp.int32)

  def decode(self, ids):
    """Token ids [..., A] (int) -> normalised actions [..., A] at the bin centres.

    As OpenVLA: bin = clip(vocab_size - id - 1, 0, n_bins - 2), so ids outside the
    action range decode to the outermost centres. numpy gives float64, jax float32.
    """
    xp = _xp(ids)
    if not xp.issubdtype(ids.dtype, xp.integer):
      raise InputError(f"ActionTokenizer.decode expects integer token ids, got dtype "
                       f"{ids.dtype}.")
    centers = self.bin_centers if xp is np else jnp.asarray(self.bin_centers, jnp.float32)
    discretized = self.vocab_size - ids
    index = xp.clip(discretized - 1, 0, centers.shape[0] - 1)
    return centers[index]


def _check_stats_shapes(fn: str, actions, **stats) -> None:
  dim = np.shape(actions)[-1] if np.ndim(actions) else None
  for name, value in stats.items():
    if value is None:
      continue
    if np.ndim(value) != 1 or np.shape(value)[0] != dim:
      raise InputError(f"{fn} expects {name} of shape [{dim}] (one value per action "
                       f"dimension of actions {np.shape(actions)}), got {np.shape(value)}.")


def _stats_arrays(actions, q01, q99, mask):
  """(xp, q01, q99, mask) as arrays: numpy keeps numpy's promotion (float64 statistics,
  as OpenVLA), jax computes in the actions' dtype."""
  xp = _xp(actions, q01, q99, mask)
  dtype = actions.dtype if xp is jnp else None
  q01, q99 = xp.asarray(q01, dtype), xp.asarray(q99, dtype)
  mask = xp.ones(q01.shape, bool) if mask is None else xp.asarray(mask, bool)
  return xp, q01, q99, mask


def unnormalize_actions(actions, q01, q99, mask=None):
  """[-1, 1] actions [..., A] -> environment units: 0.5 (a + 1)(q99 - q01) + q01 where mask.

  OpenVLA's BOUNDS_Q99 de-normalisation; dimensions with mask False (e.g. the gripper)
  pass through unchanged. q01, q99, mask: [A].
  """
  _check_stats_shapes("unnormalize_actions", actions, q01=q01, q99=q99, mask=mask)
  _check_finite("unnormalize_actions(actions)", actions)
  xp, q01, q99, mask = _stats_arrays(actions, q01, q99, mask)
  return xp.where(mask, 0.5 * (actions + 1.0) * (q99 - q01) + q01, actions)


def normalize_actions(actions, q01, q99, mask=None):
  """Environment-unit actions [..., A] -> [-1, 1]: clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1).

  OpenVLA's BOUNDS_Q99 normalisation (the 1e-8 guards constant dimensions); the
  inverse of `unnormalize_actions` inside the [q01, q99] range. Masked-out dimensions
  pass through unchanged.
  """
  _check_stats_shapes("normalize_actions", actions, q01=q01, q99=q99, mask=mask)
  _check_finite("normalize_actions(actions)", actions)
  xp, q01, q99, mask = _stats_arrays(actions, q01, q99, mask)
  normalized = xp.clip(2.0 * (actions - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0)
  return xp.where(mask, normalized, actions)


_STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
  """Per-dimension statistics of one array (actions or proprio), each [A] float64.

  `mask[i]` False marks a dimension that is not normalised (OpenVLA: the gripper).
  Serialises to OpenVLA's `dataset_statistics.json` entry format.
  """
  mean: np.ndarray
  std: np.ndarray
  min: np.ndarray
  max: np.ndarray
  q01: np.ndarray
  q99: np.ndarray
  mask: Optional[np.ndarray] = None

  def __post_init__(self):
    dim = None
    for key in _STAT_KEYS:
      value = np.asarray(getattr(self, key), np.float64)
      if value.ndim != 1 or (dim is not None and value.shape[0] != dim):
        raise InputError(f"NormStats.{key} must be a vector [{dim or 'A'}] like the other "
                         f"statistics, got shape {value.shape}.")
      if not np.all(np.isfinite(value)):
        raise InputError(f"NormStats.{key} must be finite, got {value.tolist()}. Recompute the "
                         f"dataset statistics.")
      dim = value.shape[0]
      object.__setattr__(self, key, value)
    mask = np.ones(dim, bool) if self.mask is None else np.asarray(self.mask, bool)
    if mask.shape != (dim,):
      raise InputError(f"NormStats.mask must have shape [{dim}], got {mask.shape}.")
    object.__setattr__(self, "mask", mask)

  @property
  def dim(self) -> int:
    return self.q01.shape[0]

  def to_dict(self) -> Dict[str, list]:
    """JSON-ready: {"mean": [floats], ..., "mask": [bools]}."""
    out = {key: [float(v) for v in getattr(self, key)] for key in _STAT_KEYS}
    out["mask"] = [bool(v) for v in self.mask]
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "NormStats":
    """From `to_dict` output or an OpenVLA `dataset_statistics.json` "action" entry."""
    unknown = sorted(set(data) - set(_STAT_KEYS) - {"mask"})
    missing = [key for key in _STAT_KEYS if key not in data]
    if unknown or missing:
      raise InputError(f"NormStats.from_dict expects keys {list(_STAT_KEYS)} (+ optional "
                       f"'mask'); missing {missing}, unknown {unknown}. Pass the per-array "
                       f"entry, e.g. stats['bridge_orig']['action'].")
    return cls(**{key: data[key] for key in _STAT_KEYS}, mask=data.get("mask"))

  def normalize(self, actions):
    """`normalize_actions` with these statistics."""
    return normalize_actions(actions, self.q01, self.q99, self.mask)

  def unnormalize(self, actions):
    """`unnormalize_actions` with these statistics."""
    return unnormalize_actions(actions, self.q01, self.q99, self.mask)
