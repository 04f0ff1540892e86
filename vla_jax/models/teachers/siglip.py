"""The SigLIP teacher family: `models.vit.ViT` with big_vision parameter names.

Pixels are normalised to [-1, 1]; there is no prefix token (`pool_type="none"`, the
patch tokens are the whole sequence). Checkpoints load from big_vision `.npz` (the
SigLIP releases and PaliGemma's `img` tower) or a HF `SiglipVisionModel` /
`SiglipModel` directory (`vla_jax.weights.siglip`).
"""

from vla_jax.models import align as align_lib
from vla_jax.models import vit as vit_lib
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.models.vla import SIGLIP_MEAN, SIGLIP_STD
from vla_jax.weights import siglip as siglip_weights


def _preset(variant: str, **overrides):
  """A builder: student grid -> the `variant` tower seeing that grid (no pooling head)."""
  def build(student_grid: int) -> vit_lib.ViTConfig:
    patch = overrides.get("patch_size") or vit_lib.VIT_VARIANTS[variant]["patch_size"]
    size = align_lib.teacher_input_size(student_grid, patch)
    return vit_lib.vit_config(variant, pool_type="none", image_size=size, **overrides)
  return build


FAMILY = TeacherFamily(
    kind="siglip", key="vit", config_class=vit_lib.ViTConfig, config_prefix="vit",
    module=vit_lib.ViT,
    pixel_norm=lambda config: (SIGLIP_MEAN, SIGLIP_STD),
    num_prefix_tokens=lambda config: 0,
    loaders={"big_vision": siglip_weights.load_big_vision, "hf": siglip_weights.load_hf_siglip},
    presets={
        "siglip_so400m": _preset("So400m/14"),
        "siglip_b16": _preset("B/16"),
        "siglip_l16": _preset("L/16"),
        "tiny_siglip": _preset("mu/16", patch_size=8, num_heads=4),  # CPU tests
    },
    default_preset="siglip_so400m", tiny_preset="tiny_siglip")
