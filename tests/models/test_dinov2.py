"""DinoV2 on its own: layouts (scan/loop/remat), mixed precision, presets, and the errors
users meet (bad images, bad configs, checkpoints of the wrong model or truncated files).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.models import dinov2
from vla_jax.models.dinov2 import DinoV2, DinoV2Config, dinov2_config
from vla_jax.typed_config import from_mapping
from vla_jax.weights import dinov2 as dinov2_weights
from vla_jax.weights.safetensors import save_safetensors

TINY = dict(width=32, depth=3, num_heads=4, image_size=28, patch_size=7, num_registers=2)


def _images(config: DinoV2Config, batch: int = 2, seed: int = 0) -> np.ndarray:
  shape = (batch, config.image_size, config.image_size, config.channels)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _init(config: DinoV2Config, seed: int = 0):
  """Random params (cached per config: tests must not mutate them)."""
  params = jax.jit(DinoV2(config).init)(jax.random.key(seed), _images(config, 1))["params"]
  # Random layer scales, so a branch that is silently dropped changes the output.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if "gamma" in jax.tree_util.keystr(path) else x, params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: DinoV2Config, params, images):
  return DinoV2(config).apply({"params": params}, images)


def _max_err(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def test_scanned_and_looped_agree():
  looped_config = DinoV2Config(**TINY)
  scanned_config = dataclasses.replace(looped_config, scan=True)
  looped = _init(looped_config)
  scanned = dinov2.loop_to_scan(looped)
  assert scanned["blocks"]["attn"]["query"]["kernel"].shape == (3, 32, 4, 8)
  expected = jax.eval_shape(DinoV2(scanned_config).init, jax.random.key(0),
                            _images(scanned_config, 1))["params"]
  assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(jnp.shape, expected)
  images = _images(looped_config)
  x_loop, out_loop = _forward(looped_config, looped, images)
  x_scan, out_scan = _forward(scanned_config, scanned, images)
  assert out_scan.keys() == out_loop.keys()
  for key in out_loop:
    assert _max_err(out_loop[key], out_scan[key]) < 1e-5, key
  assert _max_err(x_loop, x_scan) < 1e-5
  round_trip = dinov2.scan_to_loop(scanned)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), round_trip, looped))


def test_outputs_layout():
  config = DinoV2Config(**TINY)
  x, out = _forward(config, _init(config), _images(config))
  tokens = DinoV2.num_prefix_tokens(config) + config.num_patches
  assert DinoV2.num_prefix_tokens(config) == 3
  assert x.shape == out["encoded"].shape == (2, tokens, 32)
  assert [k for k in out if k.startswith("block")] == ["block00", "block01", "block02"]
  assert out["cls"].shape == (2, 32) and out["patch_tokens"].shape == (2, 16, 32)
  np.testing.assert_array_equal(out["patch_tokens"], x[:, 3:])
  assert _max_err(out["block02"], x) > 1e-2  # the final norm was applied
  # Without the final norm (OpenVLA's truncated tower) `encoded` is the last block's output.
  no_norm = dataclasses.replace(config, final_norm=False)
  params = {k: v for k, v in _init(config).items() if k != "norm"}
  x, out = _forward(no_norm, params, _images(config))
  np.testing.assert_array_equal(x, out["block02"])


@pytest.mark.slow  # two compiled backward passes
def test_remat_matches_plain_gradients():
  looped = DinoV2Config(**{**TINY, "depth": 2, "image_size": 14})
  scanned = dataclasses.replace(looped, scan=True)
  images = _images(looped)

  @functools.partial(jax.jit, static_argnums=1)
  def grad(p, cfg):
    loss = lambda p: jnp.sum(_forward(cfg, p, images)[1]["patch_tokens"] ** 2)
    return jax.grad(loss)(p)

  params = dinov2.loop_to_scan(_init(looped))
  plain = grad(params, scanned)
  remat_scanned = grad(params, dataclasses.replace(scanned, remat=True))
  remat_looped = dinov2.loop_to_scan(
      grad(_init(looped), dataclasses.replace(looped, remat=True)))
  for remat in (remat_scanned, remat_looped):
    assert max(jax.tree.leaves(jax.tree.map(_max_err, plain, remat))) < 1e-4


def test_bfloat16_compute_is_close_to_float32():
  config = DinoV2Config(**TINY)
  params = _init(config)
  images = _images(config)
  x32, out32 = _forward(config, params, images)
  x16, out16 = _forward(dataclasses.replace(config, dtype="bfloat16"), params, images)
  assert out16["block00"].dtype == jnp.bfloat16
  assert x16.dtype == jnp.float32  # the final norm runs in float32
  assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, params))
  scale = float(jnp.abs(x32).max())
  assert _max_err(x16, x32) < 0.05 * scale
  assert _max_err(x16, x32) > 0  # bf16 really ran
  cosine = jnp.sum(out16["patch_tokens"] * out32["patch_tokens"], -1) / (
      jnp.linalg.norm(out16["patch_tokens"], axis=-1) *
      jnp.linalg.norm(out32["patch_tokens"], axis=-1))
  assert float(cosine.min()) > 0.99


@pytest.mark.parametrize("variant,width,depth,registers", [
    ("S/14", 384, 12, 0), ("B/14", 768, 12, 0), ("L/14", 1024, 24, 0),
    ("L/14-reg4", 1024, 24, 4), ("G/14", 1536, 40, 0), ("mu/14", 32, 2, 0)])
def test_presets(variant, width, depth, registers):
  config = dinov2_config(variant)
  assert (config.width, config.depth, config.num_registers) == (width, depth, registers)
  assert config.patch_size == 14
  if variant == "G/14":
    assert config.ffn == "swiglu" and config.hidden_dim == 4096  # DINOv2-g's SwiGLU width
  if variant == "L/14-reg4":
    assert not config.posemb_covers_cls  # timm no_embed_class layout
  assert dinov2_config(variant, depth=1).depth == 1


def test_tiny_preset_runs_and_swiglu_runs():
  config = dinov2_config("mu/14", ffn="swiglu", num_registers=4, posemb_covers_cls=False)
  x, _ = _forward(config, _init(config), _images(config, 1))
  assert x.shape == (1, 5 + 16, 32) and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("shape,needle", [
    ((2, 32, 32, 3), "Resize the images"),
    ((2, 28, 28, 1), "channels"),
    ((2, 3, 28, 28), "channels"),
    ((28, 28, 3), "Add a batch axis"),
])
def test_bad_images_raise_input_error(shape, needle):
  config = DinoV2Config(**TINY)
  params = _init(config)
  with pytest.raises(InputError, match=needle) as info:
    DinoV2(config).apply({"params": params}, np.zeros(shape, np.float32))
  assert "expects" in str(info.value) and f"found shape {shape}" in str(info.value)


def test_integer_images_raise_input_error():
  config = DinoV2Config(**TINY)
  with pytest.raises(InputError, match="Normalise"):
    DinoV2(config).apply({"params": _init(config)}, np.zeros((1, 28, 28, 3), np.uint8))


def test_config_errors():
  with pytest.raises(ConfigError, match="L/14-reg4"):
    dinov2_config("XL/14")
  with pytest.raises(ConfigError, match="did you mean 'dinov2.num_registers'"):
    from_mapping(DinoV2Config, {"num_register": 4}, where="dinov2")
  with pytest.raises(ConfigError, match="unknown|Unknown"):
    dinov2_config("mu/14", registers=4)
  with pytest.raises(ConfigError, match="divisible"):
    DinoV2Config(width=30, num_heads=4)
  with pytest.raises(ConfigError, match="multiple"):
    DinoV2Config(image_size=100, patch_size=14)
  with pytest.raises(ConfigError, match="ffn"):
    DinoV2Config(ffn="geglu")
  with pytest.raises(ConfigError, match="dtype"):
    DinoV2Config(dtype="fp8")


def _hub_checkpoint(config: DinoV2Config, depth: int = None, grid: int = None):
  """A random HF-hub-layout DINOv2 state dict for `config` (no torch needed)."""
  rng = np.random.default_rng(0)
  d, f = config.width, config.hidden_dim
  grid = grid or config.grid_size
  shapes = {
      "embeddings.cls_token": (1, 1, d), "embeddings.mask_token": (1, d),
      "embeddings.position_embeddings": (1, 1 + grid * grid, d),
      "embeddings.patch_embeddings.projection.weight": (d, 3, config.patch_size,
                                                        config.patch_size),
      "embeddings.patch_embeddings.projection.bias": (d,),
      "layernorm.weight": (d,), "layernorm.bias": (d,)}
  if config.num_registers:
    shapes["embeddings.register_tokens"] = (1, config.num_registers, d)
  for i in range(config.depth if depth is None else depth):
    layer = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes[f"{layer}attention.attention.{name}.weight"] = (d, d)
      shapes[f"{layer}attention.attention.{name}.bias"] = (d,)
    shapes.update({
        f"{layer}attention.output.dense.weight": (d, d),
        f"{layer}attention.output.dense.bias": (d,),
        f"{layer}mlp.fc1.weight": (f, d), f"{layer}mlp.fc1.bias": (f,),
        f"{layer}mlp.fc2.weight": (d, f), f"{layer}mlp.fc2.bias": (d,),
        f"{layer}layer_scale1.lambda1": (d,), f"{layer}layer_scale2.lambda1": (d,)})
    for norm in ("norm1", "norm2"):
      shapes[f"{layer}{norm}.weight"] = (d,)
      shapes[f"{layer}{norm}.bias"] = (d,)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_hub_checkpoint_loads_and_resamples_position_embedding(tmp_path):
  config = DinoV2Config(**TINY, scan=True)
  checkpoint = _hub_checkpoint(config, grid=2)  # stored for a 2x2 grid, model wants 4x4
  path = str(tmp_path / "model.safetensors")
  save_safetensors(path, checkpoint)
  params = dinov2_weights.load_hf_dinov2(path, config)
  posemb = np.asarray(params["pos_embedding"])
  assert posemb.shape == (1, 17, 32)
  # The CLS slot is copied, not resampled.
  np.testing.assert_array_equal(posemb[0, 0], checkpoint["embeddings.position_embeddings"][0, 0])
  np.testing.assert_allclose(
      np.asarray(params["blocks"]["ls1"]["gamma"][1]),
      checkpoint["encoder.layer.1.layer_scale1.lambda1"])
  x, _ = DinoV2(config).apply({"params": params}, _images(config))
  assert bool(jnp.all(jnp.isfinite(x)))


def test_resample_pos_embedding_keeps_a_constant_grid():
  posemb = np.concatenate([np.full((1, 1, 8), 5.0), np.ones((1, 9, 8))], axis=1)
  out = dinov2.resample_pos_embedding(posemb, num_prefix=1, grid_size=5)
  assert out.shape == (1, 26, 8)
  np.testing.assert_allclose(out[0, 0], 5.0)
  np.testing.assert_allclose(out[0, 1:], 1.0, atol=1e-6)


def test_siglip_checkpoint_raises_checkpoint_error(tmp_path):
  siglip = {
      "vision_model.embeddings.patch_embedding.weight": np.zeros((32, 3, 7, 7), np.float32),
      "vision_model.embeddings.position_embedding.weight": np.zeros((16, 32), np.float32),
      "vision_model.encoder.layers.0.self_attn.q_proj.weight": np.zeros((32, 32), np.float32),
      "vision_model.post_layernorm.weight": np.zeros((32,), np.float32)}
  path = str(tmp_path / "siglip.safetensors")
  save_safetensors(path, siglip)
  with pytest.raises(CheckpointError) as info:
    dinov2_weights.load_hf_dinov2(path, DinoV2Config(**TINY))
  message = str(info.value)
  assert "missing from" in message and "embeddings.cls_token" in message
  assert "unexpected in" in message and "vision_model.encoder.layers.0" in message


def test_truncated_checkpoints_raise_checkpoint_error(tmp_path):
  config = DinoV2Config(**TINY)
  short = _hub_checkpoint(config, depth=2)  # a 2-block checkpoint for a 3-block model
  path = str(tmp_path / "short.safetensors")
  save_safetensors(path, short)
  missing_block = r"missing from.*\(18\): encoder\.layer\.2\.attention"
  with pytest.raises(CheckpointError, match=missing_block):
    dinov2_weights.load_hf_dinov2(path, config)
  with pytest.raises(CheckpointError, match="mis-shaped"):  # a width-64 model
    dinov2_weights.load_hf_dinov2(path, DinoV2Config(**{**TINY, "width": 64, "depth": 2}))
  full = str(tmp_path / "full.safetensors")
  save_safetensors(full, _hub_checkpoint(config))
  with open(full, "rb") as f:
    data = f.read()
  cut = str(tmp_path / "cut.safetensors")
  with open(cut, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    dinov2_weights.load_hf_dinov2(cut, config)


def test_loader_config_mismatches_are_config_errors():
  config = DinoV2Config(**TINY, posemb_covers_cls=False)
  with pytest.raises(ConfigError, match="posemb_covers_cls=True"):
    dinov2_weights.hf_dinov2_rules(config)
  with pytest.raises(ConfigError, match="exceeds"):
    dinov2_weights.timm_dinov2_unused(DinoV2Config(**TINY), checkpoint_depth=2)
  with pytest.raises(CheckpointError, match="blocks"):
    dinov2_weights.load_timm_dinov2({"cls_token": np.zeros((1, 1, 32))}, config)
