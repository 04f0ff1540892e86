"""The frozen vision teacher: patch features on the student's visual-token grid.

Alignment compares the student's hidden state at visual token j with the teacher's
feature of the same image patch j, so the teacher must see the same (augmented) image
and produce the same grid. `Teacher` wraps a SigLIP (`vit.ViT`, big_vision names) or a
DINOv2 tower and returns its final-layer (or chosen-layer) patch tokens, either by
resizing the input so that its patch grid equals the student's (`grid_match=
"resize_input"`, the paper's choice) or by bilinearly resampling its native patch grid
(`"resample_features"`); the choice is `AlignConfig.grid_match`. Its parameters live
outside the train state and are never optimised; callers wrap its output in
`jax.lax.stop_gradient`.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import align as align_lib
from vla_jax.models import dinov2 as dinov2_lib
from vla_jax.models import vit as vit_lib
from vla_jax.models.vla import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from vla_jax.typed_config import require

KINDS = ("siglip", "dinov2")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Which tower, which of its layers, and how its grid is matched to the student's.

  Attributes:
    kind: "siglip" or "dinov2".
    vit: the SigLIP tower config (kind="siglip").
    dino: the DINOv2 tower config (kind="dinov2").
    layer: block whose output is used; None = the final normalised output ("encoded").
  """
  kind: str = "siglip"
  vit: Optional[vit_lib.ViTConfig] = None
  dino: Optional[dinov2_lib.DinoV2Config] = None
  layer: Optional[int] = None

  def __post_init__(self):
    require(self.kind in KINDS, f"teacher.kind={self.kind!r}; expected one of {KINDS}.")
    tower = self.tower
    require(tower is not None, f"teacher.kind={self.kind!r} needs teacher."
            f"{'vit' if self.kind == 'siglip' else 'dino'} to be set.")
    if self.layer is not None:
      require(0 <= self.layer < tower.depth,
              f"teacher.layer={self.layer} is outside [0, {tower.depth}) for this tower.")

  @property
  def tower(self):
    return self.vit if self.kind == "siglip" else self.dino

  @property
  def width(self) -> int:
    return self.tower.width


class Teacher(nn.Module):
  """Frozen vision tower returning patch features aligned with the student's grid.

  Parameters live under `tower` with the wrapped model's own names (big_vision names
  for SigLIP), so published checkpoints load unchanged.
  """
  config: TeacherConfig

  def setup(self):
    cfg = self.config
    if cfg.kind == "siglip":
      self.tower = vit_lib.ViT(cfg.vit)
    else:
      self.tower = dinov2_lib.DinoV2(cfg.dino)

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
    tower = cfg.tower
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
    if cfg.kind == "siglip":
      x = (images - jnp.asarray(SIGLIP_MEAN)) / jnp.asarray(SIGLIP_STD)
      prefix = 0
    else:
      x = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
      prefix = dinov2_lib.DinoV2.num_prefix_tokens(cfg.dino)
    _, out = self.tower(x.astype(jnp.dtype(tower.dtype)))
    features = out["encoded"] if cfg.layer is None else out[f"block{cfg.layer:02d}"]
    features = features[:, prefix:].astype(jnp.float32)
    return align_lib.match_teacher_grid(features, student_grid * student_grid, grid_match)


def teacher_config(name: str, student_grid: int = 16) -> TeacherConfig:
  """A named teacher sized to give `student_grid` x `student_grid` patch features.

  Names: "siglip_so400m" (So400m/14), "siglip_b16" (B/16), "siglip_l16" (L/16),
  "dinov2_l14" (L/14), "dinov2_b14" (B/14), "tiny_siglip", "tiny_dinov2" (CPU tests).
  """
  specs = {
      "siglip_so400m": ("siglip", "So400m/14", {}),
      "siglip_b16": ("siglip", "B/16", {}),
      "siglip_l16": ("siglip", "L/16", {}),
      "dinov2_l14": ("dinov2", "L/14", {}),
      "dinov2_b14": ("dinov2", "B/14", {}),
      "tiny_siglip": ("siglip", "mu/16", dict(patch_size=8, num_heads=4)),
      "tiny_dinov2": ("dinov2", "mu/14", dict(patch_size=8)),
  }
  if name not in specs:
    raise ConfigError(f"Unknown teacher preset {name!r}; known: {', '.join(specs)}.")
  kind, variant, overrides = specs[name]
  patch = overrides.get("patch_size") or (
      vit_lib.VIT_VARIANTS[variant]["patch_size"] if kind == "siglip" else 14)
  size = align_lib.teacher_input_size(student_grid, patch)
  if kind == "siglip":
    vit = vit_lib.vit_config(variant, pool_type="none", image_size=size, **overrides)
    return TeacherConfig(kind="siglip", vit=vit)
  dino = dinov2_lib.dinov2_config(variant, image_size=size, **overrides)
  return TeacherConfig(kind="dinov2", dino=dino)
