"""VLA students: vision tower(s) -> projector -> decoder LLM, with explicit visual tokens.

What differs between architectures is a `StudentLayout` in the registry
`vla_jax.models.students` (`model.arch`): where the visual tokens sit, causal or
prefix-LM attention, the first RoPE position, the projector, which tower outputs feed it,
and the checkpoint loaders. Two published layouts are registered:

* `openvla` (Prismatic, `students/openvla.py`): DINOv2 ViT-L/14 (4 registers) and SigLIP
  So400m/14 towers read the same 224 px image; each contributes the patch tokens of its
  second-to-last block (so the towers are built with one block fewer than their
  checkpoints), concatenated per patch; a 3-layer GELU MLP projects them to the LLM
  width; the visual tokens sit right after BOS: `[BOS, v_1..v_N, text...]`; plain causal
  attention.
* `paligemma` (`students/paligemma.py`): SigLIP So400m/14 (last block, final norm) -> one
  linear projection -> Gemma; image tokens first: `[v_1..v_N, BOS, prefix..., suffix...]`;
  prefix-LM mask (image + prefix attend bidirectionally, the suffix causally); positions
  start at 1.

`VLA.__call__` returns the logits over the full sequence, the residual stream of the
LLM at `align_layer` (or at each of several layers) restricted to the visual tokens (for
alignment, captured in the same forward pass), and the positions of the visual tokens.
Images come in as `[B, H, W, 3]` floats in [0, 1] (or uint8); each tower applies its
own pixel normalisation (in the layout), so training, evaluation and serving cannot
disagree on it.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import dinov2 as dinov2_lib
from vla_jax.models import llm as llm_lib
from vla_jax.models import students
from vla_jax.models import vit as vit_lib
# The towers' pixel statistics, importable from here as before (the teachers use them).
from vla_jax.models.students.layout import (IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                                            SIGLIP_MEAN, SIGLIP_STD)
from vla_jax.typed_config import from_mapping, require


@dataclasses.dataclass(frozen=True)
class VLAConfig:
  """A VLA student: which layout, and the configs of its parts.

  Attributes:
    arch: a registered student layout, "openvla" or "paligemma" (`models.students`).
    llm: the decoder LM.
    siglip: the SigLIP tower (both layouts).
    dino: OpenVLA's fused DINOv2 tower; None gives a SigLIP-only Prismatic model.
    image_size: input resolution in pixels; both towers must see the same patch grid.
  """
  arch: str
  llm: llm_lib.LLMConfig
  siglip: vit_lib.ViTConfig
  dino: Optional[dinov2_lib.DinoV2Config] = None
  image_size: int = 224

  def __post_init__(self):
    layout = students.layout(self.arch)
    require(self.siglip.image_size == self.image_size,
            f"model.siglip.image_size={self.siglip.image_size} but model.image_size="
            f"{self.image_size}; set them equal.")
    layout.check(self)
    if self.dino is not None:
      require(self.dino.image_size == self.image_size,
              f"model.dino.image_size={self.dino.image_size} but model.image_size="
              f"{self.image_size}; set them equal.")
      require(self.dino.image_size // self.dino.patch_size
              == self.siglip.image_size // self.siglip.patch_size,
              "the DINOv2 and SigLIP towers must produce the same patch grid; got "
              f"{self.dino.image_size // self.dino.patch_size} vs "
              f"{self.siglip.image_size // self.siglip.patch_size} patches per side.")

  @property
  def grid(self) -> int:
    """Patches per side of the visual-token grid."""
    return self.image_size // self.siglip.patch_size

  @property
  def num_visual_tokens(self) -> int:
    return self.grid * self.grid

  @property
  def layout(self) -> students.StudentLayout:
    """The registered layout of `arch`."""
    return students.layout(self.arch)

  @property
  def visual_start(self) -> int:
    """Sequence index of the first visual token (1 = after BOS for OpenVLA)."""
    return self.layout.visual_start

  @property
  def vision_width(self) -> int:
    return self.siglip.width + (self.dino.width if self.dino is not None else 0)


def vla_config_from_mapping(mapping) -> VLAConfig:
  """Builds a VLAConfig from a nested mapping {arch, image_size, llm: {...}, siglip:..., dino:...}."""
  mapping = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
  allowed = {f.name for f in dataclasses.fields(VLAConfig)}
  unknown = sorted(set(mapping) - allowed)
  if unknown:
    raise ConfigError(f"Unknown config key(s) model.{', model.'.join(unknown)}; valid keys: "
                      f"{', '.join(sorted(allowed))}.")
  parts = dict(
      llm=from_mapping(llm_lib.LLMConfig, mapping.pop("llm", None), "model.llm"),
      siglip=from_mapping(vit_lib.ViTConfig, mapping.pop("siglip", None), "model.siglip"))
  dino = mapping.pop("dino", None)
  parts["dino"] = None if dino is None else from_mapping(dinov2_lib.DinoV2Config, dino,
                                                         "model.dino")
  return VLAConfig(**mapping, **parts)


def insert_visual(config: VLAConfig, text: jax.Array, visual: jax.Array) -> jax.Array:
  """`text` [B, T, ...] with `visual` [B, N, ...] inserted at `config.visual_start` (after
  BOS for OpenVLA, before the text for PaliGemma); embeddings and masks alike."""
  start = config.visual_start
  return jnp.concatenate([text[:, :start], visual, text[:, start:]], axis=1)


def sequence_layout(config: VLAConfig, input_mask: jax.Array,
                    prefix_mask: Optional[jax.Array] = None
                    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Where the visual tokens go, and what attends to what, for a layout.

  Args:
    config: the student's config (its layout decides: `StudentLayout.visual_start`,
      `prefix_lm`, `first_position`).
    input_mask: [B, T] bool, True at real text tokens.
    prefix_mask: PaliGemma only, [B, T] bool: text tokens in the bidirectional prefix
      (None = every real text token, i.e. the whole prompt when decoding).
  Returns:
    (mask [B, S] bool, attn_mask [B, S, S] bool, positions [B, S] int32), S = T + N:
    OpenVLA puts the N visual tokens after BOS and is causal; PaliGemma puts them first,
    in a prefix-LM with the prefix text, and counts positions from 1. `VLA.embed_inputs`
    runs the LLM on exactly these; `eval.attention` rebuilds attention from them.
  """
  layout = config.layout
  input_mask = input_mask.astype(jnp.bool_)
  ones = jnp.ones((input_mask.shape[0], config.num_visual_tokens), jnp.bool_)
  mask = insert_visual(config, input_mask, ones)
  positions = llm_lib.positions_from_mask(mask) + layout.first_position
  if not layout.prefix_lm:
    return mask, llm_lib.causal_mask(mask), positions
  if prefix_mask is None:
    prefix_mask = input_mask
  prefix = insert_visual(config, prefix_mask.astype(jnp.bool_), ones)
  return mask, llm_lib.prefix_lm_mask(mask, prefix), positions


class VLA(nn.Module):
  """A vision-language-action student of any registered layout (OpenVLA, PaliGemma).

  Parameters: `siglip` (ViT, big_vision names), `dino` (OpenVLA only), `projector`
  (`fc1..fc3` for OpenVLA, `linear` for PaliGemma), `llm`.
  """
  config: VLAConfig

  def setup(self):
    cfg = self.config
    self.siglip = vit_lib.ViT(cfg.siglip)
    self.dino = dinov2_lib.DinoV2(cfg.dino) if cfg.dino is not None else None
    self.projector = cfg.layout.projector(cfg)
    self.llm = llm_lib.LLM(cfg.llm)

  def _check_images(self, images):
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise InputError(f"images must be [batch, height, width, 3] RGB; got shape "
                       f"{tuple(images.shape)}. Convert grayscale/RGBA images to RGB.")
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise InputError(
          f"images are {images.shape[1]}x{images.shape[2]} px but the model expects "
          f"{cfg.image_size}x{cfg.image_size}. Resize them in the input pipeline, or build "
          "the model with model.image_size set to the data's resolution.")
    if jnp.issubdtype(images.dtype, jnp.integer):
      images = images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)

  def encode_images(self, images):
    """Visual tokens in LLM space.

    Args:
      images: [B, H, W, 3], floats in [0, 1] or uint8.
    Returns:
      [B, N, llm_width] projected visual tokens, N = config.num_visual_tokens.
    """
    cfg = self.config
    images = self._check_images(images)
    return self.projector(cfg.layout.vision_features(self, cfg, images))

  def embed_inputs(self, images, tokens, input_mask=None, prefix_mask=None
                   ) -> Dict[str, Any]:
    """The LLM's input sequence: visual and text embeddings in the layout's order.

    Args: as `__call__`.
    Returns:
      dict with "embeddings" [B, S, D] (S = T + N), "input_mask" [B, S] bool,
      "attn_mask" [B, S, S] bool (causal, or prefix-LM for PaliGemma) and "positions"
      [B, S] int32 RoPE positions. `__call__` runs the LLM on exactly these; decoding
      (`vla_jax.models.decode`) prefills its KV cache with them.
    """
    cfg = self.config
    if tokens.ndim != 2:
      raise InputError(f"tokens must be [batch, length] int ids; got shape {tokens.shape}.")
    if tokens.shape[0] != images.shape[0]:
      raise InputError(f"images have batch {images.shape[0]} but tokens have batch "
                       f"{tokens.shape[0]}; they must match.")
    if input_mask is None:
      input_mask = jnp.ones(tokens.shape, jnp.bool_)
    visual = self.encode_images(images)
    text = self.llm.embed(tokens)
    embeddings = insert_visual(cfg, text, visual.astype(text.dtype))
    mask, attn_mask, positions = sequence_layout(cfg, input_mask, prefix_mask)
    return {"embeddings": embeddings, "input_mask": mask, "attn_mask": attn_mask,
            "positions": positions}

  def __call__(self, images, tokens, input_mask=None, *, prefix_mask=None,
               align_layer: Optional[Union[int, Tuple[int, ...]]] = None,
               return_all_hidden: bool = False) -> Dict[str, Any]:
    """Forward pass over images and text.

    Args:
      images: [B, H, W, 3] in [0, 1] (or uint8).
      tokens: [B, T] int32 text tokens, starting with BOS (no image placeholders).
      input_mask: [B, T] bool, True at real (non-padding) tokens; None = all real.
      prefix_mask: [B, T] bool, PaliGemma only: True at prefix tokens (bidirectional);
        None = the whole text is prefix, which is right for a prompt alone (decoding)
        but lets supervised targets see themselves: training and teacher-forced
        evaluation pass `vla_jax.train.step.supervised_prefix_mask` (through
        `step.student_forward`).
      align_layer: capture the LLM residual stream after this many blocks (HF
        `hidden_states[k]` convention) at the visual positions; a tuple captures each
        of several layers (`AlignConfig.align_layers`); None = no capture.
      return_all_hidden: also return every layer's hidden states (analysis only).
    Returns:
      dict with "logits" [B, S, V] (S = T + N), "align_hidden" [B, N, D] (if
      align_layer is set; a tuple of them, in its order, if align_layer is a tuple),
      "visual_positions" [N] int32, "input_mask" [B, S] and
      "final_hidden" [B, S, D] (and "hidden" if requested).
    """
    cfg = self.config
    n = cfg.num_visual_tokens
    inputs = self.embed_inputs(images, tokens, input_mask, prefix_mask)
    logits, llm_out = self.llm(
        inputs["embeddings"], attn_mask=inputs["attn_mask"], positions=inputs["positions"],
        capture_layer=align_layer, capture_slice=(cfg.visual_start, n),
        return_all_hidden=return_all_hidden)
    result = {
        "logits": logits,
        "visual_positions": jnp.arange(cfg.visual_start, cfg.visual_start + n, dtype=jnp.int32),
        "input_mask": inputs["input_mask"],
        "final_hidden": llm_out["final_hidden"],
    }
    if align_layer is not None:
      result["align_hidden"] = llm_out["captured"]
    if return_all_hidden:
      result["hidden"] = llm_out["hidden"]
    return result


def dummy_inputs(config: VLAConfig, batch: int = 1, length: int = 8) -> Tuple[Any, Any]:
  """Zero images and BOS-led tokens with the right shapes (for `init` / `eval_shape`)."""
  images = jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.float32)
  tokens = jnp.ones((batch, length), jnp.int32)
  return images, tokens


def _openvla_towers(image_size: int, siglip: dict, dino: dict):
  """OpenVLA's towers: timm layouts (exact GELU), truncated after the second-to-last block."""
  return (
      vit_lib.ViTConfig(**{**dict(pool_type="none", gelu_approximate=False, final_norm=False,
                                  image_size=image_size), **siglip}),
      dinov2_lib.DinoV2Config(**{**dict(num_registers=4, posemb_covers_cls=False,
                                        final_norm=False, image_size=image_size), **dino}))


def _preset(name: str) -> VLAConfig:
  if name == "openvla_7b":
    # Checkpoint towers have 27 (SigLIP So400m) and 24 (DINOv2-L) blocks; keep all but one.
    siglip, dino = _openvla_towers(
        224, dict(width=1152, depth=26, mlp_dim=4304, num_heads=16, patch_size=14),
        dict(width=1024, depth=23, num_heads=16, patch_size=14))
    return VLAConfig("openvla", llm_lib.llm_config("openvla_llama2_7b"), siglip, dino, 224)
  if name == "paligemma_3b":
    siglip = vit_lib.ViTConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14,
                               image_size=224, pool_type="none")
    return VLAConfig("paligemma", llm_lib.llm_config("gemma_2b"), siglip, None, 224)
  if name == "tiny":
    # OpenVLA's layout at CPU size: 64 px images, 8x8 visual tokens, a 4-block Llama
    # whose vocabulary fits the bundled tokenizer (512 text + 256 action ids) + <PAD>,
    # padded to a multiple of 64 (832).
    siglip, dino = _openvla_towers(
        64, dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8),
        dict(width=64, depth=2, num_heads=4, patch_size=8))
    llm = llm_lib.llm_config("tiny_llama", vocab_size=832, width=128, depth=4, num_heads=4,
                             num_kv_heads=2, mlp_dim=256)
    return VLAConfig("openvla", llm, siglip, dino, 64)
  if name == "tiny_paligemma":
    siglip = vit_lib.ViTConfig(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8,
                               image_size=64, pool_type="none")
    llm = llm_lib.llm_config("tiny_gemma", vocab_size=832, width=128, depth=4)
    return VLAConfig("paligemma", llm, siglip, None, 64)
  raise ConfigError(f"Unknown VLA preset {name!r}; known presets: {', '.join(VLA_PRESETS)}.")


VLA_PRESETS = ("tiny", "tiny_paligemma", "openvla_7b", "paligemma_3b")


def vla_config(name: str = "tiny") -> VLAConfig:
  """A named student preset: "tiny" (CPU demo/tests), "tiny_paligemma", "openvla_7b",
  "paligemma_3b"."""
  return _preset(name)

