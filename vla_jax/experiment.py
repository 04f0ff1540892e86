"""From an experiment ConfigDict (configs/*.py) to validated, typed configs.

`configs/align.py` is data: nested dicts that users override from the command line
(`--config.model.llm.depth=2`). `parse_config` turns it into an `Experiment` of frozen
dataclasses, rejecting unknown keys by name and cross-checking the parts (the alignment
layer exists in the LLM, the teacher can see the student's grid) before anything
compiles.
"""

import dataclasses
import importlib.util
import os
from typing import Any, Mapping, Optional

from vla_jax.errors import ConfigError
from vla_jax.models import align as align_lib
from vla_jax.models import lora as lora_lib
from vla_jax.models import teacher as teacher_lib
from vla_jax.models import teachers
from vla_jax.models import vla as vla_lib
from vla_jax.typed_config import from_mapping, require


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The typed parts of one experiment config."""
  model: vla_lib.VLAConfig
  teacher: teacher_lib.TeacherConfig
  align: align_lib.AlignConfig
  lora: Optional[lora_lib.LoraConfig]

  def __post_init__(self):
    depth = self.model.llm.depth
    if self.align.align_layers is None:
      require(self.align.align_layer <= depth,
              f"align.align_layer={self.align.align_layer} but the LLM has only {depth} "
              f"layers; pick a layer in [0, {depth}] (the paper uses the middle one, "
              f"{depth // 2}).")
    else:  # align_layers replaces align_layer, which is then not read
      outside = [layer for layer in self.align.align_layers if layer > depth]
      require(not outside,
              f"align.align_layers={self.align.align_layers} but the LLM has only {depth} "
              f"layers: {outside} outside [0, {depth}]; pick layers in that range (the "
              f"paper aligns one, the middle one, {depth // 2}).")


def _as_dict(mapping: Any) -> dict:
  if mapping is None:
    return {}
  return dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)


def parse_teacher(mapping: Mapping[str, Any]) -> teacher_lib.TeacherConfig:
  """{kind, layer, <family key>: {...}, ...} -> TeacherConfig.

  Each registered family's sub-config may be present (`teacher.vit`, `teacher.dino`,
  `teacher.radio`, `teacher.dinov3`, `teacher.siglip2`: configs/align.py carries all of
  them so that `--config.teacher.kind` can switch); only the one of `kind` is read, and
  its errors name `teacher.<key>.<field>`.
  """
  mapping = _as_dict(mapping)
  keys = {f.key: f for f in teachers.FAMILIES.values()}
  allowed = {"kind", "layer"} | set(keys)
  unknown = sorted(set(mapping) - allowed)
  if unknown:
    raise ConfigError(f"Unknown config key(s) teacher.{', teacher.'.join(unknown)}; valid keys: "
                      f"{', '.join(sorted(allowed))}.")
  kind = mapping.get("kind", "siglip")
  family = teachers.family(kind)
  tower = mapping.get(family.key)
  if tower is None:
    raise ConfigError(f"teacher.kind={kind!r} needs teacher.{family.key} to be set.")
  return teacher_lib.TeacherConfig(kind=kind, tower=family.parse(tower, f"teacher.{family.key}"),
                                   layer=mapping.get("layer"))


def parse_config(config: Any) -> Experiment:
  """Validates an experiment ConfigDict; raises ConfigError naming the offending key."""
  lora = _as_dict(config.get("lora"))
  enabled = lora.pop("enabled", False)
  return Experiment(
      model=vla_lib.vla_config_from_mapping(config.model),
      teacher=parse_teacher(config.teacher),
      align=from_mapping(align_lib.AlignConfig, config.align, "align"),
      lora=from_mapping(lora_lib.LoraConfig, lora, "lora") if enabled else None)


def load_config(path: str, arg: Optional[str] = None) -> Any:
  """`get_config(arg)` of a config file, as `--config=path:arg` would (Colab, tests, scripts).

  Args:
    path: a config module such as "configs/align.py".
    arg: its preset argument (None: the file's default).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"No config file at {path!r}; pass a path such as configs/align.py.")
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0] + "_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
