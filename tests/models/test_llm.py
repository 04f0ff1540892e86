"""Behaviour of `vla_jax.models.llm`: layouts, remat, dtypes, capture, masks, and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.models import llm as llm_lib
from vla_jax.typed_config import from_mapping
from vla_jax.weights import llm as llm_weights
from vla_jax.weights.npz import flatten
from vla_jax.weights.safetensors import save_safetensors

FAMILIES = ["tiny_llama", "tiny_gemma"]


def _random_params(config, embeddings, seed=0):
  """O(1)-scale random params shaped like `LLM(config)`'s (faster than compiling `init`)."""
  shapes = jax.eval_shape(llm_lib.LLM(config).init, jax.random.key(0), embeddings)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    noise = rng.standard_normal(spec.shape).astype(np.float32)
    if "scale" in jax.tree_util.keystr(path):  # non-trivial norms: (1 + scale) vs scale matter
      return jnp.asarray((0.0 if config.family == "gemma" else 1.0) + 0.1 * noise)
    return jnp.asarray(noise / np.sqrt(spec.shape[-2] if len(spec.shape) > 1 else 1.0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _setup(preset, batch=2, length=7, **overrides):
  config = llm_lib.llm_config(preset, **overrides)
  embeddings = jax.random.normal(jax.random.key(1), (batch, length, config.width))
  return config, llm_lib.LLM(config), _random_params(config, embeddings), embeddings


def _apply(model, params, x, **kwargs):
  """`model.apply` under jit (one compile instead of op-by-op dispatch); kwargs are static."""
  return jax.jit(lambda p, e: model.apply({"params": p}, e, **kwargs))(params, x)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             atol=tol, rtol=0)


@pytest.mark.parametrize("preset", FAMILIES)
def test_scan_equals_loop_and_converters_round_trip(preset):
  config, model, params, x = _setup(preset)
  scanned_config = dataclasses.replace(config, scan=True)
  scanned_params = llm_lib.loop_to_scan(params, config.depth)
  expected = jax.tree.map(jnp.shape, jax.eval_shape(llm_lib.LLM(scanned_config).init,
                                                    jax.random.key(0), x)["params"])
  assert jax.tree.map(jnp.shape, scanned_params) == expected
  kwargs = dict(capture_layer=1, capture_slice=(2, 3), return_all_hidden=True)
  logits, out = _apply(model, params, x, **kwargs)
  scan_logits, scan_out = _apply(llm_lib.LLM(scanned_config), scanned_params, x, **kwargs)
  _close(scan_logits, logits)
  for key in ("final_hidden", "captured", "hidden"):
    _close(scan_out[key], out[key])
  back = llm_lib.scan_to_loop(scanned_params, config.depth)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), back, params))
  with pytest.raises(CheckpointError, match="already looped"):
    llm_lib.scan_to_loop(params, config.depth)
  with pytest.raises(CheckpointError, match="depth"):
    llm_lib.loop_to_scan(params, config.depth + 1)


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
def test_remat_matches_values_and_grads(scan):
  config, _, params, x = _setup("tiny_llama", scan=False)
  if scan:
    params = llm_lib.loop_to_scan(params, config.depth)

  def loss_fn(model):
    def loss(p):
      logits, out = model.apply({"params": p}, x, capture_layer=1, capture_slice=(1, 4))
      return jnp.mean(logits ** 2) + jnp.mean(out["captured"] ** 2)
    return jax.jit(jax.value_and_grad(loss))

  plain = loss_fn(llm_lib.LLM(dataclasses.replace(config, scan=scan)))(params)
  for policy in ("nothing_saveable", "dots_saveable"):
    remat_config = dataclasses.replace(config, scan=scan, remat=True, remat_policy=policy)
    value, grads = loss_fn(llm_lib.LLM(remat_config))(params)
    _close(value, plain[0])
    jax.tree.map(lambda a, b: _close(a, b, 1e-6), grads, plain[1])


@pytest.mark.parametrize("preset", FAMILIES)
def test_bfloat16_runs_and_stays_close(preset):
  config, model, params, x = _setup(preset, scan=True)
  logits, _ = _apply(model, params, x)
  bf16 = llm_lib.LLM(dataclasses.replace(config, dtype="bfloat16"))
  bf_logits, bf_out = _apply(bf16, params, x, capture_layer=1)
  assert bf_logits.dtype == jnp.float32
  assert bf_out["final_hidden"].dtype == jnp.bfloat16
  assert bf_out["captured"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(bf_logits)))
  err = np.max(np.abs(np.asarray(bf_logits) - np.asarray(logits)))
  assert err < 0.05 * np.max(np.abs(np.asarray(logits))), err
  # Params stay float32 whatever the compute dtype.
  bf_params = jax.eval_shape(bf16.init, jax.random.key(0), x)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(bf_params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("preset", FAMILIES)
def test_capture_in_scan_does_not_change_logits(preset):
  config, model, params, x = _setup(preset, scan=True, depth=3)
  plain, plain_out = _apply(model, params, x, return_all_hidden=True)
  for layer in (0, 1, config.depth):
    logits, out = _apply(model, params, x, capture_layer=layer, capture_slice=(3, 4))
    _close(logits, plain, 0)
    _close(out["captured"], plain_out["hidden"][layer][:, 3:7], 0)
  _, out = _apply(model, params, x, capture_layer=2)  # default slice: all positions
  _close(out["captured"], plain_out["hidden"][2], 0)


@pytest.mark.parametrize("scan", [False, True])
def test_capture_of_several_layers_equals_each_capture(scan):
  # align.align_layers: one pass captures every aligned layer, in the order asked.
  _, model, params, x = _setup("tiny_llama", scan=scan, depth=3)
  plain, plain_out = _apply(model, params, x, return_all_hidden=True)
  logits, out = _apply(model, params, x, capture_layer=(3, 0, 1), capture_slice=(2, 4))
  _close(logits, plain, 0)
  assert isinstance(out["captured"], tuple) and len(out["captured"]) == 3
  for layer, captured in zip((3, 0, 1), out["captured"]):
    _close(captured, plain_out["hidden"][layer][:, 2:6], 0)
  with pytest.raises(InputError, match=r"or a non-empty tuple of them; got \(1, 9\)"):
    _apply(model, params, x, capture_layer=(1, 9))


def test_gemma_scales_token_embeddings_in_embed_only():
  config, model, params, _ = _setup("tiny_gemma")
  tokens = jnp.array([[3, 5, 7]], jnp.int32)
  embedded = model.apply({"params": params}, tokens, method=model.embed)
  _close(embedded, params["embedder"]["input_embedding"][tokens] * np.sqrt(config.width), 1e-5)
  _, out = _apply(model, params, embedded, capture_layer=0)  # other inputs pass unscaled
  _close(out["captured"], embedded, 0)


def test_masks_and_positions():
  input_mask = jnp.array([[False, False, True, True, True],
                          [True, True, True, True, True]])
  prefix = jnp.array([[True, True, True, True, False],
                      [True, True, False, False, False]])
  causal = np.asarray(llm_lib.causal_mask(input_mask))
  prefix_lm = np.asarray(llm_lib.prefix_lm_mask(input_mask, prefix))
  mask, pre = np.asarray(input_mask), np.asarray(prefix)
  for b in range(2):
    for q in range(5):
      for k in range(5):
        assert causal[b, q, k] == (mask[b, k] and k <= q)
        assert prefix_lm[b, q, k] == (mask[b, k] and (k <= q or (pre[b, q] and pre[b, k])))
  np.testing.assert_array_equal(llm_lib.positions_from_mask(input_mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_rope_tables_are_the_rotary_angles():
  """The looked-up cos / sin equal float64 cos / sin of HF's float32 angles (theta ** (-2i /
  hd) * position) for every position up to max_position_embeddings, and `rotate` rotates
  each (first-half, second-half) pair by its angle; a position past the table reads NaN."""
  config = llm_lib.llm_config("tiny_llama", max_position_embeddings=40, rope_theta=500.0)
  head_dim = config.effective_head_dim
  positions = jnp.array([[0, 1, 7, 39, 40], [3, 3, 20, 41, 2]])
  cos, sin = llm_lib.rope_tables(positions, config)
  assert cos.shape == sin.shape == (2, 5, 1, head_dim // 2) and cos.dtype == jnp.float32
  inv_freq = (1.0 / (np.float32(500.0) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                          / np.float32(head_dim)))).astype(np.float32)
  angles = (np.asarray(positions, np.float32)[..., None] * inv_freq).astype(np.float64)
  inside = np.asarray(positions) <= 40
  np.testing.assert_allclose(np.asarray(cos)[:, :, 0][inside], np.cos(angles)[inside],
                             rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sin)[:, :, 0][inside], np.sin(angles)[inside],
                             rtol=0, atol=1e-7)
  assert np.isnan(np.asarray(cos)[1, 3]).all() and np.isnan(np.asarray(sin)[1, 3]).all()

  x = jax.random.normal(jax.random.key(0), (2, 5, 3, head_dim))
  rotated = np.asarray(llm_lib.rotate(x, (cos, sin)))
  half = head_dim // 2
  pairs = np.asarray(x[..., :half]) + 1j * np.asarray(x[..., half:])
  expected = pairs * np.exp(1j * angles)[:, :, None, :]  # rotation by the angle
  np.testing.assert_allclose(rotated[inside][..., :half], expected.real[inside], atol=1e-5)
  np.testing.assert_allclose(rotated[inside][..., half:], expected.imag[inside], atol=1e-5)


def test_rows_without_valid_keys_do_not_produce_nan():
  _, model, params, x = _setup("tiny_llama", batch=1, length=4)
  attn_mask = jnp.zeros((1, 4, 4), bool)  # nobody may attend anything
  loss = lambda p: jnp.sum(model.apply({"params": p}, x, attn_mask=attn_mask)[0])
  total, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(total))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("key,value", [
    ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
    ("sliding_window", 4096), ("query_pre_attn_scalar", 256.0), ("use_post_norms", True)])
def test_gemma2_options_are_rejected(key, value):
  with pytest.raises(ConfigError, match=f"{key}.*not implemented yet"):
    llm_lib.llm_config("tiny_gemma", **{key: value})


def test_config_validation_names_the_key():
  with pytest.raises(ConfigError, match="did you mean 'model.llm.num_heads'"):
    from_mapping(llm_lib.LLMConfig, {"num_head": 4}, "model.llm")
  with pytest.raises(ConfigError, match="num_kv_heads"):
    llm_lib.llm_config("tiny_llama", num_heads=4, num_kv_heads=3)
  with pytest.raises(ConfigError, match="head_dim"):
    llm_lib.llm_config("tiny_llama", width=66, num_heads=4)
  with pytest.raises(ConfigError, match="family"):
    llm_lib.llm_config("tiny_llama", family="mistral")
  with pytest.raises(ConfigError, match="dtype"):
    llm_lib.llm_config("tiny_llama", dtype="fp8")
  with pytest.raises(ConfigError, match="gemma_2b"):
    llm_lib.llm_config("gemma_7b")


def test_presets():
  gemma = llm_lib.llm_config("gemma_2b")
  assert (gemma.vocab_size, gemma.width, gemma.depth, gemma.num_heads,
          gemma.effective_num_kv_heads, gemma.effective_head_dim, gemma.mlp_dim) == (
              257216, 2048, 18, 8, 1, 256, 16384)
  assert gemma.effective_tie_embeddings
  llama = llm_lib.llm_config("llama2_7b")
  assert llama.norm_eps == 1e-5 and not llama.effective_tie_embeddings
  assert llama.effective_head_dim == 128 and llama.effective_num_kv_heads == 32
  assert llm_lib.llm_config("openvla_llama2_7b").vocab_size == 32064
  # Gemma-2B's published size: 2.51e9 parameters (embedding shared with the output).
  shapes = llm_weights.expected_llm_params(gemma)
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert abs(count - 2.506e9) < 0.01e9, count


def test_bad_call_arguments_raise_input_errors():
  config, model, params, x = _setup("tiny_llama")
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
  for layer in (-1, config.depth + 1, 1.5):
    with pytest.raises(InputError, match="capture_layer"):
      apply(x, capture_layer=layer)
  with pytest.raises(InputError, match="capture_slice"):
    apply(x, capture_layer=1, capture_slice=(5, 4))
  with pytest.raises(InputError, match="llm.width"):
    apply(x[..., :10])
  with pytest.raises(InputError, match="attn_mask"):
    apply(x, attn_mask=jnp.ones((2, 7, 7), jnp.float32))
  with pytest.raises(InputError, match="positions"):
    apply(x, positions=jnp.zeros((2, 6), jnp.int32))
  with pytest.raises(InputError, match="integer"):
    model.apply({"params": params}, jnp.zeros((1, 2)), method=model.embed)


def _hf_llama_dir(tmp_path):
  from tests.parity.torch_refs import import_timm
  import_timm()
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2))
  hf.save_pretrained(tmp_path)
  return tmp_path


def test_llama_checkpoint_with_gemma_config_lists_problems(tmp_path):
  directory = _hf_llama_dir(tmp_path)
  gemma = llm_lib.LLMConfig(family="gemma", vocab_size=128, width=64, depth=2, num_heads=4,
                            num_kv_heads=1, head_dim=32, mlp_dim=96)
  with pytest.raises(CheckpointError) as error:
    llm_weights.load_hf_llm(directory, gemma)
  message = str(error.value)
  assert "model_type='llama'" in message
  assert "unexpected" in message and "model.layers.2." in message  # depth 3 vs 2
  assert "mis-shaped" in message and "q_proj" in message  # head_dim 32 vs 16
  # Same weights without config.json: the shape report alone still names everything.
  (tmp_path / "bare").mkdir()
  bare = tmp_path / "bare" / "model.safetensors"
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  save_safetensors(str(bare), tensors)
  with pytest.raises(CheckpointError, match="mis-shaped") as error:
    llm_weights.load_hf_llm(bare, gemma)
  assert "model_type" not in str(error.value)
  # The right config loads.
  llama = llm_lib.LLMConfig(family="llama", vocab_size=128, width=64, depth=3, num_heads=4,
                            num_kv_heads=2, mlp_dim=96)
  params = llm_weights.load_hf_llm(directory, llama)
  assert "lm_head" in params and "layers_2" in params
  # A config that matches the shapes but not config.json's rope_theta is refused.
  with pytest.raises(CheckpointError, match="rope_theta"):
    llm_weights.load_hf_llm(directory, dataclasses.replace(llama, rope_theta=500000.0))
  # A tied config would silently drop this checkpoint's separate lm_head: refused.
  with pytest.raises(CheckpointError, match="tie_word_embeddings"):
    llm_weights.load_hf_llm(directory, dataclasses.replace(llama, tie_embeddings=True))


def test_truncated_or_incomplete_safetensors(tmp_path):
  config, _, params, _ = _setup("tiny_llama", length=3)
  tensors = {}
  for name, value in flatten(params).items():
    tensors[name] = np.asarray(value)
  # Write under HF names through our own rules' sources, then damage the file.
  rules = llm_weights.hf_llm_rules(config)
  hf = {}
  for rule in rules:
    value = tensors[rule.target]
    hf[rule.sources[0]] = value.T if value.ndim == 2 and "embed" not in rule.target else value
  path = tmp_path / "model.safetensors"
  save_safetensors(str(path), hf)
  loaded = llm_weights.load_hf_llm(path, config)
  np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])
  # Scanned layout, each tensor placed straight onto its sharding.
  scanned = dataclasses.replace(config, scan=True)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, llm_weights.expected_llm_params(scanned))
  sharded = llm_weights.load_hf_llm(path, scanned, shardings=shardings)
  want = llm_lib.loop_to_scan(params, config.depth)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sharded, want)
  assert sharded["layers"]["attn"]["q_proj"]["kernel"].sharding == device
  data = path.read_bytes()
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    llm_weights.load_hf_llm(truncated, config)
  incomplete = {k: v for k, v in hf.items() if "layers.1." not in k and k != "model.norm.weight"}
  save_safetensors(str(tmp_path / "incomplete.safetensors"), incomplete)
  with pytest.raises(CheckpointError) as error:
    llm_weights.load_hf_llm(tmp_path / "incomplete.safetensors", config)
  message = str(error.value)
  assert "missing" in message and "model.norm.weight" in message
  assert "model.layers.1.mlp.up_proj.weight" in message
