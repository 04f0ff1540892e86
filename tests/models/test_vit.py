"""Tests of `models.vit`: parameter names, scan/loop layouts, big_vision `.npz` loading,
position-embedding resampling, pool types, compute dtype and the errors bad input raises."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage

from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.models import vit
from vla_jax.models.vit import ViT, ViTConfig, loop_to_scan, scan_to_loop, vit_config
from vla_jax.typed_config import from_mapping
from vla_jax.weights import npz, siglip

D = 32  # width of the "mu/16" preset


def _config(**overrides) -> ViTConfig:
  return vit_config("mu/16", **{"image_size": 32, **overrides})


def _init(config: ViTConfig, seed: int = 0):
  """Random params with ViT(config)'s names and shapes: no zero biases, no zero head.

  Drawn with numpy from `abstract_params` because compiling `ViT.init` costs seconds.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, spec in npz.flatten(vit.abstract_params(config)).items():
    value = rng.normal(0.0, 0.2, spec.shape).astype(np.float32)
    flat[name] = value + 1.0 if name.endswith("/scale") else value
  return npz.unflatten(flat)


def _images(config: ViTConfig, batch: int = 2, seed: int = 1) -> np.ndarray:
  size = (batch, config.image_size, config.image_size, config.channels)
  return np.random.default_rng(seed).uniform(-1, 1, size).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: ViTConfig):
  """One compiled forward per config (configs are frozen, hence hashable)."""
  return jax.jit(ViT(config).apply)


def _apply(config: ViTConfig, params, images):
  return _jitted_apply(config)({"params": params}, images)


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in npz.flatten(tree).items()}


def _assert_trees_equal(a, b):
  flat_a, flat_b = npz.flatten(a), npz.flatten(b)
  assert sorted(flat_a) == sorted(flat_b)
  for name in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), name)


def test_param_names_are_big_vision():
  shapes = _shapes(vit.abstract_params(_config(num_classes=5)))
  attn = "MultiHeadDotProductAttention_0"
  block = {"LayerNorm_0/scale": (D,), "LayerNorm_0/bias": (D,), "LayerNorm_1/scale": (D,),
           "LayerNorm_1/bias": (D,), "MlpBlock_0/Dense_0/kernel": (D, 64),
           "MlpBlock_0/Dense_0/bias": (64,), "MlpBlock_0/Dense_1/kernel": (64, D),
           "MlpBlock_0/Dense_1/bias": (D,)}
  for proj in ("query", "key", "value"):
    block[f"{attn}/{proj}/kernel"] = (D, 2, 16)
    block[f"{attn}/{proj}/bias"] = (2, 16)
  block[f"{attn}/out/kernel"] = (2, 16, D)
  block[f"{attn}/out/bias"] = (D,)
  head = {k: v for k, v in block.items() if not k.startswith("LayerNorm_1")}
  expected = {"embedding/kernel": (16, 16, 3, D), "embedding/bias": (D,),
              "pos_embedding": (1, 4, D), "Transformer/encoder_norm/scale": (D,),
              "Transformer/encoder_norm/bias": (D,), "MAPHead_0/probe": (1, 1, D),
              "head/kernel": (D, 5), "head/bias": (5,)}
  expected.update({f"MAPHead_0/{k}": v for k, v in head.items()})
  looped = {f"Transformer/encoderblock_{i}/{k}": v for i in range(2) for k, v in block.items()}
  assert shapes == {**expected, **looped}
  scanned = _shapes(vit.abstract_params(_config(num_classes=5, scan=True)))
  assert scanned == {**expected, **{f"Transformer/encoderblock/{k}": (2, *v)
                                    for k, v in block.items()}}


def test_scan_and_loop_layouts_are_equivalent():
  loop_cfg, scan_cfg = _config(remat=True), _config(scan=True, remat=True)
  images = _images(loop_cfg)
  for source_cfg, convert, target_cfg in ((loop_cfg, loop_to_scan, scan_cfg),
                                          (scan_cfg, scan_to_loop, loop_cfg)):
    params = _init(source_cfg, seed=3)
    converted = convert(params, 2)
    assert _shapes(converted) == _shapes(vit.abstract_params(target_cfg))
    x_ref, out_ref = _apply(source_cfg, params, images)
    x, out = _apply(target_cfg, converted, images)
    assert sorted(out) == sorted(out_ref)
    for key in out:
      np.testing.assert_allclose(out[key], out_ref[key], atol=1e-5, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(x, x_ref, atol=1e-5, rtol=1e-5)
  # Round trip is exact, and a wrong depth is refused.
  params = _init(loop_cfg)
  _assert_trees_equal(scan_to_loop(loop_to_scan(params, 2), 2), params)
  with pytest.raises(InputError, match="encoderblock_0..2"):
    loop_to_scan(params, 3)
  with pytest.raises(InputError, match="leading layer axis of 3"):
    scan_to_loop(loop_to_scan(params, 2), 3)


def test_big_vision_npz_round_trip(tmp_path):
  config = _config()
  params = _init(config, seed=4)
  path = str(tmp_path / "vit.npz")
  siglip.save_big_vision(path, params)
  _assert_trees_equal(siglip.load_big_vision(path, config), params)
  # A looped checkpoint loads into a scanned model (and back) with the same values.
  scanned = siglip.load_big_vision(path, _config(scan=True))
  _assert_trees_equal(scanned, loop_to_scan(params, 2))
  siglip.save_big_vision(path, scanned)
  _assert_trees_equal(siglip.load_big_vision(path, config), params)


def test_big_vision_npz_bf16_comes_back_float32(tmp_path):
  config = _config()
  params = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), _init(config))
  path = str(tmp_path / "vit_bf16.npz")
  siglip.save_big_vision(path, params)
  with np.load(path) as raw:  # big_vision's on-disk convention: bf16 as 2-byte void.
    assert raw["pos_embedding"].dtype == np.dtype("V2")
  loaded = siglip.load_big_vision(path, config)
  for name, value in npz.flatten(loaded).items():
    assert value.dtype == jnp.float32, name
    np.testing.assert_array_equal(value, np.asarray(npz.flatten(params)[name], np.float32))


def test_big_vision_subtree(tmp_path):
  config = _config()
  params = _init(config, seed=5)
  path = str(tmp_path / "paligemma.npz")
  npz.save_npz(path, {"img": params, "llm": {"embedder": np.zeros((3, 4), np.float32)}})
  _assert_trees_equal(siglip.load_big_vision(path + ":img", config), params)
  with pytest.raises(CheckpointError, match=r"paligemma\.npz:img"):
    siglip.load_big_vision(path, config)


def test_posemb_resampled_to_new_grid(tmp_path):
  small, large = _config(image_size=64), _config(image_size=96)  # 4x4 -> 6x6 patches
  params = _init(small, seed=6)
  path = str(tmp_path / "vit64.npz")
  siglip.save_big_vision(path, params)
  loaded = siglip.load_big_vision(path, large)
  old = np.asarray(params["pos_embedding"]).reshape(4, 4, D)
  # big_vision's own resample_posemb: scipy.ndimage.zoom(order=1).
  want = scipy.ndimage.zoom(old, (6 / 4, 6 / 4, 1), order=1).reshape(1, 36, D)
  np.testing.assert_allclose(loaded["pos_embedding"], want, atol=1e-6)
  assert not np.allclose(loaded["pos_embedding"][0, :16], old.reshape(16, D))
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], params["embedding"]["kernel"])
  x, out = _apply(large, loaded, _images(large))
  assert out["encoded"].shape == (2, 36, D)
  assert np.isfinite(np.asarray(x)).all()
  np.testing.assert_allclose(vit.resample_posemb(params["pos_embedding"], 6), want, atol=1e-6)
  with pytest.raises(InputError, match="not a square"):
    vit.resample_posemb(np.zeros((1, 5, D)), 3)


@pytest.mark.parametrize("overrides,x_shape,extra_params,missing_params", [
    (dict(posemb="sincos2d"), (2, D), set(), {"pos_embedding"}),
    (dict(pool_type="gap"), (2, D), set(), {"MAPHead_0"}),
    (dict(pool_type="tok"), (2, D), {"cls"}, {"MAPHead_0"}),
    (dict(pool_type="none"), (2, 4, D), set(), {"MAPHead_0"}),
    (dict(pool_type="gap", num_classes=7), (2, 7), {"head"}, {"MAPHead_0"}),
    (dict(final_norm=False), (2, D), set(), set()),
])
def test_pool_and_posemb_variants(overrides, x_shape, extra_params, missing_params):
  config = _config(**overrides)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  (x, out), variables = jax.eval_shape(
      lambda im: ViT(config).init_with_output(jax.random.key(0), im), images)
  top = set(variables["params"])
  assert extra_params <= top and not missing_params & top
  assert x.shape == x_shape
  tokens = 5 if config.pool_type == "tok" else 4
  assert out["with_posemb"].shape == (2, 4, D)
  assert out["encoded"].shape == out["block01"].shape == (2, tokens, D)
  assert out["stem"].shape == (2, 2, 2, D)
  assert ("pre_logits" in out) == (config.pool_type != "none")
  assert ("logits" in out) == bool(config.num_classes)
  assert ("encoder_norm" in variables["params"]["Transformer"]) == config.final_norm


def test_sincos_gap_forward_is_finite():
  config = _config(posemb="sincos2d", pool_type="gap")
  x, out = _apply(config, _init(config), _images(config))
  assert np.isfinite(np.asarray(x)).all()
  np.testing.assert_allclose(x, np.mean(out["encoded"], axis=1), atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  config = _config()
  params = _init(config, seed=7)
  images = _images(config)
  x32, out32 = _apply(config, params, images)
  x16, out16 = _apply(_config(dtype="bfloat16"), params, images)
  assert x16.dtype == jnp.bfloat16 and out16["block01"].dtype == jnp.bfloat16
  for key in ("block00", "encoded", "pre_logits"):
    ref = np.asarray(out32[key])
    got = np.asarray(out16[key], np.float32)
    assert np.max(np.abs(got - ref)) < 0.05 * np.max(np.abs(ref)) + 0.02, key
  abstract = vit.abstract_params(_config(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))


def test_bad_images_raise_input_error():
  config = _config()
  params = vit.abstract_params(config)
  model = ViT(config)

  def call(shape, dtype=jnp.float32):
    jax.eval_shape(model.apply, {"params": params}, jax.ShapeDtypeStruct(shape, dtype))

  with pytest.raises(InputError, match=r"32x32.*\(2, 48, 48, 3\).*[Rr]esize"):
    call((2, 48, 48, 3))
  with pytest.raises(InputError, match=r"3 channels.*\(2, 32, 32, 1\)"):
    call((2, 32, 32, 1))
  with pytest.raises(InputError, match="batch axis"):
    call((32, 32, 3))
  with pytest.raises(InputError, match=r"\[-1, 1\].*uint8"):
    call((2, 32, 32, 3), jnp.uint8)


def test_bad_configs_raise_config_error():
  with pytest.raises(ConfigError, match=r"'Q/16'.*So400m/14"):
    vit_config("Q/16")
  with pytest.raises(ConfigError, match=r"model\.vit\.widht.*did you mean 'model\.vit\.width'"):
    from_mapping(ViTConfig, {"widht": 64}, "model.vit")
  with pytest.raises(ConfigError, match="widht"):
    vit_config("mu/16", widht=64)
  with pytest.raises(ConfigError, match=r"width \(30\).*num_heads \(4\)"):
    ViTConfig(width=30, num_heads=4)
  with pytest.raises(ConfigError, match="image_size"):
    ViTConfig(image_size=225)
  with pytest.raises(ConfigError, match="pool_type"):
    ViTConfig(pool_type="cls")
  assert vit_config().width == 1152 and vit_config().patch_size == 14
  assert vit_config("So400m/14").mlp_width == 4304


def test_checkpoint_of_other_depth_is_reported(tmp_path):
  params = _init(_config(depth=3, scan=True))
  path = str(tmp_path / "deep.npz")
  siglip.save_big_vision(path, params)
  with pytest.raises(CheckpointError, match="3 layers, config has 2"):
    siglip.load_big_vision(path, _config())  # scanned checkpoint -> looped model
  siglip.save_big_vision(path, scan_to_loop(params, 3))
  with pytest.raises(CheckpointError, match=r"unexpected.*encoderblock_2"):
    siglip.load_big_vision(path, _config(scan=True))


@pytest.fixture(scope="module")
def transformers_module():
  from tests.parity.torch_refs import import_timm
  import_timm()  # Makes `transformers` importable next to CPU torch.
  import torch
  import transformers
  torch.manual_seed(0)
  return transformers


def test_checkpoint_of_another_architecture(transformers_module, tmp_path):
  tf = transformers_module
  dino = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64,
                                        image_size=32, patch_size=16))
  dino.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError) as error:
    siglip.load_hf_siglip(str(tmp_path), _config())
  message = str(error.value)
  assert "missing from the" in message and "embeddings.patch_embedding.weight" in message
  assert "unexpected in the" in message and "encoder.layer.0" in message


def test_mis_shaped_siglip(transformers_module, tmp_path):
  tf = transformers_module
  wide = tf.SiglipVisionModel(tf.SiglipVisionConfig(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=16))
  wide.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match=r"mis-shaped.*embedding/kernel") as error:
    siglip.load_hf_siglip(str(tmp_path), _config())
  assert "(16, 16, 3, 32)" in str(error.value)


def test_truncated_safetensors(transformers_module, tmp_path):
  tf = transformers_module
  model = tf.SiglipVisionModel(tf.SiglipVisionConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=16))
  model.save_pretrained(tmp_path)
  config = _config(gelu_approximate=True)
  siglip.load_hf_siglip(str(tmp_path), config)  # intact: loads
  path = tmp_path / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match="truncated"):
    siglip.load_hf_siglip(str(tmp_path), config)
