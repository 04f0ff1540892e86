"""SigLIP 2 (NaFlex) as a teacher: config, flax model, loader and presets (transformers `siglip2`).

SigLIP 2's NaFlex vision tower (transformers `Siglip2VisionModel`, the vision half of
`Siglip2Model`) differs from SigLIP's where it matters for loading a checkpoint:

- patches are flattened (row, column, channel), channel fastest, and embedded by a
  Linear over those `p * p * C` values (`patch_embed`, with bias); no convolution;
- one learned position-embedding table for a fixed `M x M` grid (`num_patches = M * M`,
  256 in the releases) is resized to the image's patch grid at EVERY call, as
  transformers does: separable bilinear weights with antialiasing, the weights of
  `F.interpolate(mode="bilinear", align_corners=False, antialias=True)` (a triangle
  filter widened by the scale factor when shrinking; plain bilinear, clamped at the
  edges, when growing). We keep the checkpoint's table and resize in the forward pass
  with the same weights (`posemb_resize_weights`), so the function is transformers'
  at any `image_size` and the parameter does not depend on the resolution;
- the attention mask over padded patches is all-valid here: we feed fixed square
  images whose patches fill the sequence, so no padding exists;
- pre-norm blocks (LayerNorm, attention with q/k/v/out biases, GELU MLP: tanh-approximated
  `gelu_pytorch_tanh` in the releases), then `post_layernorm`: the patch features.
  The attention-pooling head (`vision_use_head`) is not implemented and not loaded:
  the patch features do not depend on it;
- pixels are normalised to [-1, 1] (mean = std = 0.5); no prefix tokens.

Parameter names (ours; `load_hf_siglip2` maps both checkpoint layouts onto them):
  patch_embed/{kernel [p*p*C, D], bias [D]}   (a Dense over flattened patches)
  pos_embedding [1, M*M, D]                   (the checkpoint's table, M = posemb_grid)
  blocks_{i}/... (looped) or blocks/... with a leading [depth] axis (scanned):
    norm1/{scale,bias}; attn/{query,key,value}/{kernel [D,H,hd], bias [H,hd]};
    attn/out/{kernel [H,hd,D], bias}; norm2/{scale,bias}; mlp/fc1, mlp/fc2
  norm/{scale,bias}                           (post_layernorm)

The fixed-resolution SigLIP 2 releases (e.g. `siglip2-so400m-patch14-384`) are, to our
knowledge, published as transformers `siglip` checkpoints (SigLIP's architecture): load
those with `teacher.kind=siglip`; this loader refuses them by `model_type`.
"""

import dataclasses
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vla_jax.errors import CheckpointError, InputError
from vla_jax.models import align as align_lib
from vla_jax.models.constraints import shard_batch_axis
from vla_jax.models.dinov2 import Attention
from vla_jax.models.patch_embed import patchify
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.models.vla import SIGLIP_MEAN, SIGLIP_STD
from vla_jax.typed_config import (from_mapping, require, require_patch_geometry,
                                   require_tower_settings)
from vla_jax.weights import hf_config
from vla_jax.weights.mapping import Rule, identity, linear, load_params, stacked
from vla_jax.weights.safetensors import open_safetensors


# ---------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Siglip2Config:
  """Hyper-parameters of a SigLIP 2 NaFlex vision tower; `siglip2_config` has the sizes.

  Attributes:
    width, depth, num_heads: token width, blocks, attention heads.
    mlp_dim: the MLP's hidden width (transformers' `intermediate_size`); None = 4 * width.
    patch_size: patch side in pixels (16 in the NaFlex releases).
    image_size: the square input side we run at; its patch grid is `image_size /
      patch_size` (the position table is resized to it in the forward pass).
    channels: input channels.
    posemb_grid: side M of the checkpoint's position-embedding table (transformers'
      `num_patches = M * M`; 16 in the releases).
    gelu_approximate: tanh-approximated GELU (`gelu_pytorch_tanh`, the releases) or exact.
    layernorm_eps: epsilon of every LayerNorm.
    scan, remat, dtype: as for the other towers (dtype: the compute dtype of matmuls;
      params, LayerNorm and softmax stay float32).
  """
  width: int = 1152
  depth: int = 27
  num_heads: int = 16
  mlp_dim: Optional[int] = 4304
  patch_size: int = 16
  image_size: int = 256
  channels: int = 3
  posemb_grid: int = 16
  gelu_approximate: bool = True
  layernorm_eps: float = 1e-6
  scan: bool = False
  remat: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    require_patch_geometry(self, "siglip2")
    require(isinstance(self.posemb_grid, int) and not isinstance(self.posemb_grid, bool)
            and self.posemb_grid > 0,
            f"siglip2.posemb_grid must be a positive integer (the side of the checkpoint's "
            f"position table, sqrt(num_patches)), found {self.posemb_grid!r}.")
    require_tower_settings(self, "siglip2", ("gelu_approximate", "scan", "remat"))

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim or 4 * self.width

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2


# The NaFlex releases' sizes (transformers' Siglip2VisionConfig defaults are B/16); each
# has a 16 x 16 position table (num_patches 256). L/16 has SigLIP 2's ViT-L sizes: its
# releases are fixed-resolution, so this NaFlex preset is for towers trained as such.
_PRESETS: Dict[str, Dict[str, Any]] = {
    "mu/16": dict(width=32, depth=2, num_heads=4, mlp_dim=64, posemb_grid=4),
    "B/16": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L/16": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "So400m/16": dict(width=1152, depth=27, num_heads=16, mlp_dim=4304),
}


def siglip2_config(variant: str, **overrides: Any) -> Siglip2Config:
  """The SigLIP 2 size `variant` ("B/16", "L/16", "So400m/16", "mu/16") with `overrides`."""
  require(variant in _PRESETS, f"Unknown SigLIP 2 variant {variant!r}; expected one of "
          f"{sorted(_PRESETS)}, or build Siglip2Config directly.")
  return from_mapping(Siglip2Config, {**_PRESETS[variant], **overrides}, where="siglip2")


def _preset(variant: str, **overrides: Any):
  """A builder: student grid -> the `variant` tower seeing that grid."""
  def build(student_grid: int) -> Siglip2Config:
    size = align_lib.teacher_input_size(student_grid, overrides.get("patch_size") or 16)
    return siglip2_config(variant, image_size=size, **overrides)
  return build


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def posemb_resize_weights(table_side: int, grid_side: int) -> np.ndarray:
  """[grid_side, table_side] weights resizing one axis of the position table, float32.

  Output cell i samples the table at (i + 0.5) * s - 0.5 (s = table_side / grid_side)
  with a triangle filter of half-width max(s, 1), normalised to sum to one: torch's
  bilinear interpolation with `align_corners=False, antialias=True`, as transformers'
  `Siglip2VisionEmbeddings.resize_positional_embeddings` computes it (float64 here).
  """
  scale = table_side / grid_side
  support = max(scale, 1.0)
  centre = (np.arange(grid_side, dtype=np.float64) + 0.5) * scale - 0.5
  source = np.arange(table_side, dtype=np.float64)
  weights = np.clip(1.0 - np.abs(source[None, :] - centre[:, None]) / support, 0.0, None)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_posemb(table: jax.Array, grid_side: int) -> jax.Array:
  """A position table [1, M*M, D] -> [1, grid_side**2, D] (float32; unchanged if equal)."""
  side = math.isqrt(table.shape[1])
  if side == grid_side:
    return table.astype(jnp.float32)
  weights = jnp.asarray(posemb_resize_weights(side, grid_side))
  grid = table.astype(jnp.float32).reshape(side, side, -1)
  out = jnp.einsum("yh,xw,hwd->yxd", weights, weights, grid,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, grid_side * grid_side, -1)


def _layer_norm(config: Siglip2Config, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layernorm_eps, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


class MLP(nn.Module):
  """fc1 -> GELU (tanh-approximated or exact) -> fc2."""
  config: Siglip2Config

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    config = self.config
    dtype = jnp.dtype(config.dtype)
    h = nn.Dense(config.mlp_width, dtype=dtype, param_dtype=jnp.float32, name="fc1")(x)
    h = nn.gelu(h, approximate=config.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=dtype, param_dtype=jnp.float32, name="fc2")(h)


class Block(nn.Module):
  """Pre-norm encoder layer (Siglip2EncoderLayer); returns (x, x) so it can be scanned."""
  config: Siglip2Config

  @nn.compact
  def __call__(self, x, _=None):  # x: [B, N, D]
    config = self.config
    dtype = jnp.dtype(config.dtype)
    y = _layer_norm(config, "norm1")(x).astype(dtype)
    x = x + Attention(config.num_heads, dtype, name="attn")(y)
    y = _layer_norm(config, "norm2")(x).astype(dtype)
    x = shard_batch_axis(x + MLP(config, name="mlp")(y))
    return x, x


class Siglip2(nn.Module):
  """SigLIP 2 NaFlex vision tower. `__call__(image [B,H,W,C] in [-1, 1]) -> (encoded, out)`.

  `out` holds "embedded" ([B,N,D] entering block 0), "block00".. ([B,N,D] after each
  block), "encoded" ([B,N,D] after `post_layernorm`: the patch features) and
  "patch_tokens" (the same: there are no prefix tokens), N = (image_size / patch)^2.
  """
  config: Siglip2Config

  @nn.compact
  def __call__(self, image, *, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del train  # no dropout at inference; the flag keeps the towers' common signature
    config = self.config
    want = (config.image_size, config.image_size, config.channels)
    if getattr(image, "ndim", 0) != 4 or tuple(image.shape[1:]) != want:
      raise InputError(f"Siglip2 expects images shaped [batch, {', '.join(map(str, want))}] "
                       f"(NHWC), found {tuple(getattr(image, 'shape', ()))}. Resize them or "
                       "set siglip2.image_size (the position table is resized to any grid).")
    if not jnp.issubdtype(image.dtype, jnp.floating):
      raise InputError(f"Siglip2 expects float images normalised to [-1, 1]; found dtype "
                       f"{image.dtype}.")
    dtype = jnp.dtype(config.dtype)
    patches = patchify(image.astype(dtype), config.patch_size)
    x = nn.Dense(config.width, dtype=dtype, param_dtype=jnp.float32, name="patch_embed")(
        patches)
    table = self.param("pos_embedding", nn.initializers.normal(config.width ** -0.5),
                       (1, config.posemb_grid ** 2, config.width), jnp.float32)
    out = {}
    x = out["embedded"] = x + resize_posemb(table, config.grid_size).astype(dtype)
    block = nn.remat(Block, prevent_cse=not config.scan) if config.remat else Block
    if config.scan:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=config.depth)
      x, per_block = blocks(config, name="blocks")(x, None)  # [depth, B, N, D]
      for i in range(config.depth):
        out[f"block{i:02d}"] = per_block[i]
    else:
      for i in range(config.depth):
        x, out[f"block{i:02d}"] = block(config, name=f"blocks_{i}")(x)
    x = out["encoded"] = out["patch_tokens"] = _layer_norm(config, "norm")(x)
    return x, out


def abstract_params(config: Siglip2Config) -> Dict[str, Any]:
  """The model's params as `jax.ShapeDtypeStruct`s (no memory, no compute)."""
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                               jnp.float32)
  return jax.eval_shape(Siglip2(config).init, jax.random.key(0), image)["params"]


# ---------------------------------------------------------------------------------------
# config.json: what we compute, and what we refuse
# ---------------------------------------------------------------------------------------
# transformers' Siglip2VisionConfig defaults, for fields a config.json omits.
SIGLIP2_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    vision_use_head=True, num_patches=256)
# Fields of any transformers config that do not change a vision encoder's function at
# inference (bookkeeping, output switches, generation and tokenizer settings).
_GENERIC = (
    "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "_attn_implementation_autoset", "id2label", "label2id", "problem_type", "return_dict",
    "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_word_embeddings",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "finetuning_task",
    "task_specific_params", "tokenizer_class", "prefix", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "model_type",
    "_attn_implementation", "cross_attention_hidden_size", "tie_encoder_decoder",
    # Generation settings: transformers 4.x wrote them into every full config dict.
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens")
# Vision fields that do not change the patch features: dropout (off in eval) and the
# pooling head (`vision_use_head`: its output is not a patch feature).
_VISION_INERT = _GENERIC + ("attention_dropout", "vision_use_head")
_VISION_CHECKED = ("hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_channels", "patch_size", "hidden_act",
                   "layer_norm_eps", "num_patches")
# A full Siglip2Model: its text tower and init scale do not touch the vision tower.
_MODEL_FIELDS = _GENERIC + ("text_config", "vision_config", "initializer_factor")
_VISION_TYPE = "siglip2_vision_model"


def vision_section(hf: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
  """The Siglip2 vision config inside a config.json: itself (a Siglip2VisionModel) or a
  Siglip2Model's `vision_config`; None for anything else."""
  if hf.get("model_type") == _VISION_TYPE:
    return hf
  if hf.get("model_type") == "siglip2" and isinstance(hf.get("vision_config"), Mapping):
    return hf["vision_config"]
  return None


def _posemb_side(num_patches: Any) -> Optional[int]:
  side = math.isqrt(num_patches) if isinstance(num_patches, int) and num_patches > 0 else 0
  return side if side and side * side == num_patches else None


def siglip2_config_problems(hf: Mapping[str, Any], config: Siglip2Config) -> List[str]:
  """Every setting of a transformers SigLIP 2 config.json (a Siglip2VisionModel's, or a
  Siglip2Model's with its `vision_config`) that `Siglip2(config)` does not compute.

  Not among them: the text tower, dropout, the pooling head and the fields in `_GENERIC`.
  A field transformers' Siglip2 configs do not have is refused: we cannot tell what it
  changes. The checkpoint's image size is no problem: the table is resized to any grid.
  """
  section = vision_section(hf)
  if section is None:
    check = hf_config.ConfigCheck(hf, "config.json")
    model_type = hf.get("model_type")
    fix = ("Load a fixed-resolution SigLIP 2 (a transformers 'siglip' checkpoint) with "
           "teacher.kind=siglip." if model_type in ("siglip", "siglip_vision_model") else
           "Use a transformers Siglip2VisionModel / Siglip2Model checkpoint.")
    check.refuse("model_type", model_type, "SigLIP 2 NaFlex ('siglip2_vision_model', or "
                 "'siglip2' with a vision_config)", fix)
    return check.problems
  problems = []
  if section is not hf:  # a full Siglip2Model: its own fields first
    top = hf_config.ConfigCheck(hf, "config.json")
    for key in sorted(set(hf) - set(_MODEL_FIELDS)):
      top.refuse(key, hf[key], "transformers' Siglip2Config fields only (an unknown field "
                 "may change the function)", f"Remove {key!r} if it is inert, or use a "
                 "plain SigLIP 2 checkpoint.")
    problems = top.problems
  where = "config.json" if section is hf else "config.json vision_config"
  check = hf_config.ConfigCheck(section, where, SIGLIP2_VISION_DEFAULTS)
  for key in sorted(set(section) - set(_VISION_INERT) - set(_VISION_CHECKED)):
    check.refuse(key, section[key], "transformers' Siglip2VisionConfig fields only (an "
                 "unknown field may change the function)", f"Remove {key!r} if it is inert, "
                 "or use a plain SigLIP 2 checkpoint.")
  act = check.get("hidden_act")
  if act in hf_config.TANH_GELU or act == "gelu":
    check.equal("hidden_act", "siglip2.gelu_approximate", config.gelu_approximate,
                convert=lambda a: a != "gelu")
  else:
    check.refuse("hidden_act", act, "GELU, tanh-approximated ('gelu_pytorch_tanh', "
                 "siglip2.gelu_approximate=True) or exact ('gelu', False)",
                 "Use a checkpoint with one of those activations.")
  patch = check.get("patch_size")
  if not isinstance(patch, int) or isinstance(patch, bool):
    check.refuse("patch_size", patch, "one integer patch side (the patch embedding is a "
                 "Linear over p * p * C values)", "Use a checkpoint with an integer "
                 "patch_size.")
  else:
    check.equal("patch_size", "siglip2.patch_size", config.patch_size)
  side = _posemb_side(check.get("num_patches"))
  if side is None:
    check.refuse("num_patches", check.get("num_patches"), "a square position table "
                 "(num_patches = M * M)", "Use a checkpoint whose num_patches is a square.")
  elif side != config.posemb_grid:
    check.differs("num_patches", check.get("num_patches"), "siglip2.posemb_grid",
                  config.posemb_grid, f"Set siglip2.posemb_grid={side} (or build the config "
                  "with config_from_hf).")
  check.equal("layer_norm_eps", "siglip2.layernorm_eps", config.layernorm_eps, rtol=1e-3)
  for key, ours_name, ours in (("hidden_size", "siglip2.width", config.width),
                               ("intermediate_size", "siglip2.mlp_dim", config.mlp_width),
                               ("num_hidden_layers", "siglip2.depth", config.depth),
                               ("num_attention_heads", "siglip2.num_heads", config.num_heads),
                               ("num_channels", "siglip2.channels", config.channels)):
    check.equal(key, ours_name, ours)
  return problems + check.problems


def config_from_hf(path: str, image_size: Optional[int] = None, **overrides: Any
                   ) -> Siglip2Config:
  """The `Siglip2Config` of a transformers SigLIP 2 checkpoint directory.

  Args:
    path: a Siglip2VisionModel or Siglip2Model `save_pretrained` directory (or a file
      beside its config.json).
    image_size: the resolution to run at (default: the table's own grid, `sqrt(num_patches)
      * patch_size`, e.g. 256 px for the releases).
    overrides: our settings the checkpoint does not fix (scan, remat, dtype, ...).
  """
  hf, where = hf_config.read_config(path)
  section = vision_section(hf or {})
  if section is None:
    raise CheckpointError(f"config_from_hf needs a SigLIP 2 config.json (model_type "
                          f"'{_VISION_TYPE}' or 'siglip2'); {where} "
                          f"{'does not exist' if hf is None else 'holds none'}.")
  check = hf_config.ConfigCheck(section, where, SIGLIP2_VISION_DEFAULTS)
  side = _posemb_side(check.get("num_patches"))
  patch = check.get("patch_size")
  if not side or not isinstance(patch, int) or isinstance(patch, bool):
    # Settings no Siglip2Config can express: report the refusals (named) and stop.
    refused = [p for p in siglip2_config_problems(hf, Siglip2Config())
               if "is not implemented" in p]
    hf_config.raise_problems(refused, path, where)
  config = Siglip2Config(**{**dict(
      width=check.get("hidden_size"), depth=check.get("num_hidden_layers"),
      num_heads=check.get("num_attention_heads"), mlp_dim=check.get("intermediate_size"),
      patch_size=patch, image_size=image_size or side * patch,
      channels=check.get("num_channels"), posemb_grid=side,
      gelu_approximate=check.get("hidden_act") != "gelu",
      layernorm_eps=float(check.get("layer_norm_eps"))), **overrides})
  hf_config.raise_problems(siglip2_config_problems(hf, config), path, where)
  return config


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def _heads(config: Siglip2Config):
  """torch q/k/v weight [D, D] -> [D, H, hd]; bias [D] -> [H, hd]; out [D, D] -> [H, hd, D]."""
  h, hd = config.num_heads, config.head_dim
  return (lambda w: linear(w).reshape(w.shape[1], h, hd), lambda b: b.reshape(h, hd),
          lambda w: linear(w).reshape(h, hd, w.shape[0]))


def hf_siglip2_rules(config: Siglip2Config, prefix: str = "") -> List[Rule]:
  """Rules from transformers SigLIP 2 vision tensors (`{prefix}embeddings...`; prefix
  "vision_model." inside a Siglip2Model) to `Siglip2(config)` params."""
  heads_in, bias_in, heads_out = _heads(config)

  def block(i: int) -> List[Tuple[str, str, Any]]:
    b = f"{prefix}encoder.layers.{i}."
    entries = []
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
      entries += [(f"{ours}/scale", f"{b}{theirs}.weight", identity),
                  (f"{ours}/bias", f"{b}{theirs}.bias", identity)]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      entries += [(f"attn/{ours}/kernel", f"{b}self_attn.{theirs}.weight", heads_in),
                  (f"attn/{ours}/bias", f"{b}self_attn.{theirs}.bias", bias_in)]
    entries += [("attn/out/kernel", f"{b}self_attn.out_proj.weight", heads_out),
                ("attn/out/bias", f"{b}self_attn.out_proj.bias", identity)]
    for fc in ("fc1", "fc2"):
      entries += [(f"mlp/{fc}/kernel", f"{b}mlp.{fc}.weight", linear),
                  (f"mlp/{fc}/bias", f"{b}mlp.{fc}.bias", identity)]
    return entries

  e = prefix + "embeddings."
  # The patch Linear's weight [D, p*p*C] already reads patches flattened as `patchify`
  # lays them out, so it only needs transposing.
  rules = [Rule.copy("patch_embed/kernel", e + "patch_embedding.weight", linear),
           Rule.copy("patch_embed/bias", e + "patch_embedding.bias"),
           Rule.copy("pos_embedding", e + "position_embedding.weight", lambda t: t[None]),
           Rule.copy("norm/scale", prefix + "post_layernorm.weight"),
           Rule.copy("norm/bias", prefix + "post_layernorm.bias")]
  per_block = [block(i) for i in range(config.depth)]
  for j, (name, _, transform) in enumerate(per_block[0]):
    if config.scan:
      rules.append(stacked(f"blocks/{name}", [entries[j][1] for entries in per_block],
                           transform))
    else:
      rules += [Rule.copy(f"blocks_{i}/{name}", entries[j][1], entries[j][2])
                for i, entries in enumerate(per_block)]
  return rules


def load_hf_siglip2(path, config: Siglip2Config, *, shardings: Optional[Any] = None
                    ) -> Dict[str, Any]:
  """Loads a transformers SigLIP 2 checkpoint (path or flat mapping) -> `Siglip2` params.

  Args:
    path: a Siglip2VisionModel or Siglip2Model `save_pretrained` directory (tensors with
      or without the `vision_model.` prefix), a `.safetensors` file or an index json; or
      a flat {name: array} mapping (then no config.json is read).
    config: the model config (`config_from_hf(path)` builds the matching one); the
      checkpoint's config.json is checked against it (`siglip2_config_problems`).
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s for `Siglip2(config)`. The pooling head and a
    Siglip2Model's text tower are not loaded.
  Raises:
    CheckpointError: names or shapes differ, or config.json sets what we do not compute.
  """
  problems, where = [], "config.json"
  if not isinstance(path, Mapping):
    hf, where = hf_config.read_config(path)
    if hf is None:
      hf_config.warn_unchecked(path, "SigLIP 2")
    else:
      problems = siglip2_config_problems(hf, config)
  source = path if isinstance(path, Mapping) else open_safetensors(path)
  name = "checkpoint" if isinstance(path, Mapping) else f"SigLIP 2 checkpoint {path}"
  names = list(source.keys())
  # transformers >= 5 saves a Siglip2VisionModel without the `vision_model.` prefix.
  prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
  ignore = [re.escape(prefix + "head.") + ".*"]
  if any(n.startswith("text_model.") for n in names):
    logging.info("SigLIP 2: %s is a full Siglip2Model; ignoring its text tower.", name)
    ignore += [r"text_model\..*", "logit_scale", "logit_bias"]
  return load_params(source, hf_siglip2_rules(config, prefix), abstract_params(config),
                     ignore=ignore, shardings=shardings, source_name=name,
                     config_problems=problems, config_file=where)


FAMILY = TeacherFamily(
    kind="siglip2", key="siglip2", config_class=Siglip2Config, config_prefix="siglip2",
    module=Siglip2,
    pixel_norm=lambda config: (SIGLIP_MEAN, SIGLIP_STD),
    num_prefix_tokens=lambda config: 0,
    loaders={"hf": load_hf_siglip2},
    presets={
        "siglip2_b16": _preset("B/16"),
        "siglip2_l16": _preset("L/16"),
        "siglip2_so400m16": _preset("So400m/16"),
        "tiny_siglip2": _preset("mu/16", patch_size=8),  # CPU tests
    },
    default_preset="siglip2_so400m16", tiny_preset="tiny_siglip2")
