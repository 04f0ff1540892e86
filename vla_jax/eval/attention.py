"""Where the last text token looks: LLM attention over the visual tokens, as image overlays.

The LLM does not return attention weights, so `attention_probs` recomputes them exactly
from a block's parameters and its input hidden state (`out["hidden"][layer]`): the
pre-attention RMSNorm, q/k projections, RoPE at the sequence positions, grouped-query
scaling and the mask, the same math as `models.llm.Attention` (the test rebuilds the
block's output from these probabilities and checks it against the next hidden state).
`visual_attention` head-averages the last real text token's row at the visual columns
and reshapes it to the patch grid; `normalized_attention` divides the map under a
question ("Do you see the {object}?") by the map under a generic prompt (the paper's
normalisation), and `overlay` draws it on the image.
"""

from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import InputError
from vla_jax.models import llm as llm_lib
from vla_jax.models import vla as vla_lib
from vla_jax.models.vla import VLA

QUESTION = "Do you see the {object}?"
GENERIC_PROMPT = "Describe the image."


def attention_probs(config: llm_lib.LLMConfig, block_params: Dict[str, Any], hidden: jax.Array,
                    attn_mask: jax.Array, positions: jax.Array) -> jax.Array:
  """Attention probabilities of one decoder block.

  Args:
    config: the LLM config (Llama family; Gemma's softcapping is not handled).
    block_params: params of `layers_{i}` (pre_attention_norm, attn).
    hidden: [B, S, D] the block's input (`out["hidden"][i]`).
    attn_mask: [B, S, S] bool; positions: [B, S] int32.
  Returns:
    float32 [B, H, S, S] (query head h reads kv head h // (H / K), as the model does).
  """
  dtype = jnp.dtype(config.dtype)
  heads, kv_heads = config.num_heads, config.effective_num_kv_heads
  head_dim = config.effective_head_dim
  batch, length, _ = hidden.shape
  h = llm_lib.RMSNorm(config.family, config.norm_eps).apply(
      {"params": block_params["pre_attention_norm"]}, hidden.astype(dtype))

  def project(name, count):
    p = block_params["attn"][name]
    out = h @ p["kernel"].astype(dtype) + (p["bias"].astype(dtype) if "bias" in p else 0)
    return out.reshape(batch, length, count, head_dim)

  rope = llm_lib.rope_tables(positions, config)
  q = llm_lib.rotate(project("q_proj", heads), rope)
  k = llm_lib.rotate(project("k_proj", kv_heads), rope)
  group = heads // kv_heads
  q = q.reshape(batch, length, kv_heads, group, head_dim) * jnp.asarray(head_dim ** -0.5, dtype)
  logits = jnp.einsum("bqkgh,bskh->bkgqs", q, k).astype(jnp.float32)
  logits = jnp.where(attn_mask[:, None, None], logits, llm_lib._MASKED_LOGIT)  # pylint: disable=protected-access
  return jax.nn.softmax(logits, axis=-1).reshape(batch, heads, length, length)


def sequence_mask_and_positions(model: VLA, input_mask: jax.Array):
  """(attn_mask [B, S, S], positions [B, S]) the VLA builds internally for a prompt
  (`vla.sequence_layout`; PaliGemma's prompt is its bidirectional prefix)."""
  _, attn_mask, positions = vla_lib.sequence_layout(model.config, input_mask)
  return attn_mask, positions


def visual_attention(model: VLA, params: Any, images: jax.Array, tokens: jax.Array,
                     lengths: jax.Array, layers: Sequence[int]) -> jax.Array:
  """Last text token's head-averaged attention over the visual tokens.

  Args:
    images: uint8 [B, S, S, 3]; tokens: int32 [B, T] right-padded, BOS first (either
      layout: OpenVLA's visual tokens after BOS, PaliGemma's before the text).
    lengths: int32 [B] real tokens per row.
    layers: block indices (0-based: attention inside block i reads hidden[i]).
  Returns:
    float32 [B, len(layers), grid, grid]; the visual part of a row of attention (it does
    not sum to one: the rest goes to BOS and the text).
  """
  cfg = model.config
  for layer in layers:
    if not 0 <= layer < cfg.llm.depth:
      raise InputError(f"attention layers must be in [0, {cfg.llm.depth}), got {layer}.")
  if cfg.llm.scan:
    raise InputError("visual_attention needs looped LLM params (layers_i); build the model "
                     "with model.llm.scan=False (models.llm.scan_to_loop converts params).")
  input_mask = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
  out = model.apply({"params": params}, images, tokens, input_mask, return_all_hidden=True)
  attn_mask, positions = sequence_mask_and_positions(model, input_mask)
  n, start = cfg.num_visual_tokens, cfg.visual_start
  query = lengths - 1 + n  # the last real text token's sequence position
  maps = []
  for layer in layers:
    probs = attention_probs(cfg.llm, params["llm"][f"layers_{layer}"], out["hidden"][layer],
                            attn_mask, positions)
    rows = probs[jnp.arange(probs.shape[0]), :, query]  # [B, H, S]
    maps.append(rows[:, :, start:start + n].mean(axis=1).reshape(-1, cfg.grid, cfg.grid))
  return jnp.stack(maps, axis=1)


_JITTED: Dict[Tuple[Any, Tuple[int, ...]], Any] = {}


def jitted_visual_attention(model: VLA, layers: Sequence[int]):
  """`visual_attention` jitted once per (architecture, layers): fn(params, images, tokens,
  lengths). Checkpoints of one architecture share the compiled program."""
  key = (model.config, tuple(layers))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda params, images, tokens, lengths: visual_attention(
        model, params, images, tokens, lengths, tuple(layers)))
  return _JITTED[key]


def normalized_attention(question_map: np.ndarray, generic_map: np.ndarray,
                         eps: float = 1e-8) -> np.ndarray:
  """question / generic attention, elementwise (the paper's normalisation)."""
  return np.asarray(question_map) / (np.asarray(generic_map) + eps)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """uint8 [S, S, 3] image with a [g, g] map (min-max scaled, jet colours) blended on top."""
  from matplotlib import cm  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  heat = np.asarray(heat, np.float64)
  heat = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
  size = image.shape[0]
  big = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(
      (size, size), Image.BILINEAR), np.float64) / 255.0
  colours = cm.jet(big)[..., :3]
  return (image.astype(np.float64) * (1 - alpha) + colours * 255 * alpha).astype(np.uint8)
