"""The DINOv2 teacher family: `models.dinov2.DinoV2` (with or without registers).

Pixels are normalised with ImageNet's mean / std; the CLS token and the registers
precede the patch tokens and are dropped. Checkpoints load from a HF `Dinov2Model` /
`Dinov2WithRegistersModel` directory (`vla_jax.weights.dinov2`).
"""

from vla_jax.models import align as align_lib
from vla_jax.models import dinov2 as dinov2_lib
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.models.vla import IMAGENET_MEAN, IMAGENET_STD
from vla_jax.weights import dinov2 as dinov2_weights


def _preset(variant: str, **overrides):
  """A builder: student grid -> the `variant` tower seeing that grid."""
  def build(student_grid: int) -> dinov2_lib.DinoV2Config:
    patch = overrides.get("patch_size") or 14
    size = align_lib.teacher_input_size(student_grid, patch)
    return dinov2_lib.dinov2_config(variant, image_size=size, **overrides)
  return build


FAMILY = TeacherFamily(
    kind="dinov2", key="dino", config_class=dinov2_lib.DinoV2Config, config_prefix="dinov2",
    module=dinov2_lib.DinoV2,
    pixel_norm=lambda config: (IMAGENET_MEAN, IMAGENET_STD),
    num_prefix_tokens=dinov2_lib.DinoV2.num_prefix_tokens,
    loaders={"hf": dinov2_weights.load_hf_dinov2},
    presets={
        "dinov2_l14": _preset("L/14"),
        "dinov2_b14": _preset("B/14"),
        "tiny_dinov2": _preset("mu/14", patch_size=8),  # CPU tests
    },
    default_preset="dinov2_l14", tiny_preset="tiny_dinov2")
