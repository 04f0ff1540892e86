"""OpenVLA (Prismatic): fused DINOv2 + SigLIP towers -> MLP projector -> Llama, causal.

DINOv2 ViT-L/14 (4 registers) and SigLIP So400m/14 read the same image; each contributes
the patch tokens of its second-to-last block (the towers are built with one block fewer
than their checkpoints), concatenated per patch ([DINOv2, SigLIP]); a 3-layer GELU MLP
projects them to the LLM width (a 2-layer one for SigLIP-only Prismatic models without
`dino`). The visual tokens sit right after BOS, `[BOS, v_1..v_N, text...]`; plain causal
attention, positions from 0. Loads from HF (`weights.vla.load_hf_openvla`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.models import dinov2 as dinov2_lib
from vla_jax.models.students.layout import (IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN,
                                            SIGLIP_STD, StudentLayout, normalize)


class OpenVLAProjector(nn.Module):
  """Prismatic's fused-backbone projector: fc1 -> GELU -> fc2 -> GELU -> fc3 (exact GELU)."""
  vision_width: int
  llm_width: int
  fused: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, N, vision_width] -> [B, N, llm_width]."""
    if self.fused:
      x = nn.Dense(4 * self.vision_width, dtype=self.dtype, name="fc1")(x)
      x = nn.gelu(x, approximate=False)
      x = nn.Dense(self.llm_width, dtype=self.dtype, name="fc2")(x)
      x = nn.gelu(x, approximate=False)
      return nn.Dense(self.llm_width, dtype=self.dtype, name="fc3")(x)
    x = nn.Dense(self.llm_width, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.llm_width, dtype=self.dtype, name="fc2")(x)


def _check(config) -> None:
  del config  # any Llama or Gemma LLM, with or without the DINOv2 tower


def _projector(config) -> nn.Module:
  return OpenVLAProjector(config.vision_width, config.llm.width, fused=config.dino is not None,
                          dtype=jnp.dtype(config.llm.dtype))


def _vision_features(module, config, images):
  """[B, N, dino width + siglip width]: the second-to-last blocks' patch tokens."""
  siglip_in = normalize(images, SIGLIP_MEAN, SIGLIP_STD, jnp.dtype(config.siglip.dtype))
  _, siglip_out = module.siglip(siglip_in)
  # Prismatic reads the second-to-last block; the tower is built without the last one.
  features = siglip_out[f"block{config.siglip.depth - 1:02d}"]
  if module.dino is None:
    return features
  dino_in = normalize(images, IMAGENET_MEAN, IMAGENET_STD, jnp.dtype(config.dino.dtype))
  _, dino_out = module.dino(dino_in)
  prefix = dinov2_lib.DinoV2.num_prefix_tokens(config.dino)
  dino_patches = dino_out[f"block{config.dino.depth - 1:02d}"][:, prefix:]
  return jnp.concatenate([dino_patches.astype(features.dtype), features], axis=-1)


LAYOUT = StudentLayout(
    arch="openvla", visual_start=1, prefix_lm=False, first_position=0, check=_check,
    projector=_projector, vision_features=_vision_features,
    loaders={"hf": "vla_jax.weights.vla:load_hf_openvla"})
