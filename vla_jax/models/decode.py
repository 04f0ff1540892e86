"""Greedy decoding of a VLA's text with a KV cache: embed once, prefill once, one step a token.

`greedy_decode(model, params, images, tokens, input_mask, num_tokens)` is what a user
calls to make a VLA generate (the policy's action tokens, a caption, an answer). It runs
the vision tower(s), projector and text embedding once (`VLA.embed_inputs`), prefills the
LLM's fixed-size KV cache (`llm.init_kv_cache`, prompt + visual tokens + num_tokens - 1
slots) with the whole prefix in one pass, then decodes each further token in one
incremental step inside a `lax.scan`, all in one jitted program (compiled once per model,
shapes and flags). Prompts of different
lengths share one padded buffer: whatever the padding (right padding for OpenVLA, whose
BOS must stay in column 0; left or right for PaliGemma), the next token is read at each
row's last real position, every generated token is written at the same cache slot for all
rows, and the padding slots between stay masked, while RoPE positions count only real
tokens (`llm.positions_from_mask`), so each row decodes exactly as it would alone.

`use_cache=False` decodes by full recomputation instead: for every token it re-runs the
whole model (`VLA.__call__`, vision included) on the prompt with the tokens generated so
far appended; it is the reference the cached path is tested against and the baseline of
`benchmarks/eval_speed.py`.
"""

import functools
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from vla_jax.errors import InputError
from vla_jax.models import llm as llm_lib
from vla_jax.models.vla import VLA


def last_real_index(input_mask: jax.Array) -> jax.Array:
  """[B, S] bool -> [B] int32: index of each row's last True (the token to predict from)."""
  length = input_mask.shape[1]
  return (length - 1 - jnp.argmax(input_mask[:, ::-1], axis=1)).astype(jnp.int32)


def greedy_token(logits: jax.Array) -> jax.Array:
  """[..., V] -> int32 [...]: `jnp.argmax` of the logits (first maximum; first NaN if any).

  As a maximum, then the smallest index that reaches it: XLA:CPU runs the two plain
  reductions in a fraction of the time of argmax's (value, index) pair reduction, which is
  paid once per generated token.
  """
  best = jnp.max(logits, axis=-1, keepdims=True)  # NaN if any logit is NaN
  hits = (logits == best) | jnp.isnan(logits)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hits, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def _check_inputs(model: VLA, tokens, input_mask, prefix_mask, num_tokens: int) -> None:
  if not isinstance(model, VLA):
    raise InputError(f"greedy_decode expects a vla_jax.models.vla.VLA, got {type(model)}.")
  if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise InputError(f"tokens must be int [batch, length] prompt ids; got "
                     f"{getattr(tokens, 'dtype', type(tokens))} {jnp.shape(tokens)}.")
  for name, mask in (("input_mask", input_mask), ("prefix_mask", prefix_mask)):
    if mask is not None and tuple(jnp.shape(mask)) != tuple(tokens.shape):
      raise InputError(f"{name} must have the tokens' shape {tuple(tokens.shape)} (True at "
                       f"real tokens); got {tuple(jnp.shape(mask))}.")
  if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
    raise InputError(f"num_tokens must be a positive int (how many tokens to generate); "
                     f"got {num_tokens!r}.")
  llm = model.config.llm
  needed = tokens.shape[1] + model.config.num_visual_tokens + num_tokens
  if needed > llm.max_position_embeddings:
    raise InputError(f"prompt ({tokens.shape[1]} text + {model.config.num_visual_tokens} "
                     f"visual tokens) + num_tokens={num_tokens} = {needed} positions exceed "
                     f"llm.max_position_embeddings ({llm.max_position_embeddings}); generate "
                     "fewer tokens or shorten the prompt buffer.")


def greedy_decode(model: VLA, params: Any, images: jax.Array, tokens: jax.Array,
                  input_mask: Optional[jax.Array], num_tokens: int, *,
                  prefix_mask: Optional[jax.Array] = None, use_cache: bool = True,
                  return_logits: bool = False
                  ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
  """Greedily generates `num_tokens` text tokens after each prompt.

  Args:
    model: the VLA (static: its config decides the layout).
    params: its parameters (the `params` collection).
    images: [B, H, W, 3] at the model's resolution, uint8 or floats in [0, 1].
    tokens: int [B, T] prompts, padded (see the module docstring); BOS first for OpenVLA.
    input_mask: [B, T] bool, True at real prompt tokens; None = no padding.
    num_tokens: static, how many tokens to generate (>= 1).
    prefix_mask: PaliGemma only, [B, T] bool: prompt tokens that attend bidirectionally
      (None = the whole prompt). Generated tokens are always causal.
    use_cache: True = KV cache (prefill + incremental steps); False = full recomputation.
    return_logits: also return the logits each token was chosen from.
  Returns:
    int32 [B, num_tokens] generated ids, and with return_logits float32
    [B, num_tokens, V] logits.
  """
  _check_inputs(model, tokens, input_mask, prefix_mask, num_tokens)
  if input_mask is None:
    input_mask = jnp.ones(tokens.shape, jnp.bool_)
  # One positional call signature, so that equal calls share one compiled program.
  ids, logits = _jitted_decode(model, params, images, tokens, input_mask, prefix_mask,
                               num_tokens, bool(use_cache), bool(return_logits))
  return (ids, logits) if return_logits else ids


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _jitted_decode(model, params, images, tokens, input_mask, prefix_mask, num_tokens,
                   use_cache, return_logits):
  input_mask = input_mask.astype(jnp.bool_)
  decode = _decode_with_cache if use_cache else _decode_by_recomputation
  return decode(model, params, images, tokens, input_mask, prefix_mask, num_tokens,
                return_logits)


def _decode_with_cache(model: VLA, params, images, tokens, input_mask, prefix_mask,
                       num_tokens: int, return_logits: bool):
  """Prefill the cache with the embedded prefix, then one cached LLM step per token."""
  config = model.config.llm
  llm = llm_lib.LLM(config)
  llm_variables = {"params": params["llm"]}
  inputs = model.apply({"params": params}, images, tokens, input_mask, prefix_mask,
                       method=VLA.embed_inputs)
  batch, prefix_length = inputs["input_mask"].shape
  rows = jnp.arange(batch)
  last = last_real_index(inputs["input_mask"])
  # The last generated token is never fed back, so it needs no slot.
  cache = llm_lib.init_kv_cache(config, batch, prefix_length + num_tokens - 1)
  logits, out = llm.apply(llm_variables, inputs["embeddings"], attn_mask=inputs["attn_mask"],
                          positions=inputs["positions"], kv_cache=cache,
                          logits_at=last[:, None])
  first_logits = logits[:, 0]
  first = greedy_token(first_logits)
  # A generated token's position is one past the last real token's, whatever the padding.
  position = inputs["positions"][rows, last] + 1
  attends_itself = jnp.ones((batch, 1, 1), jnp.bool_)

  def step(carry, _):
    cache, token, position = carry
    x = llm.apply(llm_variables, token[:, None], method=llm_lib.LLM.embed)
    logits, out = llm.apply(llm_variables, x, attn_mask=attends_itself,
                            positions=position[:, None], kv_cache=cache)
    logits = logits[:, 0]
    token = greedy_token(logits)
    return (out["kv_cache"], token, position + 1), (token, logits if return_logits else None)

  _, (rest, rest_logits) = jax.lax.scan(step, (out["kv_cache"], first, position), None,
                                        length=num_tokens - 1)
  ids = jnp.concatenate([first[:, None], rest.T], axis=1)
  if not return_logits:
    return ids, None
  return ids, jnp.concatenate([first_logits[:, None], rest_logits.transpose(1, 0, 2)], axis=1)


def _decode_by_recomputation(model: VLA, params, images, tokens, input_mask, prefix_mask,
                             num_tokens: int, return_logits: bool):
  """Re-runs the whole VLA per token on the prompt with the generated tokens appended.

  Generated token j goes to text column T + j (after the padded prompt buffer); padding
  in between is masked and skipped by the positions, exactly as in the cached path.
  """
  batch, length = tokens.shape
  rows = jnp.arange(batch)
  room = jnp.zeros((batch, num_tokens), jnp.bool_)
  buffer = jnp.concatenate([tokens, room.astype(tokens.dtype)], axis=1)
  mask = jnp.concatenate([input_mask, room], axis=1)
  # Spelled out: VLA's default prefix (the whole text) would make generated tokens prefix.
  prefix = input_mask if prefix_mask is None else prefix_mask.astype(jnp.bool_)
  prefix = jnp.concatenate([prefix, room], axis=1)
  logits_out = (jnp.zeros((batch, num_tokens, model.config.llm.vocab_size), jnp.float32)
                if return_logits else None)

  def step(j, carry):
    buffer, mask, logits_out = carry
    out = model.apply({"params": params}, images, buffer, mask, prefix_mask=prefix)
    logits = out["logits"][rows, last_real_index(out["input_mask"])]
    token = jnp.argmax(logits, axis=-1).astype(buffer.dtype)
    buffer = buffer.at[:, length + j].set(token)
    mask = mask.at[:, length + j].set(True)
    if logits_out is not None:
      logits_out = logits_out.at[:, j].set(logits)
    return buffer, mask, logits_out

  buffer, _, logits_out = jax.lax.fori_loop(0, num_tokens, step, (buffer, mask, logits_out))
  return buffer[:, length:].astype(jnp.int32), logits_out
