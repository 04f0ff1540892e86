"""KV-cache decoding equals full recomputation: the LLM's cache, `greedy_decode`, the policy.

Every comparison is token by token: identical ids, logits within 1e-5 in float32, for the
OpenVLA layout (Llama, GQA, causal) and the PaliGemma layout (Gemma, one KV head,
prefix-LM), looped and scanned, with batched prompts of different lengths. Parameters are
random and drawn from the abstract shapes (no `init` compile), so each test is a few
compiles of a tiny model.
"""

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO, xla_flags
from vla_jax.errors import InputError
from vla_jax.eval import policy as policy_lib
from vla_jax.models import decode as decode_lib
from vla_jax.models import llm as llm_lib
from vla_jax.models import lora as lora_lib
from vla_jax.models.vla import VLA, dummy_inputs, vla_config

ATOL = 1e-5
# A row of length 9, one of 5 and one of 7 share a 9-column buffer.
LENGTHS = np.array([9, 5, 7], np.int32)
NUM_TOKENS = 5


def random_params(abstract, seed=0, gain=0.7):
  """Fan-in scaled normal kernels, norm scales near one: varied yet well-conditioned logits."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    if leaf.ndim >= 2:
      return jnp.asarray(rng.normal(0.0, gain * leaf.shape[-2] ** -0.5, leaf.shape), leaf.dtype)
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def with_scan(model, params, scan):
  """The same model and weights with looped or scanned LLM layers."""
  if not scan:
    return model, params
  config = model.config
  scanned = dataclasses.replace(config, llm=dataclasses.replace(config.llm, scan=True))
  llm_params = llm_lib.loop_to_scan(params["llm"], config.llm.depth)
  return VLA(scanned), {**params, "llm": llm_params}


@pytest.fixture(scope="module", params=["tiny", "tiny_paligemma"])
def student(request):
  config = vla_config(request.param)
  model = VLA(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(config, 1, 2))
  params = random_params(abstract["params"])
  rng = np.random.default_rng(1)
  batch, length = len(LENGTHS), int(LENGTHS.max())
  images = rng.uniform(size=(batch, 64, 64, 3)).astype(np.float32)
  tokens = rng.integers(3, 512, (batch, length)).astype(np.int32)
  tokens[:, 0] = 1  # BOS
  return request.param, model, params, images, tokens


def padded(tokens, lengths, side):
  """Rows of `tokens` cut to `lengths`, padded with id 0 on `side`; returns (tokens, mask)."""
  out = np.zeros_like(tokens)
  mask = np.zeros(tokens.shape, bool)
  for row, n in enumerate(lengths):
    cols = slice(0, n) if side == "right" else slice(tokens.shape[1] - n, None)
    out[row, cols], mask[row, cols] = tokens[row, :n], True
  return out, mask


def assert_same_decoding(a, b):
  (ids_a, logits_a), (ids_b, logits_b) = a, b
  chex.assert_equal_shape([ids_a, ids_b])
  chex.assert_equal_shape([logits_a, logits_b])
  np.testing.assert_array_equal(ids_a, ids_b)
  np.testing.assert_allclose(logits_a, logits_b, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- the LLM cache
@pytest.mark.parametrize("preset,scan,remat,bias", [("tiny_llama", False, False, False),
                                                    ("tiny_llama", True, True, False),
                                                    ("tiny_llama", False, False, True),
                                                    ("tiny_gemma", False, False, False),
                                                    ("tiny_gemma", True, False, False)])
def test_llm_prefill_then_steps_equal_one_full_forward(preset, scan, remat, bias):
  config = llm_lib.llm_config(preset, scan=scan, remat=remat, attention_bias=bias)
  model = llm_lib.LLM(config)
  batch, length, prompt = 2, 10, 6
  embeddings = jax.random.normal(jax.random.key(0), (batch, length, config.width))
  params = random_params(jax.eval_shape(model.init, jax.random.key(1), embeddings))
  apply = jax.jit(model.apply)  # three compiles: the full forward, the prefill, a step
  # Row 1 is right-padded inside the prompt; the first 3 tokens are a bidirectional prefix.
  input_mask = np.ones((batch, length), bool)
  input_mask[1, 4:prompt] = False
  prefix = np.zeros((batch, length), bool)
  prefix[:, :3] = True
  attn_mask = (llm_lib.prefix_lm_mask(input_mask, prefix) if config.family == "gemma"
               else llm_lib.causal_mask(input_mask))
  positions = llm_lib.positions_from_mask(input_mask)
  full, _ = apply(params, embeddings, attn_mask=attn_mask, positions=positions)

  cache = llm_lib.init_kv_cache(config, batch, length)
  layer_shape = (batch, config.effective_num_kv_heads, length, config.effective_head_dim)
  if scan:  # one stacked buffer, scanned with the layers
    chex.assert_shape([cache.k, cache.v], (config.depth, *layer_shape))
  else:  # one buffer per layer, each updated in place
    assert len(cache.k) == len(cache.v) == config.depth
    chex.assert_shape([*cache.k, *cache.v], layer_shape)
  logits, out = apply(params, embeddings[:, :prompt], attn_mask=attn_mask[:, :prompt, :prompt],
                      positions=positions[:, :prompt], kv_cache=cache)
  np.testing.assert_allclose(logits[0], full[0, :prompt], atol=ATOL)
  np.testing.assert_allclose(logits[1, :4], full[1, :4], atol=ATOL)  # the real tokens
  cache = out["kv_cache"]
  np.testing.assert_array_equal(cache.key_mask[:, :prompt], input_mask[:, :prompt])
  for t in range(prompt, length):
    logits, out = apply(params, embeddings[:, t:t + 1], attn_mask=jnp.ones((batch, 1, 1), bool),
                        positions=positions[:, t:t + 1], kv_cache=cache)
    cache = out["kv_cache"]
    chex.assert_shape(logits, (batch, 1, config.vocab_size))
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=ATOL)
  assert int(cache.end) == length


def test_llm_cache_rejects_bad_use():
  config = llm_lib.llm_config("tiny_llama")
  model = llm_lib.LLM(config)
  embeddings = jnp.zeros((1, 4, config.width))
  params = jax.eval_shape(model.init, jax.random.key(0), embeddings)
  positions = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(InputError, match="do not fit a KV cache of 3 slots"):
    jax.eval_shape(lambda p: model.apply(p, embeddings, positions=positions,
                                         kv_cache=llm_lib.init_kv_cache(config, 1, 3)), params)
  with pytest.raises(InputError, match="needs explicit positions"):
    jax.eval_shape(lambda p: model.apply(p, embeddings,
                                         kv_cache=llm_lib.init_kv_cache(config, 1, 8)), params)
  with pytest.raises(InputError, match=r"needs keys \(1, 2, 8, 16\) \(batch, kv_heads, "
                                       r"slots, head_dim\) per layer, as a tuple of 2"):
    jax.eval_shape(lambda p: model.apply(p, embeddings, positions=positions,
                                         kv_cache=llm_lib.init_kv_cache(config, 2, 8)), params)
  with pytest.raises(InputError, match="exceeds llm.max_position_embeddings"):
    llm_lib.init_kv_cache(config, 1, config.max_position_embeddings + 1)


# ---------------------------------------------------------------------------- greedy_decode
def layout(name, tokens, lengths=LENGTHS):
  """(prompts, input_mask, prefix_mask) as each student lays out a batch: OpenVLA keeps BOS
  in column 0, so it right-pads; PaliGemma's image comes first, so it left-pads, and its
  prompts end in two causal (suffix) tokens."""
  if name == "tiny":
    return padded(tokens, lengths, "right") + (None,)
  prompts, mask = padded(tokens, lengths, "left")
  prefix = mask.copy()
  prefix[:, -2:] = False
  return prompts, mask, prefix


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_recomputation(student, scan):
  name, model, params, images, tokens = student
  model, params = with_scan(model, params, scan)
  prompts, mask, prefix = layout(name, tokens)
  decode = lambda use_cache: decode_lib.greedy_decode(
      model, params, images, prompts, mask, NUM_TOKENS, prefix_mask=prefix,
      use_cache=use_cache, return_logits=True)
  cached = decode(True)
  chex.assert_shape(cached[0], (len(LENGTHS), NUM_TOKENS))
  chex.assert_shape(cached[1], (len(LENGTHS), NUM_TOKENS, model.config.llm.vocab_size))
  chex.assert_type(cached[0], jnp.int32)
  assert_same_decoding(cached, decode(False))


def test_batched_prompts_decode_as_if_each_were_alone(student):
  name, model, params, images, tokens = student
  prompts, mask, prefix = layout(name, tokens)
  batched = decode_lib.greedy_decode(model, params, images, prompts, mask, NUM_TOKENS,
                                     prefix_mask=prefix, return_logits=True)
  row, n = 1, LENGTHS[1]  # the shortest prompt: the most padding in the batch
  alone, _, alone_prefix = layout(name, tokens[row:row + 1, :n], [n])
  alone = decode_lib.greedy_decode(model, params, images[row:row + 1], alone, None,
                                   NUM_TOKENS, prefix_mask=alone_prefix, return_logits=True)
  assert_same_decoding((batched[0][row:row + 1], batched[1][row:row + 1]), alone)


def test_greedy_decode_rejects_bad_input(student):
  _, model, params, images, tokens = student
  with pytest.raises(InputError, match="num_tokens must be a positive int"):
    decode_lib.greedy_decode(model, params, images, tokens, None, 0)
  with pytest.raises(InputError, match="exceed llm.max_position_embeddings"):
    decode_lib.greedy_decode(model, params, images, tokens, None, 5000)
  with pytest.raises(InputError, match="input_mask must have the tokens' shape"):
    decode_lib.greedy_decode(model, params, images, tokens, np.ones((3, 2), bool), 2)


def test_greedy_token_is_argmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 40)).astype(np.float32)
  logits[1, [3, 17]] = 9.0  # a tie: the first wins
  logits[2, [5, 30]] = np.nan  # NaN: the first NaN, as jnp.argmax
  logits[3] = -np.inf
  logits[4] = 0.0
  logits[5, 39] = np.inf
  expected = jnp.argmax(jnp.asarray(logits), axis=-1)
  got = decode_lib.greedy_token(jnp.asarray(logits))
  chex.assert_type(got, jnp.int32)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got[:3], [int(np.argmax(logits[0])), 3, 5])


def test_in_layer_lora_is_applied_when_decoding_with_a_cache():
  """A prefill under in-layer LoRA (factors added by intercepting each Dense call) equals
  one with the LoRA-merged weights, not the base ones: decoding reads every adapted layer."""
  config = llm_lib.llm_config("tiny_llama")
  model = llm_lib.LLM(config)
  batch, length = 2, 6
  embeddings = jax.random.normal(jax.random.key(0), (batch, length, config.width))
  params = random_params(jax.eval_shape(model.init, jax.random.key(1), embeddings))
  lora_config = lora_lib.LoraConfig(rank=4, alpha=8.0, target_regex=r".*(proj)/kernel$")
  factors = lora_lib.init_lora(jax.random.key(2), params["params"], lora_config)
  factors = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                         factors)  # B != 0: the adapted model differs from the base
  attn_mask = llm_lib.causal_mask(np.ones((batch, length), bool))
  kwargs = dict(attn_mask=attn_mask, positions=np.tile(np.arange(length), (batch, 1)),
                kv_cache=llm_lib.init_kv_cache(config, batch, length))
  in_layer, _ = lora_lib.apply_in_layer(model, params["params"],
                                        lora_lib.layer_factors(factors, lora_config),
                                        lora_config, embeddings, **kwargs)
  merged = lora_lib.merge(params["params"], factors, lora_config)
  expected, _ = model.apply({"params": merged}, embeddings, **kwargs)
  base, _ = model.apply(params, embeddings, **kwargs)
  np.testing.assert_allclose(in_layer, expected, atol=ATOL)
  assert np.abs(np.asarray(expected) - np.asarray(base)).max() > 1e-2


# ---------------------------------------------------------------------------- the policy
def _previous_greedy_action_tokens(model, params, images, tokens, lengths, num_actions):
  """The policy's decoder before the KV cache: the actions written in place after each
  prompt, the whole model re-run per token (kept here as a fixed reference)."""
  batch, length = tokens.shape
  visual = model.config.num_visual_tokens
  rows = jnp.arange(batch)

  # The prompt is the prefix; the actions written so far are causal (PaliGemma only reads
  # it, and its training batches draw the same line: `step.supervised_prefix_mask`).
  prompt = jnp.arange(length)[None, :] < lengths[:, None]

  def body(j, tokens):
    input_mask = jnp.arange(length)[None, :] < (lengths + j)[:, None]
    logits = model.apply({"params": params}, images, tokens, input_mask,
                         prefix_mask=prompt)["logits"]
    nxt = lengths + j
    predicted = jnp.argmax(logits[rows, nxt + visual - 1], axis=-1).astype(jnp.int32)
    return tokens.at[rows, nxt].set(predicted)

  tokens = jax.lax.fori_loop(0, num_actions, body, tokens)
  return tokens[rows[:, None], lengths[:, None] + jnp.arange(num_actions)[None, :]]


def test_policy_decoding_is_unchanged_by_the_cache(student):
  _, model, params, images, tokens = student
  actions = 7
  # The policy's layout: right-padded prompts in a buffer with room for the actions.
  buffer = np.pad(padded(tokens, LENGTHS, "right")[0], ((0, 0), (0, actions)))
  uint8 = (images * 255).astype(np.uint8)
  previous = jax.jit(_previous_greedy_action_tokens, static_argnums=(0, 5))(
      model, params, uint8, buffer, LENGTHS, actions)
  for use_cache in (True, False):
    ids = policy_lib.greedy_action_tokens(model, params, uint8, buffer, LENGTHS, actions,
                                          use_cache=use_cache)
    np.testing.assert_array_equal(ids, previous)


# ---------------------------------------------------------------------------- sharded mesh
@pytest.mark.slow  # a subprocess with 8 fake CPU devices
def test_decoding_on_a_sharded_mesh_equals_one_device():
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-m", "tests.models.decode_multidevice_script"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().splitlines()[-1] == "OK"
