"""A HF checkpoint's `config.json`: reading it, and refusing what our models do not compute.

Weights alone do not say which function a checkpoint computes: a Llama with linear RoPE
scaling, a SigLIP with exact GELU or a Gemma with another norm epsilon has exactly the
tensors of the plain one. Each family's loader (`llm.py`, `siglip.py`, `dinov2.py`,
`vla.py`) therefore reads the `config.json` beside the weights and compares every
setting that changes the computed function with the config it loads into. A setting we
implement but configured differently is reported with the value to set; a setting we do
not implement at all (RoPE scaling, MLP biases, ...) is refused. All problems are
raised together as one `CheckpointError`, naming for each the field, its value, what
we implement and the fix.

A field missing from `config.json` takes the default of its transformers config class,
as `from_pretrained` would (the `*_DEFAULTS` tables of the family modules); the same
tables feed each family's `config_from_hf`, which builds our config from `config.json`
so that nobody maps `hidden_size -> width` by hand.
"""

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from vla_jax.errors import CheckpointError

# transformers' names for the tanh approximation of GELU (equal formulas).
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def config_path(path: str) -> str:
  """Where `config.json` would sit for a checkpoint at `path` (directory, file or index)."""
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  return os.path.join(directory, "config.json")


def read_config(path: str) -> Tuple[Optional[Dict[str, Any]], str]:
  """(the parsed `config.json` beside the checkpoint at `path` or None, its path).

  Raises:
    CheckpointError: the file exists but is not a JSON object.
  """
  where = config_path(path)
  if not os.path.isfile(where):
    return None, where
  try:
    with open(where) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{where} beside the checkpoint cannot be read ({e}); it says which "
                          "function the weights compute. Restore the checkpoint's own "
                          "config.json (or remove it to load without the check).") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{where} holds a {type(config).__name__}, not a JSON object; "
                          "restore the checkpoint's own config.json.")
  return config, where


def warn_unchecked(path: str, what: str) -> None:
  logging.warning("No config.json beside %s: %s settings the weights cannot reveal "
                  "(activation, norm epsilon, head count, ...) are not checked.", path, what)


def section(config: Mapping[str, Any], key: str, model_types: Sequence[str]
            ) -> Optional[Mapping[str, Any]]:
  """`config` itself if its model_type is one of `model_types`, else `config[key]` (a
  composite model's sub-config such as `text_config`), else None."""
  if config.get("model_type") in model_types:
    return config
  sub = config.get(key)
  return sub if isinstance(sub, Mapping) else None


class ConfigCheck:
  """Compares one config.json section with our config and collects the problems.

  Args:
    hf: the section (e.g. the whole file, or its `text_config`).
    where: how to name the section in messages, e.g. "config.json text_config".
    defaults: values of fields the file omits (the transformers class defaults); None
      checks only the fields present.
  """

  def __init__(self, hf: Mapping[str, Any], where: str,
               defaults: Optional[Mapping[str, Any]] = None):
    self.hf = hf
    self.where = where
    self.defaults = defaults or {}
    self.problems: List[str] = []

  def has(self, key: str) -> bool:
    return self.get(key) is not None

  def get(self, key: str, default: Any = None) -> Any:
    value = self.hf.get(key)
    if value is None:
      value = self.defaults.get(key, default)
    return value

  def refuse(self, key: str, value: Any, implemented: str, fix: str) -> None:
    """A setting that changes the function and that we do not implement."""
    self.problems.append(f"{self.where}: {key}={value!r} is not implemented: we implement "
                         f"{implemented}. {fix}")

  def differs(self, key: str, value: Any, ours_name: str, ours: Any, fix: str = "") -> None:
    """A setting we implement, configured differently in our config."""
    fix = fix or f"Set {ours_name}={value!r} (or build the config with config_from_hf)."
    self.problems.append(f"{self.where}: {key}={value!r} but {ours_name}={ours!r}: the "
                         f"loaded model would compute another function. {fix}")

  def equal(self, key: str, ours_name: str, ours: Any, *, default: Any = None,
            rtol: Optional[float] = None, convert=None) -> None:
    """Reports `key` if present (or defaulted) and different from `ours`."""
    value = self.get(key, default)
    if value is None:
      return
    mine = value if convert is None else convert(value)
    same = (np.isclose(float(mine), float(ours), rtol=rtol, atol=0) if rtol is not None
            else mine == ours)
    if not same:
      fix = "" if convert is None else (f"Set {ours_name}={mine!r} (or build the config "
                                        "with config_from_hf).")
      self.differs(key, value, ours_name, ours, fix)


def raise_problems(problems: Sequence[str], checkpoint: str, config_file: str) -> None:
  """One CheckpointError listing every problem, or nothing when there are none."""
  if problems:
    raise CheckpointError(checkpoint_problems(problems, checkpoint, config_file))


def checkpoint_problems(problems: Sequence[str], checkpoint: str, config_file: str) -> str:
  return "\n  - ".join([f"{checkpoint} computes a function our config does not ({config_file}):"]
                       + list(problems))


# timm `model_args` (the `config.json` of `timm.models.save_for_hf` / `push_to_hf_hub`)
# that do not change the computed function at inference.
_TIMM_INERT = ("img_size", "num_classes", "in_chans", "dynamic_img_size", "drop_rate",
               "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
               "drop_path_rate", "weight_init", "fix_init")


def timm_config_problems(path: str, family: str, ours: Mapping[str, Tuple[str, Any]]
                         ) -> List[str]:
  """Problems of a timm `config.json` beside `path` (none without one, or for another
  framework's config.json, which has no `architecture`).

  Args:
    family: what the architecture name must contain ("siglip", "dinov2").
    ours: {model_args key: (our config's name, our value[, convert])} for the arguments
      we mirror (`convert` maps timm's value to ours; a value of None is checked by the
      tensors instead); any other argument outside `_TIMM_INERT` is refused (we cannot
      tell what it does).
  """
  hf, where = read_config(path)
  if hf is None or "architecture" not in hf:
    return []
  check = ConfigCheck(hf, where)
  architecture = str(hf["architecture"])
  if family not in architecture:
    check.refuse("architecture", architecture, f"timm {family} ViTs here",
                 f"Load it with the loader of its own family, or use a {family} checkpoint.")
    return check.problems
  args = hf.get("model_args") or {}
  for key, value in args.items():
    if key in _TIMM_INERT or value is None:
      continue
    if key not in ours:
      check.refuse(f"model_args.{key}", value, "timm's defaults for this argument (an "
                   "unknown override may change the function)",
                   f"Use a checkpoint of the plain {architecture}.")
      continue
    name, mine, *convert = ours[key]
    if mine is None:
      continue
    theirs = convert[0](value) if convert else value
    if type(theirs) is not type(mine) and not isinstance(mine, float):
      check.refuse(f"model_args.{key}", value, f"only what {name} can express",
                   f"Use a checkpoint of the plain {architecture}.")
      continue
    if isinstance(mine, float):
      same = np.isclose(float(theirs), mine, rtol=1e-3)
    else:
      same = theirs == mine
    if not same:
      check.differs(f"model_args.{key}", value, name, mine,
                    f"Set {name}={theirs!r}, or use a checkpoint of the plain {architecture}.")
  return check.problems
