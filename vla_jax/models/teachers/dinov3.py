"""DINOv3 ViT as a teacher: config, flax model, loader and presets (transformers `dinov3_vit`).

DINOv3 differs from DINOv2 where it matters for loading a checkpoint faithfully:

- no learned position table: 2D rotary embeddings (RoPE) on the queries and keys of the
  patch tokens only, at each patch centre's coordinates normalised to [-1, 1] (so any
  grid works without resampling); frequencies `1 / rope_theta ** (4 k / head_dim)`, the
  y angles then the x angles, each pair rotated "half against half";
- `[cls, registers..., patches]`, none of the prefix tokens rotated; `Teacher` drops the
  CLS token and the registers;
- attention biases per projection (`query_bias`, `key_bias` (off in the releases),
  `value_bias`, `proj_bias`) and `mlp_bias`: a bias the checkpoint does not have is
  loaded as zeros, the same function;
- layer scale on both branches, exact-GELU MLP, final LayerNorm;
- pixels normalised with ImageNet's mean / std (the web-image releases).

The gated MLP of the H+ / 7B releases (`use_gated_mlp`) is not implemented and refused.

Parameter names (ours): patch_embed/{kernel [p,p,C,D], bias}; cls_token [1,1,D];
register_tokens [1,R,D] (R > 0); blocks_{i}/... or scanned blocks/...: norm1,
attn/{query,key,value}/{kernel [D,H,hd], bias [H,hd]}, attn/out/{kernel [H,hd,D], bias},
ls1/gamma, norm2, mlp/fc1, mlp/fc2, ls2/gamma; norm (final).
Checkpoints: a `DINOv3ViTModel.save_pretrained` directory (`layer.{i}.*`, as the hub
releases) or a transformers >= 5 `state_dict()` (`model.layer.{i}.*`).
"""

import dataclasses
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import CheckpointError, InputError
from vla_jax.models import align as align_lib
from vla_jax.models.constraints import shard_batch_axis
from vla_jax.models.dinov2 import FeedForward, LayerScale
from vla_jax.models.patch_embed import PatchEmbed
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.models.vla import IMAGENET_MEAN, IMAGENET_STD
from vla_jax.typed_config import (from_mapping, require, require_patch_geometry,
                                   require_tower_settings)
from vla_jax.weights import hf_config
from vla_jax.weights.mapping import Rule, conv2d, identity, linear, load_params, stacked
from vla_jax.weights.safetensors import open_safetensors


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
  """Hyper-parameters of a DINOv3 ViT; `dinov3_config` has the published sizes.

  Attributes:
    width, depth, num_heads: token width, blocks, attention heads (head_dim % 4 == 0).
    mlp_dim: the MLP's hidden width (transformers' `intermediate_size`); None = 4 * width.
    patch_size: patch side in pixels (16 in the releases).
    image_size: the square input side we run at (RoPE needs no resampling).
    channels: input channels.
    num_registers: register tokens between CLS and the patches (4 in the releases).
    rope_theta: RoPE base period.
    layernorm_eps: epsilon of every LayerNorm.
    scan, remat, dtype: as for the other towers.
  """
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: Optional[int] = None
  patch_size: int = 16
  image_size: int = 256
  channels: int = 3
  num_registers: int = 4
  rope_theta: float = 100.0
  layernorm_eps: float = 1e-5
  scan: bool = False
  remat: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    require_patch_geometry(self, "dinov3")
    require((self.width // self.num_heads) % 4 == 0,
            f"dinov3.width / dinov3.num_heads (the head dim, {self.width // self.num_heads}) "
            "must be a multiple of 4 for the 2D RoPE.")
    require(isinstance(self.num_registers, int) and self.num_registers >= 0,
            f"dinov3.num_registers must be an integer >= 0, found {self.num_registers!r}.")
    require(self.rope_theta > 0, f"dinov3.rope_theta must be > 0, found {self.rope_theta!r}.")
    require_tower_settings(self, "dinov3", ("scan", "remat"))

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim or 4 * self.width

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    """CLS plus registers."""
    return 1 + self.num_registers


_PRESETS: Dict[str, Dict[str, Any]] = {
    "mu/16": dict(width=32, depth=2, num_heads=4, num_registers=2),
    "S/16": dict(width=384, depth=12, num_heads=6),
    "B/16": dict(width=768, depth=12, num_heads=12),
    "L/16": dict(width=1024, depth=24, num_heads=16),
}


def dinov3_config(variant: str, **overrides: Any) -> DinoV3Config:
  """The DINOv3 size `variant` ("S/16", "B/16", "L/16", "mu/16") with `overrides`."""
  require(variant in _PRESETS, f"Unknown DINOv3 variant {variant!r}; expected one of "
          f"{sorted(_PRESETS)}, or build DinoV3Config directly.")
  return from_mapping(DinoV3Config, {**_PRESETS[variant], **overrides}, where="dinov3")


def _preset(variant: str, **overrides: Any):
  def build(student_grid: int) -> DinoV3Config:
    size = align_lib.teacher_input_size(student_grid, overrides.get("patch_size") or 16)
    return dinov3_config(variant, image_size=size, **overrides)
  return build


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def rope_tables(grid_size: int, head_dim: int, theta: float) -> Tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each [grid_size**2, head_dim] float32, for the patches in row-major order.

  A patch centre's (y, x) in [-1, 1] times 2 pi times head_dim / 4 frequencies gives
  head_dim / 2 angles (y's, then x's), repeated once for the two rotated halves.
  """
  centres = 2.0 * (np.arange(grid_size, dtype=np.float32) + 0.5) / grid_size - 1.0
  y, x = np.meshgrid(centres, centres, indexing="ij")
  coords = np.stack([y.reshape(-1), x.reshape(-1)], axis=-1)  # [N, 2]
  inv_freq = 1.0 / theta ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)  # [hd / 4]
  angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]
  angles = np.tile(angles.reshape(len(coords), -1), 2)  # [N, hd]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x, cos, sin):
  """x [B, N, H, hd] rotated: x * cos + rotate_half(x) * sin (cos, sin: [N, hd])."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, None, :].astype(x.dtype) + rotated * sin[:, None, :].astype(x.dtype)


class RopeAttention(nn.Module):
  """Multi-head self-attention with 2D RoPE on the patch tokens (the last N)."""
  config: DinoV3Config

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    config = self.config
    dtype = jnp.dtype(config.dtype)
    dense = lambda name: nn.DenseGeneral((config.num_heads, config.head_dim), dtype=dtype,
                                         param_dtype=jnp.float32, name=name)
    query, key, value = dense("query")(x), dense("key")(x), dense("value")(x)
    cos, sin = rope_tables(config.grid_size, config.head_dim, config.rope_theta)
    p = config.num_prefix_tokens
    query = jnp.concatenate([query[:, :p], _rotate(query[:, p:], cos, sin)], axis=1)
    key = jnp.concatenate([key[:, :p], _rotate(key[:, p:], cos, sin)], axis=1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32) * config.head_dim ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    return nn.DenseGeneral(config.width, axis=(-2, -1), dtype=dtype, param_dtype=jnp.float32,
                           name="out")(mixed)


def _layer_norm(config: DinoV3Config, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layernorm_eps, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


class Block(nn.Module):
  """Pre-norm block with layer scale; returns (x, x) so it can be scanned."""
  config: DinoV3Config

  @nn.compact
  def __call__(self, x, _=None):
    config = self.config
    dtype = jnp.dtype(config.dtype)
    y = RopeAttention(config, name="attn")(_layer_norm(config, "norm1")(x).astype(dtype))
    x = x + LayerScale(name="ls1")(y)
    y = FeedForward(config.mlp_width, "mlp", dtype, name="mlp")(
        _layer_norm(config, "norm2")(x).astype(dtype))
    x = shard_batch_axis(x + LayerScale(name="ls2")(y))
    return x, x


class DinoV3(nn.Module):
  """DINOv3 ViT. `__call__(image [B,H,W,C] normalised, train=False) -> (encoded, out)`.

  `out`: "embedded", "block00".. ([B,T,D] residual streams), "encoded" (after the final
  norm), "patch_tokens" ([B,N,D]); T = 1 + num_registers + N.
  """
  config: DinoV3Config

  @nn.compact
  def __call__(self, image, *, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del train  # RoPE's coordinate augmentation and dropout are training-only
    config = self.config
    want = (config.image_size, config.image_size, config.channels)
    if image.ndim != 4 or tuple(image.shape[1:]) != want:
      raise InputError(f"DinoV3 expects images shaped [batch, {', '.join(map(str, want))}] "
                       f"(NHWC), found {tuple(image.shape)}. Resize them or set "
                       "dinov3.image_size.")
    dtype = jnp.dtype(config.dtype)
    p, width = config.patch_size, config.width
    patches = PatchEmbed(width, p, dtype=dtype, name="patch_embed")(image.astype(dtype))
    batch = patches.shape[0]
    prefix = [self.param("cls_token", nn.initializers.normal(0.02), (1, 1, width),
                         jnp.float32)]
    if config.num_registers:
      prefix.append(self.param("register_tokens", nn.initializers.normal(0.02),
                               (1, config.num_registers, width), jnp.float32))
    prefix = [jnp.broadcast_to(t.astype(dtype), (batch,) + t.shape[1:]) for t in prefix]
    out = {}
    x = out["embedded"] = jnp.concatenate(prefix + [patches.reshape(batch, -1, width)], axis=1)
    block = nn.remat(Block, prevent_cse=not config.scan) if config.remat else Block
    if config.scan:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=config.depth)
      x, per_block = blocks(config, name="blocks")(x, None)
      for i in range(config.depth):
        out[f"block{i:02d}"] = per_block[i]
    else:
      for i in range(config.depth):
        x, out[f"block{i:02d}"] = block(config, name=f"blocks_{i}")(x)
    x = out["encoded"] = _layer_norm(config, "norm")(x)
    out["patch_tokens"] = x[:, config.num_prefix_tokens:]
    return x, out


def abstract_params(config: DinoV3Config) -> Dict[str, Any]:
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                               jnp.float32)
  return jax.eval_shape(DinoV3(config).init, jax.random.key(0), image)["params"]


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------
DINOV3_DEFAULTS = dict(
    patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
    num_attention_heads=6, hidden_act="gelu", layer_norm_eps=1e-5, rope_theta=100.0,
    num_channels=3, query_bias=True, key_bias=False, value_bias=True, proj_bias=True,
    mlp_bias=True, layerscale_value=1.0, use_gated_mlp=False, num_register_tokens=0)
# Training-only (dropout, stochastic depth, RoPE coordinate augmentation, init), the
# backbone head's options, the processor's size, bookkeeping.
_INERT = ("attention_dropout", "drop_path_rate", "initializer_range", "pos_embed_shift",
          "pos_embed_jitter", "pos_embed_rescale", "apply_layernorm", "reshape_hidden_states",
          "out_features", "out_indices", "stage_names", "image_size", "layerscale_value",
          "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
          "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states",
          "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "model_type")
_BIASES = ("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias")
_CHECKED = ("patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "hidden_act", "layer_norm_eps", "rope_theta",
            "num_channels", "use_gated_mlp", "num_register_tokens") + _BIASES


def dinov3_config_problems(hf: Mapping[str, Any], config: DinoV3Config, where: str
                           ) -> List[str]:
  """Every setting of a transformers DINOv3 ViT config.json that `DinoV3(config)` does not
  compute; a field `DINOv3ViTConfig` does not have is refused."""
  check = hf_config.ConfigCheck(hf, where, DINOV3_DEFAULTS)
  if hf.get("model_type") != "dinov3_vit":
    check.refuse("model_type", hf.get("model_type"), "DINOv3 ViT ('dinov3_vit')",
                 "Use a DINOv3 ViT checkpoint (DINOv3 ConvNeXt is not implemented).")
    return check.problems
  for key in sorted(set(hf) - set(_INERT) - set(_CHECKED)):
    check.refuse(key, hf[key], "transformers' DINOv3ViTConfig fields only (an unknown field "
                 "may change the function)", "Use a plain DINOv3 ViT checkpoint.")
  if check.get("use_gated_mlp"):
    check.refuse("use_gated_mlp", True, "the GELU MLP of the S/B/L releases",
                 "Use a checkpoint with use_gated_mlp=False (not H+ / 7B).")
  if check.get("hidden_act") != "gelu":
    check.refuse("hidden_act", check.get("hidden_act"), "exact GELU ('gelu')",
                 "Use a checkpoint with hidden_act='gelu'.")
  patch = check.get("patch_size")
  if isinstance(patch, (list, tuple)):
    if len(set(patch)) != 1:
      check.refuse("patch_size", patch, "square patches", "Use square patches.")
    patch = patch[0]
  if patch != config.patch_size:
    check.differs("patch_size", patch, "dinov3.patch_size", config.patch_size)
  check.equal("layer_norm_eps", "dinov3.layernorm_eps", config.layernorm_eps, rtol=1e-3)
  check.equal("rope_theta", "dinov3.rope_theta", config.rope_theta, rtol=1e-6)
  for key, ours_name, ours in (("hidden_size", "dinov3.width", config.width),
                               ("intermediate_size", "dinov3.mlp_dim", config.mlp_width),
                               ("num_hidden_layers", "dinov3.depth", config.depth),
                               ("num_attention_heads", "dinov3.num_heads", config.num_heads),
                               ("num_channels", "dinov3.channels", config.channels),
                               ("num_register_tokens", "dinov3.num_registers",
                                config.num_registers)):
    check.equal(key, ours_name, ours)
  return check.problems


def config_from_hf(path: str, image_size: Optional[int] = None, **overrides: Any
                   ) -> DinoV3Config:
  """The `DinoV3Config` of a transformers DINOv3 ViT checkpoint directory."""
  hf, where = hf_config.read_config(path)
  if hf is None or hf.get("model_type") != "dinov3_vit":
    raise CheckpointError(f"config_from_hf needs a DINOv3 ViT config.json; {where} "
                          f"{'does not exist' if hf is None else 'holds none'}.")
  check = hf_config.ConfigCheck(hf, where, DINOV3_DEFAULTS)
  patch = check.get("patch_size")
  patch = patch[0] if isinstance(patch, (list, tuple)) else patch
  native = check.get("image_size", 224)
  native = native[0] if isinstance(native, (list, tuple)) else native
  config = DinoV3Config(**{**dict(
      width=check.get("hidden_size"), depth=check.get("num_hidden_layers"),
      num_heads=check.get("num_attention_heads"), mlp_dim=check.get("intermediate_size"),
      patch_size=patch, image_size=image_size or native, channels=check.get("num_channels"),
      num_registers=check.get("num_register_tokens"),
      rope_theta=float(check.get("rope_theta")),
      layernorm_eps=float(check.get("layer_norm_eps"))), **overrides})
  hf_config.raise_problems(dinov3_config_problems(hf, config, where), path, where)
  return config


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def _heads(config: DinoV3Config):
  """torch q/k/v weight [D, D] -> [D, H, hd]; bias [D] -> [H, hd]; out [D, D] -> [H, hd, D]."""
  h, hd = config.num_heads, config.head_dim
  return (lambda w: linear(w).reshape(w.shape[1], h, hd), lambda b: b.reshape(h, hd),
          lambda w: linear(w).reshape(h, hd, w.shape[0]))


def hf_dinov3_rules(config: DinoV3Config, names: set, prefix: str = "") -> List[Rule]:
  """Rules from a transformers DINOv3 ViT checkpoint (tensor `names`) to `DinoV3` params.

  A bias the checkpoint lacks (`key_bias=False` in the releases) is loaded as zeros; the
  config check has made sure config.json says it has none.
  """
  block_root = prefix + ("model.layer" if any(n.startswith(prefix + "model.layer.")
                                              for n in names) else "layer")
  heads_in, bias_in, heads_out = _heads(config)

  def block(i: int) -> List[Tuple[str, Tuple[str, ...], Any]]:
    b = f"{block_root}.{i}."
    entries = []
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
      entries += [(f"{ours}/scale", (f"{b}{theirs}.weight",), identity),
                  (f"{ours}/bias", (f"{b}{theirs}.bias",), identity)]
    for ours, theirs, weight, bias, shape in (
        ("attn/query", "attention.q_proj", heads_in, bias_in, (config.num_heads,
                                                               config.head_dim)),
        ("attn/key", "attention.k_proj", heads_in, bias_in, (config.num_heads,
                                                             config.head_dim)),
        ("attn/value", "attention.v_proj", heads_in, bias_in, (config.num_heads,
                                                               config.head_dim)),
        ("attn/out", "attention.o_proj", heads_out, identity, (config.width,)),
        ("mlp/fc1", "mlp.up_proj", linear, identity, (config.mlp_width,)),
        ("mlp/fc2", "mlp.down_proj", linear, identity, (config.width,))):
      entries.append((f"{ours}/kernel", (f"{b}{theirs}.weight",), weight))
      if f"{b}{theirs}.bias" in names:
        entries.append((f"{ours}/bias", (f"{b}{theirs}.bias",), bias))
      else:  # no bias in the checkpoint: zeros compute the same function
        entries.append((f"{ours}/bias", (), lambda s=shape: np.zeros(s, np.float32)))
    entries += [("ls1/gamma", (f"{b}layer_scale1.lambda1",), identity),
                ("ls2/gamma", (f"{b}layer_scale2.lambda1",), identity)]
    return entries

  e = prefix + "embeddings."
  rules = [Rule.copy("patch_embed/kernel", e + "patch_embeddings.weight", conv2d),
           Rule.copy("patch_embed/bias", e + "patch_embeddings.bias"),
           Rule.copy("cls_token", e + "cls_token"),
           Rule.copy("norm/scale", prefix + "norm.weight"),
           Rule.copy("norm/bias", prefix + "norm.bias")]
  if config.num_registers:
    rules.append(Rule.copy("register_tokens", e + "register_tokens"))
  per_block = [block(i) for i in range(config.depth)]
  for j, (name, sources, transform) in enumerate(per_block[0]):
    if config.scan and sources:
      rules.append(stacked(f"blocks/{name}", [entries[j][1][0] for entries in per_block],
                           transform))
    elif config.scan:
      rules.append(Rule(f"blocks/{name}", (), lambda t=transform: np.stack([t()] * config.depth)))
    else:
      rules += [Rule(f"blocks_{i}/{name}", entries[j][1], entries[j][2])
                for i, entries in enumerate(per_block)]
  return rules


def load_hf_dinov3(path, config: DinoV3Config, *, prefix: str = "",
                   shardings: Optional[Any] = None) -> Dict[str, Any]:
  """Loads a transformers DINOv3 ViT checkpoint (path or opened mapping) -> `DinoV3` params.

  The config.json beside a path is checked against `config` (`dinov3_config_problems`;
  `config_from_hf(path)` builds a matching one). The MAE mask token (and the empty
  register table of a model without registers) is not loaded.
  """
  problems, where = [], "config.json"
  if not isinstance(path, Mapping):
    hf, where = hf_config.read_config(path)
    if hf is None:
      hf_config.warn_unchecked(path, "DINOv3")
    else:
      problems = dinov3_config_problems(hf, config, "config.json")
  source = path if isinstance(path, Mapping) else open_safetensors(path)
  name = "checkpoint" if isinstance(path, Mapping) else f"DINOv3 checkpoint {path}"
  ignore = [re.escape(prefix + "embeddings.mask_token")]
  if not config.num_registers:  # transformers stores an empty [1, 0, D] table
    ignore.append(re.escape(prefix + "embeddings.register_tokens"))
  return load_params(source, hf_dinov3_rules(config, set(source.keys()), prefix),
                     abstract_params(config), ignore=ignore,
                     shardings=shardings, source_name=name, config_problems=problems,
                     config_file=where)


FAMILY = TeacherFamily(
    kind="dinov3", key="dinov3", config_class=DinoV3Config, config_prefix="dinov3",
    module=DinoV3,
    pixel_norm=lambda config: (IMAGENET_MEAN, IMAGENET_STD),
    num_prefix_tokens=lambda config: config.num_prefix_tokens,
    loaders={"hf": load_hf_dinov3},
    presets={
        "dinov3_vitb16": _preset("B/16"),
        "dinov3_vitl16": _preset("L/16"),
        "tiny_dinov3": _preset("mu/16", patch_size=8),  # CPU tests
    },
    default_preset="dinov3_vitl16", tiny_preset="tiny_dinov3")
