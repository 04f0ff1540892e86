"""What a teacher family is: the one interface `Teacher`, the config parser and the loader use.

A family (SigLIP, DINOv2, C-RADIO, ...) is a `TeacherFamily` value in its own module of
this package, registered by one line in `__init__.py`. It owns everything that differs
between towers, so no other code branches on `teacher.kind`:

- its config dataclass and where it sits in an experiment config (`teacher.<key>`);
- its flax module, called as `module(images) -> (x, out)` with `out["encoded"]` and
  `out["blockNN"]` ([B, T, D] residual streams, prefix tokens included);
- its pixel normalisation (mean / std applied to [0, 1] images);
- how many prefix tokens (CLS, registers, summary tokens) precede the patch tokens;
- its checkpoint loaders by format name ("hf", "big_vision"), each checking the
  checkpoint's config.json against the config it loads into;
- its named presets, sized for a student's patch grid.

The tower config must expose `width`, `depth`, `patch_size`, `image_size` (the square
input side it runs at; `image_size // patch_size` is its patch grid) and `dtype`.
"""

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Tuple

import flax.linen as nn

from vla_jax.errors import ConfigError
from vla_jax.typed_config import from_mapping


class TowerConfig(Protocol):
  """The attributes `Teacher` reads from every family's config."""
  width: int
  depth: int
  patch_size: int
  image_size: int
  dtype: str


# (checkpoint path, tower config, *, shardings) -> the tower's params pytree.
Loader = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class TeacherFamily:
  """One kind of teacher tower.

  Attributes:
    kind: the value of `teacher.kind` ("siglip").
    key: the name of its sub-config in an experiment config (`teacher.vit`).
    config_class: its frozen config dataclass.
    config_prefix: the name its config class gives itself in error messages ("vit"
      in "vit.width must be ..."); parsing rewrites it to the user's path (`teacher.vit`).
    module: config -> the flax module.
    pixel_norm: config -> (mean, std), three floats each, for [0, 1] RGB input.
    num_prefix_tokens: config -> tokens before the patch tokens in `out["encoded"]`.
    loaders: checkpoint format -> `Loader`.
    presets: preset name -> (student grid -> config seeing that grid at resize_input).
    default_preset: the preset for full-size experiments (configs/align.py).
    tiny_preset: the preset for the CPU-sized experiments.
  """
  kind: str
  key: str
  config_class: type
  config_prefix: str
  module: Callable[[Any], nn.Module]
  pixel_norm: Callable[[Any], Tuple[Sequence[float], Sequence[float]]]
  num_prefix_tokens: Callable[[Any], int]
  loaders: Mapping[str, Loader]
  presets: Mapping[str, Callable[[int], Any]]
  default_preset: str
  tiny_preset: str

  def parse(self, mapping: Optional[Mapping[str, Any]], where: str) -> Any:
    """The family's config from a mapping; every error names the user's path `where`.

    Unknown keys are reported by `from_mapping` under `where`; the config's own checks
    name it `config_prefix.<field>`, rewritten here to `where.<field>`.
    """
    try:
      return from_mapping(self.config_class, mapping, where)
    except ConfigError as e:
      message = re.sub(rf"(?<![\w.]){re.escape(self.config_prefix)}\.", f"{where}.", str(e))
      raise ConfigError(message) from None
