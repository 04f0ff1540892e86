"""The frozen vision teacher: patch features on the student's visual-token grid.

Alignment compares the student's hidden state at visual token j with the teacher's
feature of the same image patch j, so the teacher must see the same (augmented) image
and produce the same grid. `Teacher` wraps the tower of any registered family
(`vla_jax.models.teachers`: SigLIP with big_vision names, DINOv2, C-RADIO, DINOv3,
SigLIP 2) and returns its final-layer (or chosen-layer) patch tokens, either by resizing
the input so that its patch grid equals the student's (`grid_match="resize_input"`, the
paper's choice) or by bilinearly resampling its native patch grid
(`"resample_features"`); the choice is `AlignConfig.grid_match`. What differs between
towers (pixel normalisation, prefix tokens to drop, loaders) is the family's, never a
branch here. Its parameters live outside the train state and are never optimised;
callers wrap its output in `jax.lax.stop_gradient`.
"""

import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import align as align_lib
from vla_jax.models import teachers
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.typed_config import require

KINDS = tuple(teachers.FAMILIES)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Which tower, which of its layers.

  In an experiment config the tower sits under its family's key (`teacher.vit` for
  SigLIP, `teacher.dino` for DINOv2, `teacher.radio` for C-RADIO, `teacher.dinov3`,
  `teacher.siglip2`); `to_mapping` and `experiment.parse_teacher` convert between that
  layout and this one.

  Attributes:
    kind: a registered family (`KINDS`): "siglip", "dinov2", "radio", "dinov3", "siglip2".
    tower: that family's config (`ViTConfig`, `DinoV2Config`, `RadioConfig`,
      `DinoV3Config`, `Siglip2Config`).
    layer: block whose output is used; None = the final output ("encoded").
  """
  kind: str = "siglip"
  tower: Any = None
  layer: Optional[int] = None

  def __post_init__(self):
    family = teachers.family(self.kind)
    require(self.tower is not None,
            f"teacher.kind={self.kind!r} needs teacher.{family.key} to be set.")
    require(isinstance(self.tower, family.config_class),
            f"teacher.kind={self.kind!r} needs teacher.{family.key} to be a "
            f"{family.config_class.__name__}, found {type(self.tower).__name__}.")
    if self.layer is not None:
      require(0 <= self.layer < self.tower.depth,
              f"teacher.layer={self.layer} is outside [0, {self.tower.depth}) for this tower.")

  @property
  def family(self) -> TeacherFamily:
    return teachers.family(self.kind)

  @property
  def width(self) -> int:
    return self.tower.width

  # The per-family names of the configs before the registry, kept for their readers.
  @property
  def vit(self):
    """The SigLIP tower config, or None for another kind."""
    return self.tower if self.family.key == "vit" else None

  @property
  def dino(self):
    """The DINOv2 tower config, or None for another kind."""
    return self.tower if self.family.key == "dino" else None

  def to_mapping(self) -> Dict[str, Any]:
    """{kind, <family key>: {...}, layer}: the experiment-config layout `parse_teacher`
    reads (what checkpoints and conversions record)."""
    return {"kind": self.kind, self.family.key: dataclasses.asdict(self.tower),
            "layer": self.layer}


class Teacher(nn.Module):
  """Frozen vision tower returning patch features aligned with the student's grid.

  Parameters live under `tower` with the wrapped model's own names (big_vision names
  for SigLIP), so published checkpoints load unchanged.
  """
  config: TeacherConfig

  def setup(self):
    self.tower = self.config.family.module(self.config.tower)

  def __call__(self, images, student_grid: int, grid_match: str = "resize_input"):
    """Teacher patch features for the student's grid.

    Args:
      images: [B, H, W, 3] floats in [0, 1] (the student's input after augmentation).
      student_grid: patches per side of the student's visual-token grid.
      grid_match: `AlignConfig.grid_match`: "resize_input" or "resample_features".
    Returns:
      [B, student_grid**2, D_teacher] float32 features.
    """
    cfg = self.config
    family, tower = cfg.family, cfg.tower
    if images.ndim != 4 or images.shape[-1] != 3:
      raise InputError(f"teacher images must be [B, H, W, 3]; got {tuple(images.shape)}.")
    if jnp.issubdtype(images.dtype, jnp.integer):
      images = images.astype(jnp.float32) / 255.0
    if grid_match == "resize_input":
      size = align_lib.teacher_input_size(student_grid, tower.patch_size)
      if size != tower.image_size:
        raise InputError(
            f"The teacher must see {size} px to give the student's {student_grid}x"
            f"{student_grid} grid with patch {tower.patch_size}, but it is configured for "
            f"{tower.image_size} px. Set teacher image_size={size} (position embeddings are "
            "resampled at load time) or set align.grid_match='resample_features'.")
    else:
      size = tower.image_size
    if images.shape[1:3] != (size, size):
      images = align_lib.resize_images(images.astype(jnp.float32), size)
    mean, std = family.pixel_norm(tower)
    x = (images - jnp.asarray(mean)) / jnp.asarray(std)
    _, out = self.tower(x.astype(jnp.dtype(tower.dtype)))
    features = out["encoded"] if cfg.layer is None else out[f"block{cfg.layer:02d}"]
    features = features[:, family.num_prefix_tokens(tower):].astype(jnp.float32)
    return align_lib.match_teacher_grid(features, student_grid * student_grid, grid_match)


def preset_names() -> Dict[str, str]:
  """{preset name: family kind} over every registered family."""
  return {name: f.kind for f in teachers.FAMILIES.values() for name in f.presets}


def teacher_config(name: str, student_grid: int = 16) -> TeacherConfig:
  """A named teacher sized to give `student_grid` x `student_grid` patch features.

  Names (each family's `presets`): "siglip_so400m" (So400m/14), "siglip_b16" (B/16),
  "siglip_l16" (L/16), "dinov2_l14" (L/14), "dinov2_b14" (B/14), "c_radio_v3_b",
  "c_radio_v3_l", "c_radio_v3_h" (C-RADIOv3, patch 16), "dinov3_vitb16", "dinov3_vitl16",
  "siglip2_b16", "siglip2_l16", "siglip2_so400m16" (SigLIP 2 NaFlex), and "tiny_siglip",
  "tiny_dinov2", "tiny_radio", "tiny_dinov3", "tiny_siglip2" (CPU tests).
  """
  kinds = preset_names()
  if name not in kinds:
    raise ConfigError(f"Unknown teacher preset {name!r}; known: {', '.join(kinds)}.")
  family = teachers.family(kinds[name])
  return TeacherConfig(kind=family.kind, tower=family.presets[name](student_grid))
