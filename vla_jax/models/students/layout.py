"""What a student layout is: the parts of a VLA student that differ between architectures.

A `StudentLayout` says where the visual tokens sit in the LLM's sequence, how attention
and positions are laid out, which projector maps tower features to the LLM width, which
tower outputs feed it, and which checkpoint formats load it. `models.vla.VLA`,
`vla.sequence_layout` (training, decoding, attention maps) and `weights.vla.load_student`
read only this; the registry (`students/__init__.py`) maps `model.arch` to a layout.
"""

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from vla_jax.errors import CheckpointError

# Pixel statistics of the towers' pretraining (SigLIP maps [0, 1] to [-1, 1]).
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(images: jax.Array, mean, std, dtype) -> jax.Array:
  """[B, H, W, 3] floats in [0, 1] -> (images - mean) / std in `dtype`."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class StudentLayout:
  """One student architecture (`model.arch`).

  Attributes:
    arch: the registered name.
    visual_start: sequence index of the first visual token (text before it, e.g. BOS).
    prefix_lm: False = causal attention everywhere; True = the visual tokens and the
      prompt attend bidirectionally, the supervised suffix causally.
    first_position: RoPE position of the first token (PaliGemma counts from 1).
    check: (VLAConfig) -> None; raises ConfigError for configs the layout cannot build.
    projector: (VLAConfig) -> the flax module mapping tower features [B, N, vision_width]
      to [B, N, llm_width]; it is bound as the student's `projector` subtree.
    vision_features: (the bound VLA module, VLAConfig, images [B, H, W, 3] in [0, 1])
      -> [B, N, vision_width], calling the module's `siglip` / `dino` towers.
    loaders: checkpoint format -> "module:function" of a loader
      `(path, config, *, shardings=None) -> params` (imported when used, so that the
      weights package may import the models).
  """
  arch: str
  visual_start: int
  prefix_lm: bool
  first_position: int
  check: Callable[[Any], None]
  projector: Callable[[Any], Any]
  vision_features: Callable[[Any, Any, jax.Array], jax.Array]
  loaders: Mapping[str, str]

  def loader(self, fmt: str) -> Callable[..., Any]:
    """The checkpoint loader for `fmt`; CheckpointError naming the formats it has."""
    if fmt not in self.loaders:
      raise CheckpointError(
          f"No {fmt!r} loader for arch={self.arch!r}; it loads "
          f"{', '.join(repr(f) for f in self.loaders)} (or 'orbax' for a converted "
          "checkpoint).")
    module, function = self.loaders[fmt].split(":")
    return getattr(importlib.import_module(module), function)
