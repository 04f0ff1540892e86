"""C-RADIO (v3: B/16, L/16, H/16) as a teacher: config, flax model, loader and presets.

C-RADIO is a ViT distilled from several foundation models at once; the paper this
library reproduces found C-RADIOv3 the best alignment teacher. This file implements the
function of transformers' `RadioModel` (`model_type="radio"`) for square images:

- pixels in [0, 1] are normalised with the checkpoint's `norm_mean` / `norm_std`
  (CLIP's by default; `RadioConfig.norm_mean`, applied by `Teacher`);
- patches are flattened channel-major and projected without bias (a stride-p Conv here);
- CPE ("cropped position embedding"): one table for a `max_img_size / p` square grid
  (128 x 128 for the 2048 px releases) is resampled to the input's grid by bilinear
  interpolation (torch's `align_corners=False`, no antialiasing; for a square input the
  crop is a no-op). We resample once, at load, to `image_size / p` (`resample_cpe`), so
  the model holds the table for the grid it runs at, as our other towers do;
- `num_cls_tokens` summary tokens and `num_registers` registers (one learned table,
  no position embedding) precede the patches; `Teacher` drops them all;
- pre-norm blocks (LayerNorm, multi-head attention with q/k/v and output biases, exact
  GELU MLP of width `mlp_ratio * D`), optional layer scale, and no final norm: the
  patch features are the last block's output.

Parameter names (ours; `load_hf_radio` maps both checkpoint layouts onto them):
  patch_embed/kernel [p,p,C,D]           (no bias)
  pos_embedding [1, G*G, D]              (G = image_size / patch_size)
  prefix_tokens [num_cls_tokens + num_registers, D]
  blocks_{i}/... (looped) or blocks/... with a leading [depth] axis (scanned):
    norm1/{scale,bias}; attn/{query,key,value}/{kernel [D,H,hd], bias [H,hd]};
    attn/out/{kernel [H,hd,D], bias}; ls1/gamma [D] (only with `layer_scale`);
    norm2/{scale,bias}; mlp/fc1/{kernel,bias}; mlp/fc2/{kernel,bias}; ls2/gamma [D]

Checkpoints: a transformers `RadioModel.save_pretrained` directory, whose safetensors
use RADIO's own names (`radio_model.model.blocks.{i}.attn.qkv`, `...patch_generator.
pos_embed`), or its in-memory `state_dict()` (`encoder.layer.{i}.attention.q_proj`).
The loader reads config.json and refuses every setting that changes the function and
that we do not implement (`radio_config_problems`), naming the field.
"""

import dataclasses
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
from vla_jax.models.dinov2 import Attention, FeedForward
from vla_jax.models.patch_embed import PatchEmbed
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.typed_config import (from_mapping, require, require_patch_geometry,
                                   require_tower_settings)
from vla_jax.weights import hf_config
from vla_jax.weights.mapping import Rule, identity, linear, load_params, stacked
from vla_jax.weights.safetensors import open_safetensors

# OpenAI CLIP's pixel statistics: RADIO's default input conditioner.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RadioConfig:
  """Hyper-parameters of a C-RADIO ViT; `radio_config` has the published sizes.

  Attributes:
    width, depth, num_heads: the ViT's token width, blocks and attention heads.
    mlp_dim: the MLP's hidden width; None = 4 * width (transformers: mlp_ratio * width).
    patch_size: patch side in pixels (16 for C-RADIOv3).
    image_size: the square input side we run at; the checkpoint's CPE table is resampled
      to its grid at load.
    channels: input channels.
    num_cls_tokens, num_registers: the prefix tokens before the patches (summary tokens,
      then registers); only their sum changes the patch features.
    layer_scale: blocks scale their residual branches by learned `gamma` (C-RADIO has
      none: transformers' `layer_scale*.lambda1` are then ones and not loaded).
    layernorm_eps: epsilon of every LayerNorm.
    norm_mean, norm_std: per-channel pixel statistics of the input conditioner.
    scan: run blocks with `nn.scan` (params get a leading layer axis).
    remat: rematerialise each block in the backward pass.
    dtype: compute dtype of matmuls; parameters, LayerNorm and softmax stay float32.
  """
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: Optional[int] = None
  patch_size: int = 16
  image_size: int = 256
  channels: int = 3
  num_cls_tokens: int = 3
  num_registers: int = 7
  layer_scale: bool = False
  layernorm_eps: float = 1e-6
  norm_mean: Tuple[float, ...] = CLIP_MEAN
  norm_std: Tuple[float, ...] = CLIP_STD
  scan: bool = False
  remat: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    require_patch_geometry(self, "radio")
    for key in ("num_cls_tokens", "num_registers"):
      value = getattr(self, key)
      require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              f"radio.{key} must be an integer >= 0, found {value!r}.")
    for key in ("norm_mean", "norm_std"):
      value = getattr(self, key)
      require(isinstance(value, (tuple, list)) and len(value) == self.channels,
              f"radio.{key} must hold one value per channel ({self.channels}), found "
              f"{value!r}.")
    require(all(s > 0 for s in self.norm_std), f"radio.norm_std must be > 0, found "
            f"{self.norm_std!r}.")
    require_tower_settings(self, "radio", ("layer_scale", "scan", "remat"))

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim or 4 * self.width

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_prefix_tokens(self) -> int:
    """Summary tokens plus registers: what precedes the patch tokens."""
    return self.num_cls_tokens + self.num_registers


# The ViT sizes of the C-RADIOv3 releases (patch 16). The prefix-token counts are
# transformers' RadioConfig defaults; a checkpoint's own are in its config.json, which
# `config_from_hf` reads and the loader checks.
_PRESETS: Dict[str, Dict[str, Any]] = {
    "mu/16": dict(width=32, depth=2, num_heads=4, num_cls_tokens=2, num_registers=2),
    "B/16": dict(width=768, depth=12, num_heads=12),
    "L/16": dict(width=1024, depth=24, num_heads=16),
    "H/16": dict(width=1280, depth=32, num_heads=16),
}


def radio_config(variant: str, **overrides: Any) -> RadioConfig:
  """The C-RADIO size `variant` ("B/16", "L/16", "H/16", "mu/16") with `overrides`."""
  require(variant in _PRESETS, f"Unknown C-RADIO variant {variant!r}; expected one of "
          f"{sorted(_PRESETS)}, or build RadioConfig directly.")
  return from_mapping(RadioConfig, {**_PRESETS[variant], **overrides}, where="radio")


def _preset(variant: str, **overrides: Any):
  """A builder: student grid -> the `variant` tower seeing that grid."""
  def build(student_grid: int) -> RadioConfig:
    patch = overrides.get("patch_size") or 16
    size = align_lib.teacher_input_size(student_grid, patch)
    return radio_config(variant, image_size=size, **overrides)
  return build


# ---------------------------------------------------------------------------------------
# CPE resampling
# ---------------------------------------------------------------------------------------
def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear interpolation (align_corners=False, no
  antialiasing): output i samples input (i + 0.5) * n_in / n_out - 0.5, clamped to the
  edges."""
  source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  left = np.minimum(np.floor(source).astype(int), n_in - 1)
  right = np.minimum(left + 1, n_in - 1)
  frac = source - left
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), left), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), right), frac)
  return weights


def resample_cpe(table: np.ndarray, grid_size: int) -> np.ndarray:
  """A CPE table [1, M*M, D] for an M x M grid -> [1, grid_size**2, D] (float32).

  RADIO resamples its table to the input's grid at every call, bilinearly; done once
  here with the same weights (float64 inside).
  """
  table = np.asarray(table, np.float64)
  side = int(round(np.sqrt(table.shape[1])))
  if table.ndim != 3 or table.shape[0] != 1 or side * side != table.shape[1]:
    raise InputError(f"A CPE table must be [1, M*M, D], found shape {table.shape}.")
  if side == grid_size:
    return table.astype(np.float32)
  weights = _bilinear_weights(side, grid_size)
  grid = np.einsum("ih,jw,hwd->ijd", weights, weights, table[0].reshape(side, side, -1))
  return grid.reshape(1, grid_size * grid_size, -1).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def _layer_norm(config: RadioConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layernorm_eps, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


class LayerScale(nn.Module):
  """x * gamma, gamma [D] initialised to ones (an identity until a checkpoint says not)."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm ViT block (RADIO's); returns (x, x) so it can be scanned."""
  config: RadioConfig

  @nn.compact
  def __call__(self, x, _=None):  # x: [B, T, D]
    config = self.config
    dtype = jnp.dtype(config.dtype)
    y = _layer_norm(config, "norm1")(x).astype(dtype)
    y = Attention(config.num_heads, dtype, name="attn")(y)
    if config.layer_scale:
      y = LayerScale(name="ls1")(y)
    x = x + y
    y = _layer_norm(config, "norm2")(x).astype(dtype)
    y = FeedForward(config.mlp_width, "mlp", dtype, name="mlp")(y)
    if config.layer_scale:
      y = LayerScale(name="ls2")(y)
    x = shard_batch_axis(x + y)
    return x, x


class Radio(nn.Module):
  """C-RADIO ViT. `__call__(image [B,H,W,C] normalised, train=False) -> (encoded, out)`.

  `out` holds "embedded" ([B,T,D] entering block 0), "block00".. ([B,T,D] after each
  block), "encoded" ([B,T,D], the last block's output: RADIO has no final norm) and
  "patch_tokens" ([B,N,D], prefix tokens removed), T = num_prefix_tokens + N.
  """
  config: RadioConfig

  def _check_image(self, image) -> None:
    config = self.config
    want = f"[batch, {config.image_size}, {config.image_size}, {config.channels}]"
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 4 or shape[1:] != (config.image_size, config.image_size,
                                        config.channels):
      raise InputError(f"Radio expects images shaped {want} (NHWC), found {shape}. Resize "
                       "them, or set radio.image_size (the CPE table is resampled at load).")
    if not jnp.issubdtype(image.dtype, jnp.floating):
      raise InputError(f"Radio expects float images normalised with radio.norm_mean / "
                       f"norm_std; found dtype {image.dtype}.")

  @nn.compact
  def __call__(self, image, *, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del train  # no dropout at inference; the flag keeps the towers' common signature
    config = self.config
    self._check_image(image)
    dtype = jnp.dtype(config.dtype)
    width, p = config.width, config.patch_size
    out = {}
    patches = PatchEmbed(width, p, use_bias=False, dtype=dtype, name="patch_embed")(
        image.astype(dtype))
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, width)  # row-major, as RADIO's patch order
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02),
                        (1, config.num_patches, width), jnp.float32)
    patches = patches + posemb.astype(dtype)
    prefix = self.param("prefix_tokens", nn.initializers.normal(0.02),
                        (config.num_prefix_tokens, width), jnp.float32)
    prefix = jnp.broadcast_to(prefix.astype(dtype)[None], (batch,) + prefix.shape)
    x = out["embedded"] = jnp.concatenate([prefix, patches], axis=1)  # [B, T, D]

    block = nn.remat(Block, prevent_cse=not config.scan) if config.remat else Block
    if config.scan:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=config.depth)
      x, per_block = blocks(config, name="blocks")(x, None)  # [depth, B, T, D]
      for i in range(config.depth):
        out[f"block{i:02d}"] = per_block[i]
    else:
      for i in range(config.depth):
        x, out[f"block{i:02d}"] = block(config, name=f"blocks_{i}")(x)
    out["encoded"] = x
    out["patch_tokens"] = x[:, config.num_prefix_tokens:]
    return x, out


def abstract_params(config: RadioConfig) -> Dict[str, Any]:
  """The model's params as `jax.ShapeDtypeStruct`s (no memory, no compute)."""
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                               jnp.float32)
  return jax.eval_shape(Radio(config).init, jax.random.key(0), image)["params"]


# ---------------------------------------------------------------------------------------
# config.json: what we compute, and what we refuse
# ---------------------------------------------------------------------------------------
# transformers' RadioConfig defaults, for fields a config.json omits.
RADIO_DEFAULTS = dict(
    hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_ratio=4.0,
    hidden_act="gelu", layer_norm_eps=1e-6, use_swiglu_ffn=False, qkv_bias=True,
    layerscale_value=1.0, num_channels=3, patch_size=16, image_size=224, max_img_size=2048,
    num_cls_tokens=3, num_registers=7, norm_mean=list(CLIP_MEAN), norm_std=list(CLIP_STD))
# Fields that do not change the patch features at inference: dropout and stochastic
# depth (off in eval), the init, the processor's default size, fields transformers
# re-derives (`patch_dim`), the summary's token choice, and generic bookkeeping.
_INERT = ("attention_probs_dropout_prob", "hidden_dropout_prob", "drop_path_rate",
          "initializer_range", "image_size", "patch_dim", "video_patch_dim", "summary_idxs",
          "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
          "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states",
          "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
          "model_type")
# Fields checked below (implemented, refused, or used by the loader).
_CHECKED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
            "hidden_act", "layer_norm_eps", "use_swiglu_ffn", "qkv_bias", "layerscale_value",
            "num_channels", "patch_size", "max_img_size", "num_cls_tokens", "num_registers",
            "norm_mean", "norm_std", "video_temporal_patch_size", "head_dim")


def _mlp_width(check: hf_config.ConfigCheck) -> int:
  """transformers' MLP width: int(hidden_size * mlp_ratio)."""
  return int(check.get("hidden_size") * check.get("mlp_ratio"))


def radio_config_problems(hf: Mapping[str, Any], config: RadioConfig, where: str
                          ) -> List[str]:
  """Every setting of a transformers RADIO config.json that `Radio(config)` does not compute.

  Not among them: `image_size` and `max_img_size` (the CPE table is resampled to
  `config.image_size` at load) and the fields in `_INERT`. A field transformers' RadioConfig
  does not have is refused: we cannot tell what it changes.
  """
  check = hf_config.ConfigCheck(hf, where, RADIO_DEFAULTS)
  model_type = hf.get("model_type")
  if model_type != "radio":
    check.refuse("model_type", model_type, "transformers' RADIO ('radio')",
                 "Use a C-RADIO checkpoint saved by transformers' RadioModel.")
    return check.problems
  for key in sorted(set(hf) - set(_INERT) - set(_CHECKED)):
    check.refuse(key, hf[key], "transformers' RadioConfig fields only (an unknown field "
                 "may change the function)", f"Remove {key!r} if it is inert, or use a "
                 "plain C-RADIO checkpoint.")
  if check.get("hidden_act") != "gelu":
    check.refuse("hidden_act", check.get("hidden_act"), "RADIO's exact GELU MLP ('gelu')",
                 "Use a checkpoint with hidden_act='gelu'.")
  if check.get("use_swiglu_ffn"):
    check.refuse("use_swiglu_ffn", True, "the GELU MLP (use_swiglu_ffn=False)",
                 "Use a checkpoint without the SwiGLU feed-forward.")
  if not check.get("qkv_bias"):
    check.refuse("qkv_bias", check.get("qkv_bias"), "attention with query/key/value biases",
                 "Use a checkpoint with qkv_bias=True.")
  if hf.get("video_temporal_patch_size") is not None:
    check.refuse("video_temporal_patch_size", hf["video_temporal_patch_size"],
                 "image input only (no video patch embedding)",
                 "Use an image-only checkpoint (video_temporal_patch_size=null).")
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * check.get("num_attention_heads") != check.get(
      "hidden_size"):
    check.refuse("head_dim", head_dim, "head_dim = hidden_size / num_attention_heads",
                 "Use a checkpoint without a separate head_dim.")
  check.equal("layer_norm_eps", "radio.layernorm_eps", config.layernorm_eps, rtol=1e-3)
  if _mlp_width(check) != config.mlp_width:
    check.differs("mlp_ratio", check.get("mlp_ratio"), "radio.mlp_dim", config.mlp_width,
                  f"Set radio.mlp_dim={_mlp_width(check)} (transformers' MLP width for that "
                  "ratio).")
  for key, ours_name, ours in (("hidden_size", "radio.width", config.width),
                               ("num_hidden_layers", "radio.depth", config.depth),
                               ("num_attention_heads", "radio.num_heads", config.num_heads),
                               ("patch_size", "radio.patch_size", config.patch_size),
                               ("num_channels", "radio.channels", config.channels),
                               ("num_cls_tokens", "radio.num_cls_tokens",
                                config.num_cls_tokens),
                               ("num_registers", "radio.num_registers", config.num_registers)):
    check.equal(key, ours_name, ours)
  for key, ours in (("norm_mean", config.norm_mean), ("norm_std", config.norm_std)):
    theirs = check.get(key)
    if len(theirs) != len(ours) or not np.allclose(theirs, ours, rtol=1e-5, atol=1e-7):
      check.differs(key, list(theirs), f"radio.{key}", tuple(ours),
                    f"Set radio.{key}={tuple(theirs)} (or build the config with "
                    "config_from_hf).")
  return check.problems


def config_from_hf(path: str, image_size: Optional[int] = None, **overrides: Any
                   ) -> RadioConfig:
  """The `RadioConfig` of a transformers RADIO checkpoint directory.

  Args:
    path: the `save_pretrained` directory (or a file beside its config.json).
    image_size: the resolution to run at (default: config.json's `image_size`); the CPE
      table is resampled to it at load.
    overrides: our settings the checkpoint does not fix (scan, remat, dtype, ...).
  """
  hf, where = hf_config.read_config(path)
  if hf is None or hf.get("model_type") != "radio":
    raise CheckpointError(f"config_from_hf needs a RADIO config.json (model_type 'radio'); "
                          f"{where} {'does not exist' if hf is None else 'holds none'}.")
  check = hf_config.ConfigCheck(hf, where, RADIO_DEFAULTS)
  fields = dict(
      width=check.get("hidden_size"), depth=check.get("num_hidden_layers"),
      num_heads=check.get("num_attention_heads"), mlp_dim=_mlp_width(check),
      patch_size=check.get("patch_size"), image_size=image_size or check.get("image_size"),
      channels=check.get("num_channels"), num_cls_tokens=check.get("num_cls_tokens"),
      num_registers=check.get("num_registers"),
      layer_scale=_scales_residuals(open_safetensors(path), "",
                                    float(check.get("layerscale_value"))),
      layernorm_eps=float(check.get("layer_norm_eps")),
      norm_mean=tuple(float(v) for v in check.get("norm_mean")),
      norm_std=tuple(float(v) for v in check.get("norm_std")))
  config = RadioConfig(**{**fields, **overrides})
  hf_config.raise_problems(radio_config_problems(hf, config, where), path, where)
  return config


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
# The two layouts' names: save_pretrained files keep RADIO's own (`radio_model.model.*`,
# fused qkv), a transformers >= 5 `state_dict()` has the module names.
_LAYOUTS = {
    "hub": dict(patch="radio_model.model.patch_generator.embedder.weight",
                pos="radio_model.model.patch_generator.pos_embed",
                prefix_tokens="radio_model.model.patch_generator.cls_token.token",
                block="radio_model.model.blocks.{i}.", out="attn.proj",
                conditioner="radio_model.input_conditioner.",
                summary="radio_model.summary_idxs"),
    "state_dict": dict(patch="embeddings.patch_projection.weight",
                       pos="embeddings.position_embedding",
                       prefix_tokens="embeddings.cls_register_token",
                       block="encoder.layer.{i}.", out="attention.o_proj",
                       conditioner="input_conditioner.", summary="summary_idxs"),
}


def _layout(source: Mapping[str, Any], prefix: str) -> Dict[str, str]:
  hub = any(k.startswith(prefix + "radio_model.") for k in source.keys())
  return {k: prefix + v for k, v in _LAYOUTS["hub" if hub else "state_dict"].items()}


def _scale_names(source: Mapping[str, Any], prefix: str) -> List[str]:
  layout = _layout(source, prefix)
  block = re.escape(layout["block"]).replace(r"\{i\}", r"\d+")
  return sorted(k for k in source.keys()
                if re.fullmatch(block + r"layer_scale[12]\.lambda1", k))


def _scales_residuals(source: Mapping[str, Any], prefix: str, layerscale_value: float) -> bool:
  """Whether the checkpoint's blocks scale their residual branches: stored layer-scale
  vectors other than ones, or none stored and transformers' fill value not 1."""
  names = _scale_names(source, prefix)
  if not names:
    return layerscale_value != 1.0
  return any(not np.all(np.asarray(source[n]) == 1.0) for n in names)


def _heads_in(config: RadioConfig, part: int, parts: int):
  """torch weight [parts*D, D] (slice `part`) -> kernel [D, H, hd]; bias likewise."""
  width, head_dim = config.width, config.width // config.num_heads

  def weight(w):
    return linear(w[part * width:(part + 1) * width]).reshape(w.shape[1], config.num_heads,
                                                                head_dim)

  def bias(b):
    return b[part * width:(part + 1) * width].reshape(config.num_heads, head_dim)

  return weight, bias


def _patch_kernel(config: RadioConfig):
  """torch Linear over channel-major patches [D, C*p*p] -> Conv kernel [p, p, C, D]."""
  p, c = config.patch_size, config.channels
  return lambda w: w.reshape(w.shape[0], c, p, p).transpose(2, 3, 1, 0)


def hf_radio_rules(config: RadioConfig, layout: Mapping[str, str], *, scales: bool,
                   layerscale_value: float = 1.0) -> List[Rule]:
  """Rules from a transformers RADIO checkpoint (`layout`: its names) to `Radio` params.

  `scales`: the checkpoint stores layer-scale vectors (loaded when `config.layer_scale`);
  without them, a layer-scale config gets transformers' fill value `layerscale_value`.
  """
  rules = [Rule.copy("patch_embed/kernel", layout["patch"], _patch_kernel(config)),
           Rule.copy("pos_embedding", layout["pos"],
                     lambda t: resample_cpe(t, config.grid_size)),
           Rule.copy("prefix_tokens", layout["prefix_tokens"])]
  hub = "radio_model." in layout["block"]

  def block(i: int) -> List[Tuple[str, Tuple[str, ...], Any]]:
    b = layout["block"].format(i=i)
    entries = []
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp/fc1", "mlp.fc1"),
                         ("mlp/fc2", "mlp.fc2")):
      weight = identity if ours.startswith("norm") else linear
      entries += [(f"{ours}/{'scale' if ours.startswith('norm') else 'kernel'}",
                   (f"{b}{theirs}.weight",), weight),
                  (f"{ours}/bias", (f"{b}{theirs}.bias",), identity)]
    for part, ours in enumerate(("query", "key", "value")):
      if hub:  # RADIO's fused qkv: [q; k; v] on the output axis
        weight, bias = _heads_in(config, part, 3)
        names = (f"{b}attn.qkv.weight",), (f"{b}attn.qkv.bias",)
      else:
        weight, bias = _heads_in(config, 0, 1)
        proj = f"{b}attention.{ours[0]}_proj"
        names = (f"{proj}.weight",), (f"{proj}.bias",)
      entries += [(f"attn/{ours}/kernel", names[0], weight),
                  (f"attn/{ours}/bias", names[1], bias)]
    head_dim = config.width // config.num_heads
    entries += [("attn/out/kernel", (f"{b}{layout['out']}.weight",),
                 lambda w: linear(w).reshape(config.num_heads, head_dim, w.shape[0])),
                ("attn/out/bias", (f"{b}{layout['out']}.bias",), identity)]
    if config.layer_scale:
      for k in (1, 2):
        if scales:
          entries.append((f"ls{k}/gamma", (f"{b}layer_scale{k}.lambda1",), identity))
        else:  # transformers fills the missing vectors with layerscale_value
          entries.append((f"ls{k}/gamma", (), lambda: np.full((config.width,),
                                                              layerscale_value, np.float32)))
    return entries

  per_block = [block(i) for i in range(config.depth)]
  for j, (name, _, transform) in enumerate(per_block[0]):
    if config.scan:
      sources = [entries[j][1] for entries in per_block]
      if sources[0]:
        rules.append(stacked(f"blocks/{name}", [s[0] for s in sources], transform))
      else:
        rules.append(Rule(f"blocks/{name}", (),
                          lambda t=transform: np.stack([t()] * config.depth)))
    else:
      rules += [Rule(f"blocks_{i}/{name}", entries[j][1], entries[j][2])
                for i, entries in enumerate(per_block)]
  return rules


def _open(path_or_source):
  if isinstance(path_or_source, Mapping):
    return path_or_source, "checkpoint"
  return open_safetensors(path_or_source), f"RADIO checkpoint {path_or_source}"


def _shape(source: Mapping[str, Any], name: str) -> Tuple[int, ...]:
  if hasattr(source, "shape") and callable(source.shape):
    return tuple(source.shape(name))
  return tuple(np.shape(source[name]))


def _tensor_problems(source: Mapping[str, Any], layout: Mapping[str, str], prefix: str,
                     config: RadioConfig, check: hf_config.ConfigCheck) -> List[str]:
  """What the tensors say beyond config.json: the stored input conditioner (transformers
  computes with it, whatever config.json's norm_mean / norm_std say), layer scale, and
  the CPE table's size against `max_img_size`."""
  problems = []
  for key, ours in (("norm_mean", config.norm_mean), ("norm_std", config.norm_std)):
    name = layout["conditioner"] + key
    if name in source:
      stored = np.asarray(source[name], np.float64).reshape(-1)
      if stored.shape != (len(ours),) or not np.allclose(stored, ours, rtol=1e-5, atol=1e-7):
        problems.append(f"{name}={stored.tolist()} but radio.{key}={tuple(ours)}: the "
                        f"checkpoint normalises pixels differently. Set radio.{key}="
                        f"{tuple(stored.tolist())}.")
  layerscale_value = float(check.get("layerscale_value"))
  if _scales_residuals(source, prefix, layerscale_value) and not config.layer_scale:
    problems.append(f"the checkpoint scales its residual branches (layer_scale*.lambda1 "
                    f"not ones, or layerscale_value={layerscale_value} without them) but "
                    "radio.layer_scale=False. Set radio.layer_scale=True.")
  if layout["pos"] in source and check.hf.get("max_img_size") is not None:
    rows = _shape(source, layout["pos"])[1]
    side = check.get("max_img_size") // check.get("patch_size")
    if rows != side * side:
      problems.append(f"{check.where}: max_img_size={check.get('max_img_size')} means a "
                      f"{side}x{side} CPE table, but {layout['pos']} has {rows} rows; this "
                      "config.json does not belong to these weights.")
  return problems


def load_hf_radio(path, config: RadioConfig, *, prefix: str = "",
                  shardings: Optional[Any] = None) -> Dict[str, Any]:
  """Loads a transformers RADIO checkpoint (path or opened mapping) -> `Radio` params.

  Args:
    path: a `save_pretrained` directory, a `.safetensors` file or an index json; or a
      flat {name: array} mapping (then no config.json is read).
    config: the model config (`config_from_hf(path)` builds the matching one); the
      checkpoint's config.json and input-conditioner tensors are checked against it.
    prefix: key prefix of the RADIO model inside a larger checkpoint.
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s for `Radio(config)`.
  Raises:
    CheckpointError: names or shapes differ, or config.json sets what we do not compute.
  """
  hf, where = {}, "config.json"
  if not isinstance(path, Mapping):
    hf, where = hf_config.read_config(path)
    if hf is None:
      hf_config.warn_unchecked(path, "RADIO")
      hf = {}
  problems = radio_config_problems(hf, config, "config.json") if hf else []
  check = hf_config.ConfigCheck(hf, "config.json", RADIO_DEFAULTS)
  source, name = _open(path)
  layout = _layout(source, prefix)
  problems += _tensor_problems(source, layout, prefix, config, check)
  scale_names = _scale_names(source, prefix)
  ignore = [re.escape(layout["conditioner"]) + r"norm_(mean|std)", re.escape(layout["summary"])]
  if not config.layer_scale:  # ones (else reported above): identities we do not compute
    ignore += [re.escape(n) for n in scale_names]
  if layout["pos"] in source and _shape(source, layout["pos"])[1] != config.num_patches:
    side = int(round(np.sqrt(_shape(source, layout["pos"])[1])))
    logging.info("RADIO: resampling the %dx%d CPE table to a %dx%d grid (bilinear) for "
                 "image_size %d.", side, side, config.grid_size, config.grid_size,
                 config.image_size)
  rules = hf_radio_rules(config, layout, scales=bool(scale_names),
                         layerscale_value=float(check.get("layerscale_value")))
  return load_params(source, rules, abstract_params(config), ignore=ignore,
                     shardings=shardings, source_name=name, config_problems=problems,
                     config_file=where)


FAMILY = TeacherFamily(
    kind="radio", key="radio", config_class=RadioConfig, config_prefix="radio",
    module=Radio,
    pixel_norm=lambda config: (config.norm_mean, config.norm_std),
    num_prefix_tokens=lambda config: config.num_prefix_tokens,
    loaders={"hf": load_hf_radio},
    presets={
        "c_radio_v3_b": _preset("B/16"),
        "c_radio_v3_l": _preset("L/16"),  # the reference code's default teacher
        "c_radio_v3_h": _preset("H/16"),
        "tiny_radio": _preset("mu/16", patch_size=8),  # CPU tests
    },
    default_preset="c_radio_v3_l", tiny_preset="tiny_radio")
