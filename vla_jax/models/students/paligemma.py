"""PaliGemma: SigLIP (last block, final norm) -> one linear map -> Gemma, prefix-LM.

Image tokens come first, `[v_1..v_N, BOS, prefix..., suffix...]`; the image and the
prefix attend bidirectionally, the suffix causally; positions start at 1 (HF and
big_vision agree). Loads from HF (`weights.vla.load_hf_paligemma`) and big_vision `.npz`
(`weights.vla.load_big_vision_paligemma`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.models.students.layout import SIGLIP_MEAN, SIGLIP_STD, StudentLayout, normalize
from vla_jax.typed_config import require


class PaliGemmaProjector(nn.Module):
  """PaliGemma's single linear map from SigLIP width to Gemma width."""
  llm_width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, N, vision_width] -> [B, N, llm_width]."""
    return nn.Dense(self.llm_width, dtype=self.dtype, name="linear")(x)


def _check(config) -> None:
  require(config.dino is None, "model.dino must be None for arch='paligemma'.")
  require(config.llm.family == "gemma", "arch='paligemma' needs a Gemma LLM "
          f"(model.llm.family='gemma'), got {config.llm.family!r}.")


def _projector(config) -> nn.Module:
  return PaliGemmaProjector(config.llm.width, dtype=jnp.dtype(config.llm.dtype))


def _vision_features(module, config, images):
  """[B, N, siglip width]: the tower's encoded (final-norm) patch tokens."""
  siglip_in = normalize(images, SIGLIP_MEAN, SIGLIP_STD, jnp.dtype(config.siglip.dtype))
  _, siglip_out = module.siglip(siglip_in)
  return siglip_out["encoded"]


LAYOUT = StudentLayout(
    arch="paligemma", visual_start=0, prefix_lm=True, first_position=1, check=_check,
    projector=_projector, vision_features=_vision_features,
    loaders={"hf": "vla_jax.weights.vla:load_hf_paligemma",
             "big_vision": "vla_jax.weights.vla:load_big_vision_paligemma"})
