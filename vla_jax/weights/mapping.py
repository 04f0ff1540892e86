"""Turns a flat checkpoint view into a model's parameter pytree, checking everything.

A loader is a list of `Rule`s: each names one target parameter (a `/`-joined path in
our tree), the checkpoint tensors it is made of, and a pure numpy transform (transpose,
reshape, stack over layers...). `load_params` validates the whole list against the
checkpoint's names and the model's expected shapes *before reading any data*, then
reports every missing, unexpected, mis-shaped or uncovered tensor in one error. Tensors
are then materialised one at a time (memory-mapped source -> transform -> device), and
each can go straight onto its `jax.sharding.Sharding`, so host memory never holds the
model twice.
"""

import dataclasses
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import CheckpointError
from vla_jax.weights import hf_config
from vla_jax.weights.npz import flatten, unflatten

_SHOW = 12


def identity(x):
  """The no-op transform: the checkpoint tensor is already in our layout."""
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  """`target` (our `/` path) <- `transform(*[checkpoint[s] for s in sources])`."""
  target: str
  sources: Tuple[str, ...]
  transform: Callable[..., np.ndarray] = identity

  @classmethod
  def copy(cls, target: str, source: str, transform=identity) -> "Rule":
    return cls(target, (source,), transform)


def stacked(target: str, sources: Sequence[str], transform=identity) -> Rule:
  """A scanned parameter: `stack([transform(s) for s in sources])` on a new axis 0."""
  return Rule(target, tuple(sources), lambda *xs: np.stack([transform(x) for x in xs]))


def nest(prefix: str, rules: Sequence[Rule]) -> list:
  """The same rules with every target moved under `prefix` (e.g. "llm/")."""
  return [dataclasses.replace(r, target=prefix + r.target) for r in rules]


# Common transforms between PyTorch and Flax layouts.
def linear(w):
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return w.T


def conv2d(w):
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
  return w.transpose(2, 3, 1, 0)


def _fake(shape, dtype):
  """A zero-byte array of `shape`, for dry-running transforms to learn output shapes."""
  return np.broadcast_to(np.zeros((), dtype), shape)


def _shape_of(source, name):
  if hasattr(source, "shape") and callable(getattr(source, "shape")):
    return tuple(source.shape(name))
  return tuple(np.shape(source[name]))


def _dtype_of(source, name) -> np.dtype:
  if hasattr(source, "dtype") and callable(getattr(source, "dtype")):
    return np.dtype(source.dtype(name))
  return np.asarray(source[name]).dtype


def _fmt(items: Iterable[str]) -> str:
  items = sorted(items)
  shown = ", ".join(items[:_SHOW])
  return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def check_rules(source: Mapping[str, Any], rules: Sequence[Rule], expected: Mapping[str, Any],
                ignore: Sequence[str] = (), source_name: str = "checkpoint") -> None:
  """Raises CheckpointError listing every mismatch between checkpoint, rules and model.

  Mismatches: checkpoint tensors no rule reads (unless ignored), tensors rules need but
  the checkpoint lacks, shapes that differ after the transform, non-float tensors where
  the model has float parameters (and vice versa), and model parameters no rule fills.

  Args:
    source: flat checkpoint mapping (name -> array-like; may be lazy).
    rules: the loader's rules.
    expected: flat `{target: ShapeDtypeStruct-like}` of the model's parameters.
    ignore: regexes of checkpoint names that are deliberately unused.
  """
  names = set(source.keys())
  used = {s for r in rules for s in r.sources}
  missing = sorted(used - names)
  ignored = [re.compile(p) for p in ignore]
  unexpected = sorted(n for n in names - used if not any(p.fullmatch(n) for p in ignored))
  targets = {r.target for r in rules}
  uncovered = sorted(set(expected) - targets)
  problems = []
  misshaped = []
  mistyped = []
  for rule in rules:
    if rule.target not in expected:
      problems.append(f"rule targets {rule.target!r}, which the model does not have")
      continue
    if any(s not in names for s in rule.sources):
      continue
    want_kind = np.dtype(expected[rule.target].dtype).kind
    for s in rule.sources:  # e.g. integer ids where float weights belong: not castable
      if (want_kind == "f") != (_dtype_of(source, s).kind in "fV"):
        mistyped.append(f"{s} is {_dtype_of(source, s)}, {rule.target} needs "
                        f"{np.dtype(expected[rule.target].dtype)}")
    want = tuple(expected[rule.target].shape)
    try:
      got = tuple(rule.transform(*[_fake(_shape_of(source, s), np.float32)
                                   for s in rule.sources]).shape)
    except Exception as e:  # a reshape that cannot apply is a shape mismatch too
      got = f"untransformable ({type(e).__name__}: {e})"
    if got != want:
      shapes = ", ".join(f"{s}{_shape_of(source, s)}" for s in rule.sources[:2])
      misshaped.append(f"{rule.target}: model wants {want}, {shapes} gives {got}")
  lines = []
  if missing:
    lines.append(f"missing from the {source_name} ({len(missing)}): {_fmt(missing)}")
  if unexpected:
    lines.append(f"unexpected in the {source_name} ({len(unexpected)}): {_fmt(unexpected)}")
  if misshaped:
    lines.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped[:_SHOW]))
  if mistyped:
    lines.append(f"wrong dtype ({len(mistyped)}): " + "; ".join(mistyped[:_SHOW]))
  if uncovered:
    lines.append(f"model parameters no tensor maps to ({len(uncovered)}): {_fmt(uncovered)}")
  lines += problems
  if lines:
    raise CheckpointError(
        f"The {source_name} does not match the model config (a checkpoint of another "
        "architecture or size?):\n  - " + "\n  - ".join(lines) +
        "\nCheck that the config matches the checkpoint (width, depth, heads, vocab) and "
        "that the file is complete.")


def load_params(source: Mapping[str, Any], rules: Sequence[Rule], expected: Any, *,
                ignore: Sequence[str] = (), shardings: Any = None,
                source_name: str = "checkpoint", config_problems: Sequence[str] = (),
                config_file: str = "config.json") -> Dict[str, Any]:
  """Builds the params pytree from `source` following `rules`; validates first.

  Args:
    source: flat name -> array mapping (e.g. `open_safetensors(...)`, `load_npz(...)`).
    rules: one Rule per model parameter.
    expected: the model's params (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(model.init, ...)`), nested dicts; their dtypes are the targets.
    ignore: regexes of checkpoint names that are deliberately not loaded.
    shardings: optional pytree like `expected` of `jax.sharding.Sharding`; each tensor
      is then assembled shard by shard with `jax.make_array_from_callback`.
    config_problems: what the checkpoint's `config_file` sets that the model does not
      compute (`hf_config`); reported, with any name/shape mismatch, in one error.
  Returns:
    Nested dict of `jax.Array`s shaped like `expected`.
  """
  flat_expected = flatten(expected)
  header = (hf_config.checkpoint_problems(config_problems, source_name, config_file)
            if config_problems else "")
  try:
    check_rules(source, rules, flat_expected, ignore, source_name)
  except CheckpointError as e:
    if header:
      raise CheckpointError(f"{header}\n{e}") from None
    raise
  if header:
    raise CheckpointError(header)
  flat_shardings = flatten(shardings) if shardings is not None else {}
  out = {}
  for rule in rules:
    spec = flat_expected[rule.target]
    array = rule.transform(*[source[s] for s in rule.sources])
    dtype = spec.dtype
    sharding = flat_shardings.get(rule.target)
    if sharding is not None:
      out[rule.target] = jax.make_array_from_callback(
          tuple(spec.shape), sharding,
          lambda index, a=array, d=dtype: np.asarray(a[index], dtype=d))
    else:
      out[rule.target] = jnp.asarray(np.asarray(array, dtype=dtype))
  return unflatten(out)

