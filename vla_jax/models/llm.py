"""Decoder-only language model of the Llama and Gemma families, with cheap layer capture.

One `LLM` module covers Llama-2 (OpenVLA's backbone) and Gemma-1 (PaliGemma's): pre-norm
blocks of RMSNorm -> RoPE attention with grouped-query heads -> RMSNorm -> gated MLP. The
families differ only where `config.family` says so: Gemma scales token embeddings by
sqrt(width) in `embed` (not other inputs such as visual tokens, as big_vision and
transformers >= 5 do), stores RMSNorm scales as offsets from one (`x * (1 + scale)`), uses a
tanh-GELU gate and ties the output projection to the embedding table; Llama uses SiLU
and a separate `lm_head`. Besides logits the model returns the final-normed hidden
states and, on request, the residual stream after `capture_layer` blocks (one layer, or a
tuple of them) at a slice of positions (the visual tokens, for alignment) without stacking
every layer's activations.

Decoding with a KV cache: `init_kv_cache` allocates fixed-size key/value buffers
(`KVCache`, [B, K, max_len, hd] per layer); `__call__(..., kv_cache=cache)` writes the keys
and values of its T new tokens at slots [end, end + T) with `dynamic_update_slice`, lets
them attend to every real token already cached plus, by `attn_mask`, to each other, and
returns the updated cache in `out["kv_cache"]`. One call over the prompt (prefill) and
one call per generated token reproduce the full-sequence forward pass, for causal and
prefix-LM masks alike, because every cached token precedes the new ones.
`vla_jax.models.decode` builds greedy decoding of a VLA on top of this.

Parameter names (frozen; the loaders in `vla_jax.weights.llm` target them):
  embedder/input_embedding                      [V, D]
  layers_{i}/... (looped) or layers/... (scanned, leading axis = depth):
    pre_attention_norm/scale                    [D]
    attn/q_proj/kernel                          [D, H * hd]   (+ /bias if attention_bias)
    attn/k_proj/kernel, attn/v_proj/kernel      [D, K * hd]   (+ /bias if attention_bias)
    attn/o_proj/kernel                          [H * hd, D]   (+ /bias if attention_bias)
    pre_ffw_norm/scale                          [D]
    mlp/gate_proj/kernel, mlp/up_proj/kernel    [D, F]
    mlp/down_proj/kernel                        [F, D]
  final_norm/scale                              [D]
  lm_head/kernel                                [D, V]   (only when embeddings are untied)
with V = vocab_size, D = width, H = num_heads, K = num_kv_heads, hd = head_dim,
F = mlp_dim. Params are always float32; `config.dtype` is the compute dtype.
"""

import dataclasses
import functools
import math
import operator
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.models.constraints import shard_batch_axis
from vla_jax.typed_config import from_mapping, require

FAMILIES = ("llama", "gemma")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
# Masked attention logits: finite, so a row with no valid key gives uniform weights, not NaN.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Hyper-parameters of a Llama- or Gemma-family decoder.

  `num_kv_heads=None` means num_heads (no GQA); `head_dim=None` means width // num_heads;
  `tie_embeddings=None` means the family default (Gemma tied, Llama untied). Read the
  resolved values from `effective_num_kv_heads`, `effective_head_dim` and
  `effective_tie_embeddings`. The Gemma-2 fields exist so that a Gemma-2 config fails
  loudly instead of silently running as Gemma-1.
  """
  family: str = "llama"
  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: Optional[bool] = None
  max_position_embeddings: int = 4096
  attention_bias: bool = False
  scan: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: str = "float32"
  # Gemma-2 features, not implemented: must stay at their defaults.
  attn_logit_softcapping: Optional[float] = None
  final_logit_softcapping: Optional[float] = None
  sliding_window: Optional[int] = None
  query_pre_attn_scalar: Optional[float] = None
  use_post_norms: bool = False

  def __post_init__(self):
    require(self.family in FAMILIES,
            f"llm.family must be one of {FAMILIES}, got {self.family!r}.")
    for key in ("vocab_size", "width", "depth", "num_heads", "mlp_dim",
                "max_position_embeddings"):
      value = getattr(self, key)
      require(isinstance(value, int) and value > 0,
              f"llm.{key} must be a positive integer, got {value!r}.")
    if self.num_kv_heads is not None:
      require(isinstance(self.num_kv_heads, int) and self.num_kv_heads > 0,
              f"llm.num_kv_heads must be a positive integer or None, got {self.num_kv_heads!r}.")
      require(self.num_heads % self.num_kv_heads == 0,
              f"llm.num_heads ({self.num_heads}) must be a multiple of llm.num_kv_heads "
              f"({self.num_kv_heads}): each key/value head serves a whole group of query heads.")
    if self.head_dim is None:
      require(self.width % self.num_heads == 0,
              f"llm.width ({self.width}) must be divisible by llm.num_heads ({self.num_heads}) "
              "when llm.head_dim is None; set llm.head_dim explicitly otherwise.")
    else:
      require(isinstance(self.head_dim, int) and self.head_dim > 0,
              f"llm.head_dim must be a positive integer or None, got {self.head_dim!r}.")
    require(self.effective_head_dim % 2 == 0,
            f"llm.head_dim must be even for rotary embeddings, got {self.effective_head_dim}.")
    require(self.rope_theta > 0, f"llm.rope_theta must be > 0, got {self.rope_theta}.")
    require(self.norm_eps > 0, f"llm.norm_eps must be > 0, got {self.norm_eps}.")
    require(self.dtype in DTYPES, f"llm.dtype must be one of {DTYPES}, got {self.dtype!r}.")
    require(self.remat_policy in REMAT_POLICIES,
            f"llm.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}.")
    gemma2 = {"attn_logit_softcapping": None, "final_logit_softcapping": None,
              "sliding_window": None, "query_pre_attn_scalar": None, "use_post_norms": False}
    for key, default in gemma2.items():
      value = getattr(self, key)
      require(value == default,
              f"llm.{key}={value!r} is a Gemma-2 feature that is not implemented yet; leave it "
              f"at {default!r} (Gemma-1 / PaliGemma-1 and Llama are supported).")

  @property
  def effective_num_kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def effective_head_dim(self) -> int:
    return self.width // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def effective_tie_embeddings(self) -> bool:
    if self.tie_embeddings is None:
      return self.family == "gemma"
    return self.tie_embeddings


_PRESETS: Dict[str, Dict[str, Any]] = {
    "llama2_7b": dict(family="llama", vocab_size=32000, width=4096, depth=32, num_heads=32,
                      mlp_dim=11008, norm_eps=1e-5, max_position_embeddings=4096,
                      tie_embeddings=False),
    # OpenVLA pads Llama-2's vocabulary to a multiple of 64 (32000 -> 32064).
    "openvla_llama2_7b": dict(family="llama", vocab_size=32064, width=4096, depth=32,
                              num_heads=32, mlp_dim=11008, norm_eps=1e-5,
                              max_position_embeddings=4096, tie_embeddings=False),
    # PaliGemma-1's Gemma-2B.
    "gemma_2b": dict(family="gemma", vocab_size=257216, width=2048, depth=18, num_heads=8,
                     num_kv_heads=1, head_dim=256, mlp_dim=16384, norm_eps=1e-6,
                     max_position_embeddings=8192, tie_embeddings=True),
    "tiny_llama": dict(family="llama", vocab_size=256, width=64, depth=2, num_heads=4,
                       num_kv_heads=2, mlp_dim=128, norm_eps=1e-5,
                       max_position_embeddings=4096, tie_embeddings=False),
    "tiny_gemma": dict(family="gemma", vocab_size=256, width=64, depth=2, num_heads=4,
                       num_kv_heads=1, head_dim=32, mlp_dim=128, norm_eps=1e-6,
                       max_position_embeddings=4096, tie_embeddings=True),
}


def llm_config(name: str, **overrides) -> LLMConfig:
  """A named preset (`llama2_7b`, `openvla_llama2_7b`, `gemma_2b`, `tiny_*`) with overrides."""
  if name not in _PRESETS:
    raise ConfigError(f"Unknown LLM preset {name!r}; choose one of {sorted(_PRESETS)}.")
  return from_mapping(LLMConfig, {**_PRESETS[name], **overrides}, where="llm")


# ----------------------------------------------------------------------------- masks


def causal_mask(input_mask: jax.Array) -> jax.Array:
  """[B, T] bool (True = real token) -> [B, T, T] bool: query q may attend key k.

  Causal (k <= q) and never to padding keys.
  """
  length = input_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
  return causal[None] & input_mask.astype(jnp.bool_)[:, None, :]


def prefix_lm_mask(input_mask: jax.Array, prefix_mask: jax.Array) -> jax.Array:
  """Prefix-LM attention: [B, T] input_mask, [B, T] prefix_mask -> [B, T, T] bool.

  Prefix tokens attend bidirectionally among the prefix; the other tokens attend the
  prefix and, causally, each other; nobody attends padding. (big_vision's `mask_ar`
  convention: token groups by cumulative count of non-prefix tokens.) Padding never
  opens a group, so padding inside the sequence (left-padded text after the image)
  does not cut the prefix in two.
  """
  real = input_mask.astype(jnp.bool_)
  autoregressive = (real & jnp.logical_not(prefix_mask.astype(jnp.bool_))).astype(jnp.int32)
  group = jnp.cumsum(autoregressive, axis=1)
  allowed = group[:, None, :] <= group[:, :, None]
  return allowed & input_mask.astype(jnp.bool_)[:, None, :]


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
  """[B, T] bool -> [B, T] int32 positions counting real tokens (0 at the first one).

  Left padding gets position 0, so a left-padded row sees the same positions as unpadded.
  """
  positions = jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1
  return jnp.maximum(positions, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
  """Keys and values of the tokens decoded so far, in fixed-size buffers (a pytree).

  Attributes:
    k, v: keys (after RoPE) and values in the compute dtype, slot s of layer i: a tuple of
      depth [B, K, S, hd] buffers (a looped LLM: each layer updates its own in place), or
      one [depth, B, K, S, hd] array (a scanned LLM, whose layers are one scan body).
    key_mask: [B, S] bool, True at slots that hold a real token; padding and the unused
      slots at and after `end` are False, so nothing ever attends to them.
    end: int32 scalar, the next slot to write. All rows write at the same slot; rows
      whose prompt was shorter simply carry masked padding slots in between, and their
      RoPE positions (given by the caller) skip those slots.
  """
  k: Union[jax.Array, Tuple[jax.Array, ...]]
  v: Union[jax.Array, Tuple[jax.Array, ...]]
  key_mask: jax.Array
  end: jax.Array

  @property
  def size(self) -> int:
    """S, the number of slots (static)."""
    return self.k[0].shape[2]  # layer 0's [B, K, S, hd], stacked or not


def init_kv_cache(config: LLMConfig, batch: int, size: int) -> KVCache:
  """An empty cache of `size` slots per row for `batch` rows (zeros, all slots masked)."""
  if not (isinstance(size, int) and size > 0):
    raise InputError(f"KV cache size must be a positive int (prompt + generated tokens); "
                     f"got {size!r}.")
  if size > config.max_position_embeddings:
    raise InputError(f"KV cache size {size} exceeds llm.max_position_embeddings "
                     f"({config.max_position_embeddings}); decode fewer tokens or use a "
                     "shorter prompt.")
  shape = (batch, config.effective_num_kv_heads, size, config.effective_head_dim)
  dtype = jnp.dtype(config.dtype)
  if config.scan:
    k = v = jnp.zeros((config.depth, *shape), dtype)
  else:
    k = v = tuple(jnp.zeros(shape, dtype) for _ in range(config.depth))
  return KVCache(k=k, v=v,
                 key_mask=jnp.zeros((batch, size), jnp.bool_), end=jnp.zeros((), jnp.int32))


def _cached_attention_mask(attn_mask: jax.Array, cache: KVCache) -> jax.Array:
  """[B, T, T] mask among T new tokens -> [B, T, S] mask over the cache slots.

  A new token attends every real cached token (all of them precede it, which is what
  both the causal and the prefix-LM mask allow) and the new tokens `attn_mask` allows.
  """
  batch, length, _ = attn_mask.shape
  new = jax.lax.dynamic_update_slice(jnp.zeros((batch, length, cache.size), jnp.bool_),
                                     attn_mask, (0, 0, cache.end))
  return cache.key_mask[:, None, :] | new


def _updated_cache(cache: KVCache, k: jax.Array, v: jax.Array,
                   attn_mask: jax.Array) -> KVCache:
  """The cache after a call that wrote its T new tokens' keys `k` / values `v` into the
  buffers (per layer or stacked, as `KVCache` holds them): marks their slots, advances `end`.

  A new slot stays visible to later tokens iff some new token attends to it: padding
  keys are attended by none (`causal_mask` and `prefix_lm_mask` exclude them).
  """
  length = attn_mask.shape[1]
  real = jnp.any(attn_mask, axis=1)  # [B, T]
  return KVCache(k=k, v=v,
                 key_mask=jax.lax.dynamic_update_slice(cache.key_mask, real, (0, cache.end)),
                 end=cache.end + length)


# ----------------------------------------------------------------------------- layers


@functools.lru_cache(maxsize=16)
def _rope_table(size: int, head_dim: int, theta: float) -> Tuple[np.ndarray, np.ndarray]:
  """cos and sin of the rotary angles of positions 0 .. size - 1: float32 [size, hd/2]."""
  inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                           / np.float32(head_dim)))).astype(np.float32)
  angles = (np.arange(size, dtype=np.float32)[:, None] * inv_freq).astype(np.float32)
  # float32 angles, as HF computes them; cos and sin rounded once from float64.
  return (np.cos(angles.astype(np.float64)).astype(np.float32),
          np.sin(angles.astype(np.float64)).astype(np.float32))


def rope_tables(positions: jax.Array, config: "LLMConfig") -> Tuple[jax.Array, jax.Array]:
  """(cos, sin) of the rotary angles of positions [B, T]: float32 [B, T, 1, hd/2].

  Looked up in a table of positions 0 .. `max_position_embeddings` (inclusive: PaliGemma
  counts from 1; a position past it reads NaN, never a wrong angle). Why a table: with
  the sine and cosine computed in the graph, XLA:CPU fused them into each layer's
  rotation and evaluated them again for every head of q and k, forward and backward (16
  fusions, 9 ms of a 4-layer training step at 64 px; 1.7 ms as table reads).
  """
  cos, sin = _rope_table(config.max_position_embeddings + 1, config.effective_head_dim,
                         float(config.rope_theta))
  lookup = lambda table: jnp.take(jnp.asarray(table), positions, axis=0, mode="fill",
                                  fill_value=jnp.nan)[:, :, None, :]
  return lookup(cos), lookup(sin)


def rotate(x: jax.Array, tables: Tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding of x [B, T, N, hd] by `rope_tables`, HF "rotate half" layout."""
  cos, sin = (table.astype(x.dtype) for table in tables)
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32; Gemma scales by (1 + scale), Llama by scale."""
  family: str
  eps: float

  @nn.compact
  def __call__(self, x):
    gemma = self.family == "gemma"
    init = nn.initializers.zeros if gemma else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if gemma:
      return (normed * (1.0 + scale)).astype(x.dtype)
    # Llama rounds to the compute dtype before the scale (as HF does).
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def _write_slots(buffer: jax.Array, new: jax.Array, layer: Optional[jax.Array],
                 end: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Writes T new keys (or values) [B, T, K, hd] at slot `end` of one layer's cache.

  `buffer` is that layer's [B, K, S, hd] (layer None) or every layer's stacked
  [depth, B, K, S, hd] (`layer` indexes it). Returns (the updated buffer, this layer's
  [B, K, S, hd] slice of it, which the attention then reads).
  """
  new = new.astype(buffer.dtype).transpose(0, 2, 1, 3)
  if layer is None:
    buffer = jax.lax.dynamic_update_slice(buffer, new, (0, 0, end, 0))
    return buffer, buffer
  buffer = jax.lax.dynamic_update_slice(buffer, new[None], (layer, 0, 0, end, 0))
  return buffer, jax.lax.dynamic_index_in_dim(buffer, layer, 0, keepdims=False)


class Attention(nn.Module):
  """Multi-head attention with RoPE and grouped key/value heads.

  Returns (output [B, T, D], the updated (k, v) buffers or None). With `cache` =
  (k, v, layer, end), k and v this layer's own [B, K, S, hd] buffers (layer None) or every
  layer's stacked [depth, B, K, S, hd] ones (a scanned LLM; `layer` indexes them), the T
  new keys and values are written into slots [end, end + T) and the queries attend over
  all S slots (`attn_mask` is then [B, T, S]). Attending over the buffer just written lets
  XLA update the cache in place: a copy of it per layer or per generated token costs more
  than the step's arithmetic at small widths.
  """
  config: LLMConfig

  @nn.compact
  def __call__(self, x, attn_mask, rope, cache=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    heads, kv_heads, head_dim = cfg.num_heads, cfg.effective_num_kv_heads, cfg.effective_head_dim
    batch, length, _ = x.shape
    dense = lambda features, name: nn.Dense(
        features, use_bias=cfg.attention_bias, dtype=dtype, param_dtype=jnp.float32, name=name)
    q = dense(heads * head_dim, "q_proj")(x).reshape(batch, length, heads, head_dim)
    k = dense(kv_heads * head_dim, "k_proj")(x).reshape(batch, length, kv_heads, head_dim)
    v = dense(kv_heads * head_dim, "v_proj")(x).reshape(batch, length, kv_heads, head_dim)
    q = rotate(q, rope)
    k = rotate(k, rope)
    # Query head h reads kv head h // group (HF's repeat_kv order), so split H = K * G.
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, head_dim) * jnp.asarray(head_dim ** -0.5, dtype)
    keys = "bskh"  # the layout of k and v: [B, S, K, hd]
    new_cache = None
    if cache is not None:
      # The cache holds slots next to hd, [B, K, S, hd]: what the attention matmuls read,
      # with no per-step transpose of the whole cache.
      cache_k, cache_v, layer, end = cache
      cache_k, k = _write_slots(cache_k, k, layer, end)
      cache_v, v = _write_slots(cache_v, v, layer, end)
      keys, new_cache = "bksh", (cache_k, cache_v)
    if cache is not None and length == 1:
      # One new token (a decoding step): a plain batched matmul, queries first,
      # [B, K, G, hd] @ k^T. Left to einsum, XLA:CPU computed it as k @ q^T and transposed
      # the output, a third slower. (Over a whole prompt einsum's order is the faster one.)
      logits = jax.lax.dot_general(q.reshape(batch, kv_heads, group, head_dim), k,
                                   (((3,), (3,)), ((0, 1), (0, 1))))[:, :, :, None]
    else:
      logits = jnp.einsum(f"bqkgh,{keys}->bkgqs", q, k)
    logits = jnp.where(attn_mask[:, None, None, :, :], logits.astype(jnp.float32), _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if cache is None:
      encoded = jnp.einsum("bkgqs,bskh->bqkgh", probs, v)
    else:
      # A plain batched matmul over the cache, [B, K, G*T, S] @ [B, K, S, hd]; asking
      # for the [B, T, K, G, hd] order inside the einsum makes XLA:CPU compute it
      # transposed, at twice the time of the whole q @ k step.
      encoded = jnp.einsum("bkgqs,bksh->bkgqh", probs, v).transpose(0, 3, 1, 2, 4)
    encoded = encoded.reshape(batch, length, heads * head_dim)
    return dense(x.shape[-1], "o_proj")(encoded), new_cache


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SiLU for Llama, tanh-GELU for Gemma."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dense = lambda features, name: nn.Dense(
        features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)
    gate = dense(cfg.mlp_dim, "gate_proj")(x)
    if cfg.family == "gemma":
      gate = nn.gelu(gate, approximate=True)
    else:
      gate = nn.silu(gate)
    return dense(x.shape[-1], "down_proj")(gate * dense(cfg.mlp_dim, "up_proj")(x))


class Block(nn.Module):
  """One decoder block, written as a scan body over carry (x, captured, blocks_done, cache).

  `captured` is None unless a scanned model captures layers: then it is a tuple of
  [B, count, D] buffers, buffer j overwritten (by a select on the traced counter) when
  `blocks_done` reaches `capture_layers[j]`. `cache` is None or the (k, v) buffers this
  block writes its new tokens into from slot `cache_end`: its own [B, K, S, hd] ones (a
  looped LLM) or every layer's [depth, ...] ones, of which it writes layer `blocks_done`
  (a scanned LLM; see Attention). Returns (new carry, x if `emit_hidden` else None).
  """
  config: LLMConfig
  capture_layers: Tuple[int, ...] = ()
  capture_start: int = 0
  emit_hidden: bool = False

  @nn.compact
  def __call__(self, carry, attn_mask, rope, cache_end=None):
    cfg = self.config
    x, captured, blocks_done, cache = carry
    h = RMSNorm(cfg.family, cfg.norm_eps, name="pre_attention_norm")(x)
    layer = None if cache is None or cache[0].ndim == 4 else blocks_done  # stacked: index it
    attended, cache = Attention(cfg, name="attn")(
        h, attn_mask, rope, None if cache is None else (*cache, layer, cache_end))
    x = x + attended
    h = RMSNorm(cfg.family, cfg.norm_eps, name="pre_ffw_norm")(x)
    x = shard_batch_axis(x + MLP(cfg, name="mlp")(h))
    blocks_done = blocks_done + 1
    if captured is not None:
      window = jax.lax.slice_in_dim(x, self.capture_start,
                                    self.capture_start + captured[0].shape[1], axis=1)
      captured = tuple(jnp.where(blocks_done == layer, window, buffer)
                       for layer, buffer in zip(self.capture_layers, captured))
    return (x, captured, blocks_done, cache), x if self.emit_hidden else None


class Embedder(nn.Module):
  """The token embedding table `input_embedding` [V, D], also the tied output layer."""
  vocab_size: int
  width: int

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", nn.initializers.normal(stddev=self.width ** -0.5),
        (self.vocab_size, self.width), jnp.float32)

  def encode(self, tokens):
    return self.input_embedding[tokens]

  def decode(self, x):
    return x @ self.input_embedding.astype(x.dtype).T


# ----------------------------------------------------------------------------- model


class LLM(nn.Module):
  """Llama/Gemma decoder. `embed` looks tokens up; `__call__` runs the stack on embeddings."""
  config: LLMConfig

  def setup(self):
    self.embedder = Embedder(self.config.vocab_size, self.config.width)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int32 -> [B, T, D] token embeddings in the compute dtype.

    Gemma multiplies token rows by sqrt(width) here; embeddings of other inputs (a VLA's
    visual tokens) enter `__call__` unscaled, as in big_vision and transformers >= 5.
    """
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    dtype = jnp.dtype(self.config.dtype)
    x = self.embedder.encode(tokens).astype(dtype)
    if self.config.family == "gemma":
      x = x * jnp.asarray(math.sqrt(self.config.width), dtype)  # HF rounds the scale to dtype too.
    return x

  def _check_inputs(self, embeddings, attn_mask, positions, capture_layer, capture_slice,
                    kv_cache, logits_at):
    cfg = self.config
    if embeddings.ndim != 3 or embeddings.shape[-1] != cfg.width:
      raise InputError(f"embeddings must be [batch, length, {cfg.width}] (llm.width); got "
                       f"shape {tuple(embeddings.shape)}. Embed token ids with LLM.embed.")
    batch, length, _ = embeddings.shape
    if kv_cache is not None:
      layer_shape = (batch, cfg.effective_num_kv_heads, kv_cache.size, cfg.effective_head_dim)
      shapes = lambda buffers: (tuple(tuple(b.shape) for b in buffers)
                                if isinstance(buffers, tuple) else tuple(buffers.shape))
      expected = (cfg.depth, *layer_shape) if cfg.scan else (layer_shape,) * cfg.depth
      if (shapes(kv_cache.k) != expected or shapes(kv_cache.v) != expected
          or tuple(kv_cache.key_mask.shape) != (batch, kv_cache.size)):
        layout = ("one stacked array" if cfg.scan
                  else f"a tuple of {cfg.depth} per-layer arrays")
        raise InputError(f"kv_cache holds keys {shapes(kv_cache.k)} and key_mask "
                         f"{tuple(kv_cache.key_mask.shape)}; this call needs keys "
                         f"{layer_shape} (batch, kv_heads, slots, head_dim) per layer, as "
                         f"{layout} (llm.scan={cfg.scan}). Build it with "
                         "init_kv_cache(config, batch, size).")
      if length > kv_cache.size:
        raise InputError(f"{length} new tokens do not fit a KV cache of {kv_cache.size} "
                         "slots; allocate a larger cache.")
      if positions is None:
        raise InputError("decoding with kv_cache needs explicit positions [B, T] (the RoPE "
                         "position of each new token, e.g. positions_from_mask of the prompt "
                         "and one more per generated token).")
    if logits_at is not None and (logits_at.ndim != 2 or logits_at.shape[0] != batch
                                  or not jnp.issubdtype(logits_at.dtype, jnp.integer)):
      raise InputError(f"logits_at must be int [{batch}, K] sequence indices; got "
                       f"{logits_at.dtype} {tuple(logits_at.shape)}.")
    if length > cfg.max_position_embeddings:
      raise InputError(f"sequence length {length} exceeds llm.max_position_embeddings "
                       f"({cfg.max_position_embeddings}); shorten the input or raise the limit.")
    if attn_mask is not None:
      if tuple(attn_mask.shape) != (batch, length, length) or attn_mask.dtype != jnp.bool_:
        raise InputError(f"attn_mask must be bool [{batch}, {length}, {length}] (query, key); "
                         f"got {attn_mask.dtype} {tuple(attn_mask.shape)}. Build it with "
                         "causal_mask or prefix_lm_mask.")
    if positions is not None and tuple(positions.shape) != (batch, length):
      raise InputError(f"positions must be [{batch}, {length}] ints; got shape "
                       f"{tuple(positions.shape)}. Use positions_from_mask(input_mask).")
    if capture_slice is None:
      capture_slice = (0, length)
    try:
      start, count = (operator.index(v) for v in capture_slice)
    except (TypeError, ValueError):
      raise InputError(f"capture_slice must be a static (start, count) pair of ints; got "
                       f"{capture_slice!r}.") from None
    layers = ()
    if capture_layer is not None:
      def as_index(layer):
        try:
          return operator.index(layer)
        except TypeError:
          return layer  # not an int (e.g. a tracer): rejected just below.
      several = isinstance(capture_layer, (tuple, list))
      layers = tuple(as_index(layer) for layer in
                     (capture_layer if several else (capture_layer,)))
      if not layers or any(not isinstance(layer, int) or not 0 <= layer <= cfg.depth
                           for layer in layers):
        raise InputError(f"capture_layer must be a static int in [0, {cfg.depth}] (0 = input "
                         f"embeddings, k = output of block k, llm.depth = {cfg.depth}), or a "
                         f"non-empty tuple of them; got {capture_layer!r}.")
      if not (0 <= start and 0 < count and start + count <= length):
        raise InputError(f"capture_slice=(start={start}, count={count}) must lie inside the "
                         f"{length} positions of the sequence (start >= 0, count >= 1, "
                         "start + count <= length).")
    return layers, (start, count)

  @nn.compact
  def __call__(self, embeddings: jax.Array, *, attn_mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               capture_layer: Optional[Union[int, Sequence[int]]] = None,
               capture_slice: Optional[Tuple[int, int]] = None,
               return_all_hidden: bool = False, kv_cache: Optional[KVCache] = None,
               logits_at: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, Any]]:
    """Runs the decoder on embeddings.

    Args:
      embeddings: [B, T, D] input embeddings (text rows from `embed`, or visual tokens);
        used as given (Gemma's sqrt(D) scale is applied by `embed`).
      attn_mask: [B, T, T] bool (query, key); None = causal over all T.
      positions: [B, T] int32 RoPE positions; None = arange(T).
      capture_layer: static; return the residual stream after this many blocks
        (0 = input embeddings, depth = last block's output before the final norm); a
        tuple of such indices captures each of them (alignment at several layers).
      capture_slice: static (start, count) positions to capture; None = (0, T).
      return_all_hidden: also return all depth + 1 residual streams (analysis only).
      kv_cache: decode incrementally: the T tokens are appended to this cache (written at
        slots [end, end + T); the caller keeps end + T <= size), attend to every real
        token already in it and, by `attn_mask`, to each other. `positions` is then
        required. A new slot stays visible to later calls iff some new token attends to
        it (padding does not, with `causal_mask` / `prefix_lm_mask`).
      logits_at: [B, K] int sequence indices: compute logits only there (a prefill needs
        one row per sequence, not T x vocab).
    Returns:
      logits [B, T, V] float32 ([B, K, V] with logits_at), and out with "final_hidden"
      [B, T, D] (final-normed), "captured" [B, count, D] if capture_layer is an int (a
      tuple of them, in capture_layer's order, if it is a tuple),
      "hidden" [depth + 1, B, T, D] if return_all_hidden (entry depth is before the final
      norm), "kv_cache" (the updated KVCache) if kv_cache was given.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    several = isinstance(capture_layer, (tuple, list))
    capture_layers, capture_slice = self._check_inputs(
        embeddings, attn_mask, positions, capture_layer, capture_slice, kv_cache, logits_at)
    batch, length, _ = embeddings.shape
    if attn_mask is None:
      attn_mask = causal_mask(jnp.ones((batch, length), jnp.bool_))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    rope = rope_tables(positions, cfg)
    layer_mask, cache_end, cache = attn_mask, None, None
    if kv_cache is not None:
      layer_mask = _cached_attention_mask(attn_mask, kv_cache)
      cache_end, cache = kv_cache.end, (kv_cache.k, kv_cache.v)

    x = embeddings.astype(dtype)
    x_in = x
    start, count = capture_slice
    # One buffer per captured layer; layer 0 (the input embeddings) is captured already.
    captured = (tuple(x[:, start:start + count] for _ in capture_layers) if capture_layers
                else None)

    block = Block
    if cfg.remat:
      block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                       prevent_cse=not cfg.scan)
    blocks_done = jnp.zeros((), jnp.int32)
    if cfg.scan:
      # The cache rides in the carry; each layer writes its own slice of it.
      # In-layer LoRA factors (models/lora.py) are stacked per layer like the params.
      layers = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                       length=cfg.depth)(
                           cfg, capture_layers=capture_layers, capture_start=start,
                           emit_hidden=return_all_hidden, name="layers")
      (x, captured, _, cache), stacked = layers(
          (x, captured, blocks_done, cache), layer_mask, rope, cache_end)
      if return_all_hidden:
        all_hidden = jnp.concatenate([x_in[None], stacked], axis=0)
    else:
      hidden, new_k, new_v = [x_in], [], []
      for i in range(cfg.depth):
        layer_cache = None if cache is None else (cache[0][i], cache[1][i])
        (x, _, blocks_done, layer_cache), _ = block(cfg, name=f"layers_{i}")(
            (x, None, blocks_done, layer_cache), layer_mask, rope, cache_end)
        if cache is not None:
          new_k.append(layer_cache[0])
          new_v.append(layer_cache[1])
        if i + 1 in capture_layers:
          captured = tuple(x[:, start:start + count] if layer == i + 1 else buffer
                           for layer, buffer in zip(capture_layers, captured))
        if return_all_hidden:
          hidden.append(x)
      if return_all_hidden:
        all_hidden = jnp.stack(hidden, axis=0)
      if cache is not None:
        cache = (tuple(new_k), tuple(new_v))

    if self.is_initializing():
      # Untied models never read the table in __call__; `init` must still create it.
      self.embedder.encode(jnp.zeros((1, 1), jnp.int32))
    final_hidden = RMSNorm(cfg.family, cfg.norm_eps, name="final_norm")(x)
    read_out = final_hidden
    if logits_at is not None:
      read_out = jnp.take_along_axis(final_hidden, logits_at[:, :, None].astype(jnp.int32),
                                     axis=1)
    if cfg.effective_tie_embeddings:
      logits = self.embedder.decode(read_out)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                        name="lm_head")(read_out)
    out = {"final_hidden": final_hidden}
    if kv_cache is not None:
      out["kv_cache"] = _updated_cache(kv_cache, *cache, attn_mask)
    if capture_layers:
      out["captured"] = captured if several else captured[0]
    if return_all_hidden:
      out["hidden"] = all_hidden
    return logits.astype(jnp.float32), out


# ----------------------------------------------------------------------------- layouts


def scan_to_loop(params: Dict[str, Any], depth: int) -> Dict[str, Any]:
  """LLM params with scanned `layers` (leading axis depth) -> looped `layers_{i}`.

  `params` is the LLM's params collection (what `variables["params"]` holds).
  """
  if "layers" not in params:
    raise CheckpointError(f"scan_to_loop expects a scanned LLM params tree with a 'layers' "
                          f"entry; got keys {sorted(params)}. Is it already looped?")
  layers = params["layers"]
  for leaf in jax.tree.leaves(layers):
    if leaf.shape[:1] != (depth,):
      raise CheckpointError(f"scanned 'layers' leaves must have leading axis depth={depth}; "
                            f"found shape {tuple(leaf.shape)}. Pass the config's depth.")
  looped = {k: v for k, v in params.items() if k != "layers"}
  for i in range(depth):
    looped[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
  return looped


def loop_to_scan(params: Dict[str, Any], depth: int) -> Dict[str, Any]:
  """LLM params with looped `layers_{i}` -> scanned `layers` stacked on axis 0."""
  names = [f"layers_{i}" for i in range(depth)]
  missing = [n for n in names if n not in params]
  extra = sorted(k for k in params if k.startswith("layers_") and k not in names)
  if missing or extra:
    raise CheckpointError(f"loop_to_scan expects looped entries layers_0..layers_{depth - 1}; "
                          f"missing {missing}, unexpected {extra}. Check depth (or is it "
                          "already scanned?).")
  scanned = {k: v for k, v in params.items() if k not in names}
  scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  return scanned
