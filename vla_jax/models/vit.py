"""SigLIP-style Vision Transformer whose parameter names match big_vision's checkpoints.

The module tree (`embedding`, `pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `MAPHead_0`, `head`) is frozen so that big_vision `.npz`
files (SigLIP, PaliGemma's `img` tower) load by name; HuggingFace and timm layouts are
mapped onto it in `vla_jax/weights/siglip.py`. One `scan` switch stacks the blocks into
`Transformer/encoderblock` with a leading layer axis; `scan_to_loop`/`loop_to_scan`
convert between the two layouts. `ViT.__call__` returns `(x, out)` where `out` holds every
intermediate (stem, each block's residual stream, the encoded sequence, the pooled
features), which is what representation alignment and probing read. Presets, position
embedding resampling (big_vision's method by default; see `posemb_resample`) and an abstract parameter tree for loaders sit beside the model.
"""

import dataclasses
import functools
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import posemb_resample
from vla_jax.models.constraints import shard_batch_axis
from vla_jax.models.patch_embed import PatchEmbed
from vla_jax.typed_config import from_mapping, require, require_patch_geometry

POSEMB_TYPES = ("learn", "sincos2d")
POOL_TYPES = ("map", "gap", "tok", "none")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Hyper-parameters of a ViT; defaults are big_vision's B/16 with a MAP head.

  `gelu_approximate`: big_vision and HF SigLIP use tanh-GELU (True); timm towers (as in
  OpenVLA) use exact GELU (False). `final_norm=False` drops `Transformer/encoder_norm`
  (for towers truncated before the last block, whose output is read un-normalised).
  `dtype` is the compute dtype; parameters are always float32.
  """
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None  # None -> 4 * width.
  num_heads: int = 12
  patch_size: int = 16
  image_size: int = 224
  channels: int = 3
  posemb: str = "learn"  # "learn" | "sincos2d"
  pool_type: str = "map"  # "map" | "gap" | "tok" | "none"
  num_classes: int = 0  # 0 -> no `head`.
  head_zeroinit: bool = True
  gelu_approximate: bool = True
  layernorm_eps: float = 1e-6
  final_norm: bool = True
  scan: bool = False
  remat: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    require_patch_geometry(self, "vit")
    require(isinstance(self.num_classes, int) and self.num_classes >= 0,
            f"vit.num_classes must be an integer >= 0 (0 = no head), got {self.num_classes!r}.")
    require(self.posemb in POSEMB_TYPES,
            f"vit.posemb must be one of {POSEMB_TYPES}, got {self.posemb!r}.")
    require(self.posemb != "sincos2d" or self.width % 4 == 0,
            f"vit.posemb='sincos2d' needs vit.width divisible by 4, got {self.width}.")
    require(self.pool_type in POOL_TYPES,
            f"vit.pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}.")
    require(self.dtype in COMPUTE_DTYPES,
            f"vit.dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.dtype!r}.")
    require(self.layernorm_eps > 0, f"vit.layernorm_eps must be > 0, got {self.layernorm_eps}.")

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_width(self) -> int:
    """The MLP's hidden width, resolving `mlp_dim=None`."""
    return self.mlp_dim or 4 * self.width

  @property
  def compute_dtype(self):
    return COMPUTE_DTYPES[self.dtype]


# Named presets (widths/depths from Table 2 of arXiv:2106.04560; So400m from arXiv:2305.13035).
VIT_VARIANTS: Dict[str, Dict[str, int]] = {
    "mu/16": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=16),  # tests only
    "Ti/16": dict(width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=16),
    "S/16": dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16),
    "B/16": dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16),
    "L/16": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16),
    "So400m/14": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14),
}


def vit_config(variant: str = "So400m/14", **overrides: Any) -> ViTConfig:
  """A preset from `VIT_VARIANTS` with `overrides` applied (unknown keys raise ConfigError)."""
  if variant not in VIT_VARIANTS:
    raise ConfigError(f"Unknown ViT variant {variant!r}; known variants: "
                      f"{', '.join(VIT_VARIANTS)}. Pick one of these or build ViTConfig(...) "
                      "with explicit width/depth/mlp_dim/num_heads/patch_size.")
  return from_mapping(ViTConfig, {**VIT_VARIANTS[variant], **overrides}, where="vit")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.) -> jax.Array:
  """Fixed 2D sin-cos position embedding (MoCo v3): [1, h * w, width] float32."""
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1. / (temperature ** omega)
  y = jnp.einsum("m,d->md", y.reshape(-1), omega)
  x = jnp.einsum("m,d->md", x.reshape(-1), omega)
  embedding = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return embedding[None].astype(jnp.float32)


def _layer_norm(config: ViTConfig, name: str, x: jax.Array) -> jax.Array:
  """LayerNorm computed in float32 (for stability in bf16), returned in x's dtype."""
  y = nn.LayerNorm(epsilon=config.layernorm_eps, dtype=jnp.float32, name=name)(x)
  return y.astype(x.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with big_vision's `query/key/value/out` params.

  Kernels: query/key/value [D, heads, head_dim], out [heads, head_dim, D]; the softmax
  runs in float32 whatever the compute dtype.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array) -> jax.Array:
    """[B, Lq, D], [B, Lkv, D] -> [B, Lq, D]."""
    cfg = self.config
    dtype = cfg.compute_dtype
    project = functools.partial(
        nn.DenseGeneral, features=(cfg.num_heads, cfg.head_dim), axis=-1, dtype=dtype,
        kernel_init=nn.initializers.xavier_uniform())
    query = project(name="query")(inputs_q)  # [B, Lq, H, hd]
    key = project(name="key")(inputs_kv)  # [B, Lkv, H, hd]
    value = project(name="value")(inputs_kv)
    query = query * jnp.asarray(1.0 / math.sqrt(cfg.head_dim), dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.DenseGeneral(features=cfg.width, axis=(-2, -1), dtype=dtype,
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(mixed)


class MlpBlock(nn.Module):
  """Dense(mlp_width) -> GELU -> Dense(width), as `Dense_0`/`Dense_1`."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D]."""
    cfg = self.config
    dense = functools.partial(nn.Dense, dtype=cfg.compute_dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    x = dense(cfg.mlp_width, name="Dense_0")(x)
    x = nn.gelu(x, approximate=cfg.gelu_approximate)
    return dense(cfg.width, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block; returns (x, x) so it can serve as a scan body."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """[B, L, D] -> ([B, L, D] carry, [B, L, D] this block's output)."""
    cfg = self.config
    y = _layer_norm(cfg, "LayerNorm_0", x)
    x = x + MultiHeadAttention(cfg, name="MultiHeadDotProductAttention_0")(y, y)
    y = _layer_norm(cfg, "LayerNorm_1", x)
    x = shard_batch_axis(x + MlpBlock(cfg, name="MlpBlock_0")(y))
    return x, x


class Encoder(nn.Module):
  """`depth` blocks (looped `encoderblock_{i}` or scanned `encoderblock`) + `encoder_norm`."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """[B, L, D] -> (encoded [B, L, D], {"blockNN": [B, L, D]})."""
    cfg = self.config
    block_cls = Encoder1DBlock
    if cfg.remat:
      # Under scan, CSE cannot merge recomputation across iterations, so skip its barrier.
      block_cls = nn.remat(block_cls, prevent_cse=not cfg.scan)
    out = {}
    if cfg.scan:
      # In-layer LoRA factors (models/lora.py) are stacked per layer like the params.
      blocks = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0},
                       split_rngs={"params": True}, length=cfg.depth)
      x, per_layer = blocks(cfg, name="encoderblock")(x)  # per_layer: [depth, B, L, D]
      for i in range(cfg.depth):
        out[f"block{i:02d}"] = per_layer[i]
    else:
      for i in range(cfg.depth):
        x, out[f"block{i:02d}"] = block_cls(cfg, name=f"encoderblock_{i}")(x)
    if cfg.final_norm:
      x = _layer_norm(cfg, "encoder_norm", x)
    return x, out


class MAPHead(nn.Module):
  """Multihead attention pooling: one learned `probe` query attends over the sequence."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, D]."""
    cfg = self.config
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, cfg.width),
                       jnp.float32)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, cfg.width))
    x = MultiHeadAttention(cfg, name="MultiHeadDotProductAttention_0")(probe, x)
    y = _layer_norm(cfg, "LayerNorm_0", x)
    x = x + MlpBlock(cfg, name="MlpBlock_0")(y)
    return x[:, 0]


def check_image(image: Any, config: ViTConfig) -> None:
  """Raises InputError unless `image` is float [B, image_size, image_size, channels]."""
  shape = tuple(getattr(image, "shape", ()))
  size, channels = config.image_size, config.channels
  want = f"[batch, {size}, {size}, {channels}]"
  if len(shape) != 4:
    raise InputError(f"ViT expects images shaped {want} (NHWC), got shape {shape}. Add a "
                     "batch axis and put channels last.")
  if shape[3] != channels:
    raise InputError(f"ViT expects {channels} channels ({want}), got shape {shape}. Convert "
                     f"images to {channels} channels (channels last), or set vit.channels.")
  if shape[1] != size or shape[2] != size:
    raise InputError(
        f"ViT expects {size}x{size} images ({want}), got shape {shape}. Resize images to "
        f"{size}x{size}, or set vit.image_size to the new (square, multiple of "
        f"{config.patch_size}) size and resample pos_embedding when loading (the loaders in "
        "vla_jax.weights.siglip do this).")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise InputError(f"ViT expects float images normalised to [-1, 1], got dtype "
                     f"{image.dtype}. Convert with `image / 127.5 - 1`.")


class ViT(nn.Module):
  """Vision Transformer; `__call__(image) -> (x, out)`.

  `out` keys: "stem" [B, h, w, D], "with_posemb" [B, N, D], "block00".."blockNN" (the
  residual stream after each block, [B, L, D]), "encoded" [B, L, D] (after encoder_norm;
  L = N, or N + 1 with the "tok" pool whose class token comes first), "pre_logits"
  [B, D] (pooled; absent for pool_type "none"), "logits" (if num_classes).
  x = logits if there is a head, else pre_logits if pooled, else encoded.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """image: [B, H, W, C] float, normalised to [-1, 1]; H = W = config.image_size."""
    del train  # No dropout or stochastic depth; the flag keeps big_vision's signature.
    cfg = self.config
    check_image(image, cfg)
    dtype = cfg.compute_dtype
    out = {}
    p = cfg.patch_size
    x = out["stem"] = PatchEmbed(cfg.width, p, dtype=dtype, name="embedding")(
        image.astype(dtype))
    batch, h, w, width = x.shape
    x = jnp.reshape(x, (batch, h * w, width))

    if cfg.posemb == "learn":
      posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                          (1, h * w, width), jnp.float32)
    else:
      posemb = posemb_sincos_2d(h, w, width)
    x = out["with_posemb"] = x + posemb.astype(dtype)

    if cfg.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, width)), x], axis=1)

    x, blocks = Encoder(cfg, name="Transformer")(x)
    out.update(blocks)
    out["encoded"] = x

    if cfg.pool_type == "map":
      x = MAPHead(cfg, name="MAPHead_0")(x)
    elif cfg.pool_type == "gap":
      x = jnp.mean(x.astype(jnp.float32), axis=1).astype(dtype)
    elif cfg.pool_type == "tok":
      x = x[:, 0]
    if cfg.pool_type != "none":
      out["pre_logits"] = x

    if cfg.num_classes:
      init = {"kernel_init": nn.initializers.zeros} if cfg.head_zeroinit else {}
      x = out["logits"] = nn.Dense(cfg.num_classes, dtype=dtype, name="head", **init)(x)
    return x, out


def abstract_params(config: ViTConfig) -> Dict[str, Any]:
  """The model's params as a nested dict of `jax.ShapeDtypeStruct` (no memory, no compute)."""
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                               jnp.float32)
  variables = jax.eval_shape(ViT(config).init, jax.random.key(0), image)
  return variables["params"]


def _stack(arrays):
  """Stacks on a new axis 0, staying in numpy when given numpy (e.g. while loading)."""
  if all(isinstance(a, np.ndarray) for a in arrays):
    return np.stack(arrays)
  return jnp.stack(arrays)


def _transformer(params: Mapping[str, Any]) -> Dict[str, Any]:
  if "Transformer" not in params:
    raise InputError(f"Expected ViT params with a 'Transformer' subtree, got top-level keys "
                     f"{sorted(params)}. Pass the ViT's own params (e.g. params['img']).")
  return dict(params["Transformer"])


def scan_to_loop(params: Mapping[str, Any], depth: int) -> Dict[str, Any]:
  """Scanned layout (`Transformer/encoderblock`, leaves [depth, ...]) -> `encoderblock_{i}`.

  Works on a full ViT params dict; keys outside `Transformer` are returned unchanged.
  """
  transformer = _transformer(params)
  if "encoderblock" not in transformer:
    raise InputError("scan_to_loop expects scanned params (Transformer/encoderblock), got "
                     f"Transformer keys {sorted(transformer)}; they may already be looped.")
  stacked = transformer.pop("encoderblock")
  lengths = {int(np.shape(leaf)[0]) for leaf in jax.tree.leaves(stacked)}
  if lengths != {depth}:
    raise InputError(f"scan_to_loop: expected a leading layer axis of {depth}, found "
                     f"{sorted(lengths)}. Pass the depth the params were built with.")
  for i in range(depth):
    transformer[f"encoderblock_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return {**params, "Transformer": transformer}


def loop_to_scan(params: Mapping[str, Any], depth: int) -> Dict[str, Any]:
  """Looped layout (`Transformer/encoderblock_{i}`) -> scanned `encoderblock` [depth, ...].

  Works on a full ViT params dict; keys outside `Transformer` are returned unchanged.
  """
  transformer = _transformer(params)
  found = sorted(k for k in transformer if k.startswith("encoderblock_"))
  wanted = [f"encoderblock_{i}" for i in range(depth)]
  if sorted(wanted) != found:
    raise InputError(f"loop_to_scan: expected blocks encoderblock_0..{depth - 1}, found "
                     f"{found or 'none'}. Pass the depth the params were built with.")
  blocks = [transformer.pop(name) for name in wanted]
  transformer["encoderblock"] = jax.tree.map(lambda *leaves: _stack(leaves), *blocks)
  return {**params, "Transformer": transformer}


def resample_posemb(posemb: Any, new_grid: int,
                    method: str = "bilinear_align_corners") -> jax.Array:
  """Resizes a square grid of position embeddings (high-res fine-tuning).

  Args:
    posemb: [1, N, D] with N = old_grid ** 2.
    new_grid: patches per side wanted.
    method: one of `posemb_resample.RESAMPLE_METHODS`; the default is big_vision's
      (`scipy.ndimage.zoom(order=1)`); HF and timm checkpoints use their own (the
      loaders in `vla_jax.weights.siglip` pick it).
  Returns:
    [1, new_grid ** 2, D] float32 (the input itself, as float32, if the grid matches).
  """
  posemb = jnp.asarray(posemb, jnp.float32)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise InputError(f"resample_posemb expects [1, N, D], got shape {posemb.shape}.")
  num = posemb.shape[1]
  old_grid = math.isqrt(num)
  if old_grid * old_grid != num:
    raise InputError(f"resample_posemb needs a square grid of embeddings, but N={num} is not "
                     "a square (a class-token embedding mixed in?). Strip it first.")
  if old_grid == new_grid:
    return posemb
  return jnp.asarray(posemb_resample.resample_posemb_table(np.asarray(posemb), 0, new_grid,
                                                           method))
