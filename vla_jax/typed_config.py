"""Typed, validated model configurations built from plain mappings.

Model hyper-parameters live in frozen dataclasses (one per model family) so that a typo
or an inconsistent value fails before anything compiles, with a message naming the key.
`from_mapping` turns an `ml_collections.ConfigDict` or a dict into such a dataclass.
"""

import dataclasses
import difflib
import re
from typing import Any, Mapping, Tuple, Type, TypeVar

from vla_jax.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: Type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
  """Builds dataclass `cls` from `mapping`, rejecting unknown keys by name.

  Args:
    cls: a dataclass type whose fields are the allowed keys.
    mapping: dict-like (dict or ConfigDict); None gives the defaults.
    where: the config path shown in error messages, e.g. "model.llm".
  """
  if mapping is None:
    mapping = {}
  if hasattr(mapping, "to_dict"):
    mapping = mapping.to_dict()
  fields = {f.name: f for f in dataclasses.fields(cls)}
  prefix = f"{where}." if where else ""
  unknown = [k for k in mapping if k not in fields]
  if unknown:
    hints = []
    for k in unknown:
      close = difflib.get_close_matches(k, fields, n=1)
      hints.append(f"'{prefix}{k}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
    raise ConfigError(
        f"Unknown config key(s) for {cls.__name__}: {', '.join(hints)}. "
        f"Valid keys: {', '.join(sorted(fields))}.")
  kwargs = {}
  for key, value in mapping.items():
    if isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f"Cannot build {cls.__name__} from {prefix or 'config'}: {e}") from None
  except ConfigError as e:
    raise ConfigError(_at_path(str(e), where)) from None


def _at_path(message: str, where: str) -> str:
  """A config class's own check names its keys by a short prefix ("vit.width"); the user
  typed them at `where` ("model.siglip.width"): say that path instead."""
  lead = re.match(r"([A-Za-z_]\w*)\.\w", message)
  if not where or not lead or where.startswith(lead.group(1)):
    return message
  return re.sub(rf"(?<![\w.]){lead.group(1)}\.(?=\w)", f"{where}.", message)


def registered(registry: Mapping[str, T], key: str, where: str) -> T:
  """`registry[key]`; ConfigError naming the setting (`where`) and the known keys."""
  if key not in registry:
    raise ConfigError(f"{where}={key!r}; expected one of {tuple(registry)}.")
  return registry[key]


def require(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition`; used in `__post_init__` checks."""
  if not condition:
    raise ConfigError(message)


def require_positive_ints(config: Any, keys, where: str) -> None:
  """Raises ConfigError unless each `config.<key>` is an int > 0 (bools are not ints here)."""
  for key in keys:
    value = getattr(config, key)
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{where}.{key} must be a positive integer, got {value!r}.")


TOWER_DTYPES = ("float32", "bfloat16", "float16")


def require_tower_settings(config: Any, where: str, flags: Tuple[str, ...]) -> None:
  """The checks every vision tower config shares after its geometry: a positive LayerNorm
  epsilon, a known compute dtype, and `flags` (scan, remat, ...) that are real bools."""
  require(config.layernorm_eps > 0,
          f"{where}.layernorm_eps must be > 0, found {config.layernorm_eps!r}.")
  require(config.dtype in TOWER_DTYPES, f"{where}.dtype must be one of {TOWER_DTYPES}, found "
          f"{config.dtype!r}.")
  for key in flags:
    require(isinstance(getattr(config, key), bool),
            f"{where}.{key} must be True or False, found {getattr(config, key)!r}.")


def require_patch_geometry(config: Any, where: str) -> None:
  """The checks every ViT-like config shares: sizes, heads dividing width, whole patches."""
  require_positive_ints(config, ("width", "depth", "num_heads", "patch_size", "image_size",
                                 "channels"), where)
  require(config.mlp_dim is None or (isinstance(config.mlp_dim, int) and config.mlp_dim > 0),
          f"{where}.mlp_dim must be None (the default width) or a positive integer, got "
          f"{config.mlp_dim!r}.")
  require(config.width % config.num_heads == 0,
          f"{where}.width ({config.width}) must be divisible by {where}.num_heads "
          f"({config.num_heads}); pick a head count that divides the width.")
  require(config.image_size % config.patch_size == 0,
          f"{where}.image_size ({config.image_size}) must be a multiple of {where}.patch_size "
          f"({config.patch_size}); pick an image size of k * {config.patch_size}.")
