"""DINOv2 vision transformer: the frozen alignment teacher and OpenVLA's second tower.

One linen module covers the published DINOv2 family (S/B/L/G, with or without register
tokens), whether it was released through HuggingFace (`Dinov2Model`,
`Dinov2WithRegistersModel`) or timm (`vit_*_patch14_*dinov2`). The token sequence is
`[cls, registers..., patches]` in both. They differ only in which tokens the position
embedding covers: HF and the original DINOv2 code add a `[1, 1+N, D]` table to
`[cls, patches]` and insert the registers afterwards (`posemb_covers_cls=True`), while timm's
`*_reg4_dinov2` models (`no_embed_class=True`) add a `[1, N, D]` table to the patches only
(`posemb_covers_cls=False`).

Parameter names (frozen; `weights/dinov2.py` maps checkpoints onto them):
  patch_embed/{kernel [p,p,C,D], bias}      the patchifying Conv
  cls_token [1,1,D]; register_tokens [1,R,D] (only when R > 0)
  pos_embedding [1,1+N,D] or [1,N,D] (see `posemb_covers_cls`)
  blocks_{i}/...  (looped) or  blocks/... with a leading [depth] axis (scanned):
    norm1/{scale,bias}
    attn/{query,key,value}/{kernel [D,heads,head_dim], bias [heads,head_dim]}
    attn/out/{kernel [heads,head_dim,D], bias [D]}
    ls1/gamma [D]                           layer scale (only when `layer_scale`)
    norm2/{scale,bias}
    mlp/fc1/{kernel [D,F], bias}; mlp/fc2/{kernel [F',D], bias}
      ffn="mlp": F = F' = mlp_dim, exact GELU;
      ffn="swiglu": F = 2*mlp_dim packed as [gate | up], out = fc2(silu(gate) * up).
    ls2/gamma [D]
  norm/{scale,bias}                         final LayerNorm (only when `final_norm`)

Mixed precision: params are float32; matmuls run in `config.dtype`; LayerNorm and the
attention softmax run in float32. The final norm's outputs (`encoded`, `cls`,
`patch_tokens`) are float32, the per-block residual streams are in `config.dtype`.
"""

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import posemb_resample
from vla_jax.models.constraints import shard_batch_axis
from vla_jax.models.patch_embed import PatchEmbed
from vla_jax.typed_config import (from_mapping, require, require_patch_geometry,
                                   require_tower_settings)

_FFNS = ("mlp", "swiglu")
# DINOv2's LayerScale init; checkpoints overwrite it.
_LAYER_SCALE_INIT = 1e-5


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
  """Hyper-parameters of a DINOv2 ViT; see `dinov2_config` for the published sizes.

  Attributes:
    width: token width D.
    depth: number of transformer blocks kept (OpenVLA keeps checkpoint depth - 1).
    num_heads: attention heads; must divide `width`.
    mlp_dim: hidden width of the feed-forward block; None gives 4*width for "mlp" and
      DINOv2's SwiGLU rule round8(int(8*width/3)) for "swiglu".
    patch_size: patch side in pixels.
    image_size: the square input side the position embedding is built for; inputs
      must have exactly this size (checkpoints for another grid are resampled at load).
    channels: input channels.
    num_registers: register tokens between CLS and the patches (0 or 4 when published).
    layer_scale: whether blocks scale their residual branches by learned `gamma`.
    ffn: "mlp" (fc1 -> exact GELU -> fc2) or "swiglu" (DINOv2-g).
    layernorm_eps: epsilon of every LayerNorm.
    posemb_covers_cls: True if the position embedding has a CLS slot ([1,1+N,D], HF and
      original DINOv2); False if it covers the patches only ([1,N,D], timm reg4 models).
    final_norm: apply the final LayerNorm; False for a truncated tower whose consumer
      reads a middle block (OpenVLA), so `encoded` is then the last block's output.
    scan: run blocks with `nn.scan` (params get a leading layer axis).
    remat: rematerialise each block in the backward pass.
    dtype: compute dtype of matmuls ("float32", "bfloat16", "float16").
  """
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: Optional[int] = None
  patch_size: int = 14
  image_size: int = 224
  channels: int = 3
  num_registers: int = 0
  layer_scale: bool = True
  ffn: str = "mlp"
  layernorm_eps: float = 1e-6
  posemb_covers_cls: bool = True
  final_norm: bool = True
  scan: bool = False
  remat: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    require_patch_geometry(self, "dinov2")
    require(isinstance(self.num_registers, int) and self.num_registers >= 0,
            f"dinov2.num_registers must be an integer >= 0, found {self.num_registers!r}.")
    require(self.ffn in _FFNS, f"dinov2.ffn must be one of {_FFNS}, found {self.ffn!r}.")
    require_tower_settings(self, "dinov2", ("layer_scale", "posemb_covers_cls", "final_norm",
                                            "scan", "remat"))

  @property
  def hidden_dim(self) -> int:
    """The feed-forward hidden width F (per SwiGLU branch for "swiglu")."""
    if self.mlp_dim is not None:
      return self.mlp_dim
    if self.ffn == "swiglu":
      return (int(4 * self.width * 2 / 3) + 7) // 8 * 8
    return 4 * self.width

  @property
  def grid_size(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2


_PRESETS: Dict[str, Dict[str, Any]] = {
    "mu/14": dict(width=32, depth=2, num_heads=4, image_size=56),
    "S/14": dict(width=384, depth=12, num_heads=6),
    "B/14": dict(width=768, depth=12, num_heads=12),
    "L/14": dict(width=1024, depth=24, num_heads=16),
    # OpenVLA's tower (timm `vit_large_patch14_reg4_dinov2`, 224 px). OpenVLA reads the
    # second-to-last block: use overrides depth=23, final_norm=False for that.
    "L/14-reg4": dict(width=1024, depth=24, num_heads=16, num_registers=4,
                      posemb_covers_cls=False),
    "G/14": dict(width=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def dinov2_config(variant: str, **overrides) -> DinoV2Config:
  """The published DINOv2 size `variant` ("S/14", "L/14-reg4", ...) with `overrides`."""
  if variant not in _PRESETS:
    raise ConfigError(f"Unknown DINOv2 variant {variant!r}; expected one of "
                      f"{sorted(_PRESETS)}. Pick one of those or build DinoV2Config directly.")
  return from_mapping(DinoV2Config, {**_PRESETS[variant], **overrides}, where="dinov2")


def resample_pos_embedding(posemb: jax.Array, num_prefix: int, grid_size: int,
                           method: str = "bicubic_antialias") -> jax.Array:
  """Resamples a square position-embedding grid to `grid_size`^2 patches.

  Args:
    posemb: [1, num_prefix + G*G, D]; the first `num_prefix` rows (CLS) are kept as is.
    num_prefix: leading non-grid rows (1 if the table covers CLS, else 0).
    grid_size: target patches per side.
    method: one of `posemb_resample.RESAMPLE_METHODS`; the default is timm's
      (antialiased bicubic); HF `Dinov2Model` uses plain "bicubic" (the loaders in
      `vla_jax.weights.dinov2` pick the checkpoint's own).
  Returns:
    [1, num_prefix + grid_size**2, D] in float32.
  """
  return jnp.asarray(posemb_resample.resample_posemb_table(np.asarray(posemb, np.float32),
                                                           num_prefix, grid_size, method))


def _layer_norm(config: DinoV2Config, name: str) -> nn.LayerNorm:
  # float32 statistics whatever the compute dtype.
  return nn.LayerNorm(epsilon=config.layernorm_eps, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch: x * gamma, gamma [D]."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(_LAYER_SCALE_INIT), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with per-head kernels; softmax in float32."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [B, T, D] -> [B, T, D]
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim),
                              dtype=self.dtype, param_dtype=jnp.float32)
    query = dense(name="query")(x)  # [B, T, H, hd]
    key = dense(name="key")(x)
    value = dense(name="value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32) * head_dim ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                           param_dtype=jnp.float32, name="out")(mixed)


class FeedForward(nn.Module):
  """fc1 -> exact GELU -> fc2, or packed SwiGLU: fc2(silu(gate) * up)."""
  hidden_dim: int
  ffn: str = "mlp"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    if self.ffn == "swiglu":
      gate, up = jnp.split(dense(2 * self.hidden_dim, name="fc1")(x), 2, axis=-1)
      h = nn.silu(gate) * up
    else:
      h = nn.gelu(dense(self.hidden_dim, name="fc1")(x), approximate=False)
    return dense(x.shape[-1], name="fc2")(h)


class Block(nn.Module):
  """Pre-norm transformer block with layer scale; returns (x, x) so it can be scanned."""
  config: DinoV2Config

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
    y = FeedForward(config.hidden_dim, config.ffn, dtype, name="mlp")(y)
    if config.layer_scale:
      y = LayerScale(name="ls2")(y)
    x = shard_batch_axis(x + y)
    return x, x


class DinoV2(nn.Module):
  """DINOv2 ViT. `__call__(image [B,H,W,C], train=False) -> (encoded, out)`.

  `out` holds "embedded" ([B,T,D] tokens entering block 0), "block00".. ([B,T,D]
  residual stream after each block, prefix tokens included), "encoded" ([B,T,D] after
  the final norm), "cls" ([B,D]) and "patch_tokens" ([B,N,D], prefix tokens removed),
  with T = num_prefix_tokens + N. DINOv2 has no dropout, so `train` changes nothing; it
  is accepted so every tower has the same call signature.
  """
  config: DinoV2Config

  @staticmethod
  def num_prefix_tokens(config: DinoV2Config) -> int:
    """CLS plus registers: the tokens before the patch tokens."""
    return 1 + config.num_registers

  def _check_image(self, image) -> None:
    config = self.config
    want = f"[batch, {config.image_size}, {config.image_size}, {config.channels}]"
    shape = getattr(image, "shape", None)
    found = f"found shape {tuple(shape) if shape is not None else type(image).__name__}"
    if shape is None or len(shape) != 4:
      raise InputError(f"DinoV2 expects images shaped {want}; {found}. "
                       "Add a batch axis or convert to channels-last.")
    if shape[-1] != config.channels:
      raise InputError(f"DinoV2 expects {config.channels} channels last ({want}); {found}. "
                       "Convert NCHW to NHWC or fix config.channels.")
    if shape[1] != config.image_size or shape[2] != config.image_size:
      raise InputError(f"DinoV2 expects {want} images (the position-embedding grid); "
                       f"{found}. Resize the images or set image_size (checkpoint position "
                       "embeddings are resampled at load time).")
    if not jnp.issubdtype(image.dtype, jnp.floating):
      raise InputError(f"DinoV2 expects float images normalised with ImageNet mean/std; "
                       f"found dtype {image.dtype}. Normalise the pixels first.")

  @nn.compact
  def __call__(self, image, *, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del train  # no dropout in DINOv2
    config = self.config
    self._check_image(image)
    dtype = jnp.dtype(config.dtype)
    width = config.width
    out = {}

    patches = PatchEmbed(width, config.patch_size, dtype=dtype, name="patch_embed")(
        image.astype(dtype))
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, width)  # row-major, like torch's flatten(2)

    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, width), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(dtype), (batch, 1, width))
    posemb_len = config.num_patches + (1 if config.posemb_covers_cls else 0)
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02),
                        (1, posemb_len, width), jnp.float32).astype(dtype)
    if config.posemb_covers_cls:
      x = jnp.concatenate([cls, patches], axis=1) + posemb
      cls, patches = x[:, :1], x[:, 1:]
    else:
      patches = patches + posemb
    prefix = [cls]
    if config.num_registers:
      registers = self.param("register_tokens", nn.initializers.zeros,
                             (1, config.num_registers, width), jnp.float32)
      prefix.append(jnp.broadcast_to(registers.astype(dtype),
                                     (batch, config.num_registers, width)))
    x = jnp.concatenate(prefix + [patches], axis=1)  # [B, T, D]
    out["embedded"] = x

    block = nn.remat(Block, prevent_cse=not config.scan) if config.remat else Block
    if config.scan:
      # In-layer LoRA factors (models/lora.py) are stacked per layer like the params.
      blocks = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                       length=config.depth)
      x, per_block = blocks(config, name="blocks")(x, None)  # per_block: [depth, B, T, D]
      for i in range(config.depth):
        out[f"block{i:02d}"] = per_block[i]
    else:
      for i in range(config.depth):
        x, _ = block(config, name=f"blocks_{i}")(x)
        out[f"block{i:02d}"] = x

    if config.final_norm:
      x = _layer_norm(config, "norm")(x)
    out["encoded"] = x
    num_prefix = self.num_prefix_tokens(config)
    out["cls"] = x[:, 0]
    out["patch_tokens"] = x[:, num_prefix:]
    return x, out


def _is_scanned(params) -> bool:
  return "blocks" in params


def scan_to_loop(params: Dict[str, Any]) -> Dict[str, Any]:
  """Scanned params (`blocks/...` with a leading [depth] axis) -> `blocks_{i}/...`."""
  if not _is_scanned(params):
    raise InputError("scan_to_loop expects scanned DinoV2 params with a 'blocks' entry; "
                     f"found top-level keys {sorted(params)}.")
  params = dict(params)
  stacked = params.pop("blocks")
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def loop_to_scan(params: Dict[str, Any]) -> Dict[str, Any]:
  """Looped params (`blocks_{i}/...`) -> scanned `blocks/...` with a leading [depth] axis."""
  depth = sum(1 for k in params if k.startswith("blocks_"))
  if depth == 0 or _is_scanned(params):
    raise InputError("loop_to_scan expects looped DinoV2 params with 'blocks_0', ...; "
                     f"found top-level keys {sorted(params)}.")
  params = dict(params)
  layers = [params.pop(f"blocks_{i}") for i in range(depth)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params
