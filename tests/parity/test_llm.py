"""Parity of `vla_jax.models.llm.LLM` with HuggingFace Llama and Gemma (fp32, < 1e-4).

Random tiny `LlamaForCausalLM` (GQA, rope_theta 500000) and `GemmaForCausalLM` (head_dim
independent of width, one kv head, tied embeddings) are saved with `save_pretrained` and
loaded through our loaders; logits, every hidden state and captured slices must match.
The big_vision npz path is checked with an npz written from the HF Gemma weights by an
independent numpy re-layout in this file.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.parity import torch_refs
from tests.parity.torch_refs import import_timm, to_numpy

import_timm()  # transformers' modeling import needs the torchvision workaround first.
import transformers  # noqa: E402

from vla_jax.models import llm as llm_lib  # noqa: E402
from vla_jax.weights import llm as llm_weights  # noqa: E402

TOL = 1e-4
VOCAB = 128


def _randomize(model: torch.nn.Module, gemma: bool) -> None:
  """Replaces HF's tiny default init with O(1)-scale weights (and non-trivial norms)."""
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if name.endswith("norm.weight"):
        param.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
      elif "embed_tokens" in name:
        param.copy_(noise * (0.3 if gemma else 1.0))
      else:
        param.copy_(noise / np.sqrt(param.shape[-1]))


def _hf_llama():
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
      max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  _randomize(model, gemma=False)
  return model


def _hf_gemma(num_kv_heads=1):
  torch.manual_seed(0)
  config = transformers.GemmaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=32, rms_norm_eps=1e-6,
      max_position_embeddings=256, attn_implementation="eager")
  model = transformers.GemmaForCausalLM(config).eval()
  _randomize(model, gemma=True)
  return model


def _our_config(hf_model, family: str, scan: bool) -> llm_lib.LLMConfig:
  c = hf_model.config
  return llm_lib.LLMConfig(
      family=family, vocab_size=c.vocab_size, width=c.hidden_size, depth=c.num_hidden_layers,
      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
      head_dim=c.head_dim, mlp_dim=c.intermediate_size,
      rope_theta=c.rope_parameters["rope_theta"], norm_eps=c.rms_norm_eps,
      tie_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
      scan=scan)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """{family: (hf model, save_pretrained directory)}."""
  models = {}
  for family, build in (("llama", _hf_llama), ("gemma", _hf_gemma)):
    model = build()
    directory = tmp_path_factory.mktemp(family)
    model.save_pretrained(directory)
    models[family] = (model, directory)
  return models


def _tokens(batch=2, length=9, seed=0):
  return np.random.default_rng(seed).integers(1, VOCAB, (batch, length)).astype(np.int32)


def _run(config, params, tokens, **kwargs):
  """Embeds `tokens` and runs our LLM under jit; kwargs are passed through (masks traced)."""
  model = llm_lib.LLM(config)
  static = {k: v for k, v in kwargs.items() if k not in ("attn_mask", "positions")}
  arrays = {k: v for k, v in kwargs.items() if k in ("attn_mask", "positions")}

  def run(p, toks, arrays):
    embeddings = model.apply({"params": p}, toks, method=model.embed)
    return model.apply({"params": p}, embeddings, **arrays, **static)
  return jax.jit(run)(params, jnp.asarray(tokens), arrays)


def _hf_outputs(hf_model, tokens, attention_mask=None):
  with torch.no_grad():
    out = hf_model(torch.from_numpy(tokens).long(),
                   attention_mask=None if attention_mask is None else
                   torch.from_numpy(attention_mask).long(),
                   output_hidden_states=True)
  return to_numpy(out.logits), [to_numpy(h) for h in out.hidden_states]


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_logits_and_hidden_states_match_hf(hf_models, family, scan):
  hf_model, directory = hf_models[family]
  config = _our_config(hf_model, family, scan)
  params = llm_weights.load_hf_llm(directory, config)
  tokens = _tokens()
  hf_logits, hf_hidden = _hf_outputs(hf_model, tokens)
  logits, out = _run(config, params, tokens, return_all_hidden=True)
  depth = config.depth
  assert len(hf_hidden) == depth + 1
  assert _max_err(logits, hf_logits) < TOL
  for k in range(depth):  # HF entries 0..depth-1 are un-normed residual streams.
    assert _max_err(out["hidden"][k], hf_hidden[k]) < TOL, f"hidden_states[{k}]"
  # HF's last entry has the final norm applied; ours keeps entry depth pre-norm.
  assert _max_err(out["final_hidden"], hf_hidden[depth]) < TOL
  assert _max_err(out["hidden"][depth], hf_hidden[depth]) > 1e-2
  for k, (start, count) in ((0, (2, 4)), (1, (0, 3)), (depth, (5, 4))):
    _, captured = _run(config, params, tokens, capture_layer=k, capture_slice=(start, count))
    want = out["hidden"][k] if k == depth else hf_hidden[k]
    assert captured["captured"].shape == (2, count, config.width)
    assert _max_err(captured["captured"], np.asarray(want)[:, start:start + count]) < TOL, k


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_config_from_hf_gives_parity(hf_models, family):
  """`config_from_hf` reads config.json into our config; its logits equal transformers'."""
  hf_model, directory = hf_models[family]
  config = llm_weights.config_from_hf(directory, scan=True)
  want = _our_config(hf_model, family, scan=True)
  assert dataclasses.replace(config, head_dim=config.effective_head_dim) == want
  tokens = _tokens(seed=5)
  logits, _ = _run(config, llm_weights.load_hf_llm(directory, config), tokens)
  assert _max_err(logits, _hf_outputs(hf_model, tokens)[0]) < TOL


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_left_padded_batch_matches_hf(hf_models, family):
  hf_model, directory = hf_models[family]
  config = _our_config(hf_model, family, scan=True)
  params = llm_weights.load_hf_llm(directory, config)
  tokens = _tokens(length=8, seed=1)
  input_mask = np.ones(tokens.shape, bool)
  input_mask[0, :3] = False  # row 0 is left-padded by three tokens
  tokens[0, :3] = 0
  hf_logits, hf_hidden = _hf_outputs(hf_model, tokens, input_mask.astype(np.int64))
  mask = jnp.asarray(input_mask)
  logits, out = _run(config, params, tokens, attn_mask=llm_lib.causal_mask(mask),
                     positions=llm_lib.positions_from_mask(mask), capture_layer=2,
                     capture_slice=(3, 5))
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits)), "padding rows must not produce NaN"
  assert _max_err(logits[input_mask], hf_logits[input_mask]) < TOL
  assert _max_err(out["captured"], hf_hidden[2][:, 3:8]) < TOL
  # The unpadded row equals its own unbatched run: padding does not leak across rows.
  alone, _ = _run(config, params, tokens[1:])
  assert _max_err(logits[1], alone[0]) < TOL


@pytest.mark.parametrize("num_kv_heads", [1, 4], ids=["q_kv_einsum", "qkv_einsum"])
def test_big_vision_gemma_npz_matches_hf(tmp_path, num_kv_heads):
  hf_model = _hf_gemma(num_kv_heads)
  path = str(tmp_path / "paligemma.npz")
  tree = torch_refs.gemma_to_big_vision(hf_model.config, hf_model.state_dict(), prefix="model.")
  tree["img/embedding/kernel"] = np.zeros((2, 2, 3, 8), np.float32)  # a tower beside: ignored
  np.savez(path, **tree)
  tokens = _tokens(seed=2)
  hf_logits, hf_hidden = _hf_outputs(hf_model, tokens)
  for scan in (False, True):
    config = _our_config(hf_model, "gemma", scan)
    params = llm_weights.load_big_vision_gemma(path, config)
    logits, out = _run(config, params, tokens, capture_layer=1)
    assert _max_err(logits, hf_logits) < TOL, scan
    assert _max_err(out["captured"], hf_hidden[1]) < TOL, scan


def test_prefix_lm_mask_is_bidirectional_in_prefix_only():
  config = llm_lib.llm_config("tiny_gemma", vocab_size=VOCAB)
  model = llm_lib.LLM(config)
  length, prefix_len = 8, 5
  tokens = _tokens(batch=1, length=length, seed=3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length, config.width)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                        shapes["params"])
  ones = jnp.ones((1, length), bool)
  prefix = jnp.arange(length)[None] < prefix_len
  mask = llm_lib.prefix_lm_mask(ones, prefix)

  @jax.jit
  def final_hidden(toks, attn_mask):
    embeddings = model.apply({"params": params}, toks, method=model.embed)
    return model.apply({"params": params}, embeddings, attn_mask=attn_mask)[1]["final_hidden"]

  def hidden(toks, attn_mask):
    return np.asarray(final_hidden(jnp.asarray(toks), attn_mask)[0])

  base = hidden(tokens, mask)
  later_prefix = tokens.copy()
  later_prefix[0, 3] = (tokens[0, 3] + 1) % VOCAB
  changed = hidden(later_prefix, mask)
  assert _max_err(changed[1], base[1]) > 1e-3, "prefix position 1 must see prefix token 3"
  assert _max_err(changed[:3], base[:3]) > 1e-3
  suffix = tokens.copy()
  suffix[0, 6] = (tokens[0, 6] + 1) % VOCAB
  changed = hidden(suffix, mask)
  assert _max_err(changed[:6], base[:6]) == 0.0, "no position before 6 may see token 6"
  assert _max_err(changed[6:], base[6:]) > 1e-3
  # Under a causal mask the same prefix change is invisible to earlier positions.
  causal = llm_lib.causal_mask(ones)
  assert _max_err(hidden(later_prefix, causal)[:3], hidden(tokens, causal)[:3]) == 0.0


def test_paligemma_layouts_load_through_the_prefix(tmp_path):
  """PaliGemma's Gemma, from a `save_pretrained` file and from a 5.x `state_dict()`."""
  import safetensors.torch
  torch.manual_seed(0)
  hf_config = transformers.PaliGemmaConfig(
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64),
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                       vocab_size=VOCAB, attn_implementation="eager"),
      vocab_size=VOCAB)
  assert hf_config.text_config.use_bidirectional_attention
  hf_model = transformers.PaliGemmaForConditionalGeneration(hf_config).eval()
  _randomize(hf_model.model.language_model, gemma=True)
  hf_model.save_pretrained(tmp_path / "pretrained")
  # clone(): the tied lm_head shares memory with the embedding, which save_file refuses.
  safetensors.torch.save_file({k: v.clone() for k, v in hf_model.state_dict().items()},
                              str(tmp_path / "state_dict.safetensors"))
  tokens = _tokens(seed=4)
  with torch.no_grad():
    text = hf_model.model.language_model(input_ids=torch.from_numpy(tokens).long())
    hf_logits = to_numpy(hf_model.lm_head(text.last_hidden_state))
  config = _our_config(hf_model.model.language_model, "gemma", scan=True)
  for path, layout in ((tmp_path / "pretrained", "paligemma"),
                       (tmp_path / "state_dict.safetensors", "paligemma_state_dict")):
    prefix, lm_head_key = llm_weights.HF_LAYOUTS[layout]
    params = llm_weights.load_hf_llm(path, config, prefix=prefix, lm_head_key=lm_head_key)
    # PaliGemma's text config sets use_bidirectional_attention: a text-only call is all prefix.
    ones = jnp.ones(tokens.shape, bool)
    logits, _ = _run(config, params, tokens, attn_mask=llm_lib.prefix_lm_mask(ones, ones))
    assert _max_err(logits, hf_logits) < TOL, layout
