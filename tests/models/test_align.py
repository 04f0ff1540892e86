"""Tests of the alignment projector, losses and teacher-grid matching (vla_jax/models/align.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import align
from vla_jax.typed_config import from_mapping


def _random(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


# ---------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_recipe():
  config = align.AlignConfig()
  assert (config.align_layer, config.align_coeff, config.projector_width) == (16, 0.2, 2048)
  assert config.loss == "cosine" and not config.projector_trainable


@pytest.mark.parametrize("key,value", [("loss", "cos"), ("grid_match", "crop"),
                                       ("projector_dropout", 1.0), ("temperature", 0.0),
                                       ("align_coeff", -1.0), ("align_layer", -2)])
def test_config_rejects_bad_values_naming_the_key(key, value):
  with pytest.raises(ConfigError, match=f"align.{key}"):
    align.AlignConfig(**{key: value})


def test_config_from_mapping_rejects_unknown_key():
  with pytest.raises(ConfigError, match="align_coef"):
    from_mapping(align.AlignConfig, {"align_coef": 0.5}, "align")


# ---------------------------------------------------------------------------------------
# Losses: known values.
# ---------------------------------------------------------------------------------------
def test_cosine_loss_known_values():
  x = _random(0, (2, 5, 8))
  np.testing.assert_allclose(align.cosine_loss(x, x), -1.0, atol=1e-6)
  np.testing.assert_allclose(align.cosine_loss(x, -3.0 * x), 1.0, atol=1e-6)
  np.testing.assert_allclose(align.cosine_loss(7.0 * x, x), -1.0, atol=1e-6)  # scale-free
  e = jnp.eye(8)
  student = jnp.broadcast_to(e[0], (2, 5, 8))
  teacher = jnp.broadcast_to(e[1], (2, 5, 8))
  np.testing.assert_allclose(align.cosine_loss(student, teacher), 0.0, atol=1e-7)


def test_cosine_loss_matches_numpy_reference():
  s, t = np.asarray(_random(1, (3, 4, 6))), np.asarray(_random(2, (3, 4, 6)))
  cos = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
  np.testing.assert_allclose(align.cosine_loss(s, t), -cos.mean(), rtol=1e-5)


def test_l2_loss_known_values():
  x = _random(3, (2, 4, 8))
  np.testing.assert_allclose(align.l2_loss(x, 5.0 * x), 0.0, atol=1e-6)
  np.testing.assert_allclose(align.l2_loss(x, -x), 4.0, atol=1e-5)
  y = _random(4, (2, 4, 8))
  np.testing.assert_allclose(align.l2_loss(x, y), 2.0 + 2.0 * align.cosine_loss(x, y), atol=1e-5)


def test_mask_ignores_masked_patches():
  s, t = _random(5, (2, 6, 8)), _random(6, (2, 6, 8))
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
  garbage_t = t.at[:, 3:].set(1e3 * _random(7, (2, 3, 8)))
  fns = (align.cosine_loss, align.l2_loss, align.kl_loss, align.nt_xent_loss)

  @jax.jit  # one compilation instead of many eager ops
  def both(s, t, garbage_t):
    return ([fn(s, garbage_t, mask) for fn in fns], [fn(s[:, :3], t[:, :3]) for fn in fns])

  for masked, sliced in zip(*both(s, t, garbage_t)):
    np.testing.assert_allclose(masked, sliced, rtol=1e-5)


def test_zero_vectors_give_finite_loss_and_gradient():
  zeros = jnp.zeros((1, 3, 4))

  def loss(name, s):
    return align.alignment_loss(align.AlignConfig(loss=name), s, zeros)[0]

  @jax.jit
  def values_and_grads(s):
    return {name: jax.value_and_grad(functools.partial(loss, name))(s) for name in align.LOSSES}

  for name, (value, grad) in values_and_grads(zeros).items():
    assert np.isfinite(value) and np.all(np.isfinite(grad)), name


def test_kl_zero_for_identical_and_matches_numpy():
  x = _random(8, (2, 3, 5))
  np.testing.assert_allclose(align.kl_loss(x, x), 0.0, atol=1e-6)
  s = np.asarray(_random(9, (2, 3, 5)), np.float64)
  t = np.asarray(_random(10, (2, 3, 5)), np.float64)

  def softmax(v):
    v = v / np.linalg.norm(v, axis=-1, keepdims=True) / 0.5
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(t), softmax(s)
  want = (p * np.log(p / q)).sum(-1).mean()
  np.testing.assert_allclose(align.kl_loss(s, t, temperature=0.5), want, rtol=1e-5)
  assert want > 0


def test_nt_xent_matches_numpy_and_prefers_matched_pairs():
  s = np.asarray(_random(11, (2, 4, 8)), np.float64)
  t = s + 0.3 * np.asarray(_random(12, (2, 4, 8)), np.float64)
  u = (s / np.linalg.norm(s, axis=-1, keepdims=True)).reshape(8, 8)
  z = (t / np.linalg.norm(t, axis=-1, keepdims=True)).reshape(8, 8)
  want = 0.0
  for i in range(8):  # cross entropy of anchor i against all teacher patches, written out
    logits = np.array([u[i] @ z[j] for j in range(8)]) / 0.1
    want += -(logits[i] - np.log(np.exp(logits).sum())) / 8
  matched = align.nt_xent_loss(s, t, temperature=0.1)
  np.testing.assert_allclose(matched, want, rtol=1e-5)
  shuffled_t = t.reshape(8, 8)[np.random.default_rng(0).permutation(8)].reshape(2, 4, 8)
  assert float(matched) < float(align.nt_xent_loss(s, shuffled_t, temperature=0.1))


# ---------------------------------------------------------------------------------------
# alignment_loss: the single entry point.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", align.LOSSES)
def test_no_gradient_flows_into_the_teacher(name):
  config = align.AlignConfig(loss=name)
  s, t = _random(13, (2, 4, 8)), _random(14, (2, 4, 8))
  grad_s, grad_t = jax.grad(lambda s, t: align.alignment_loss(config, s, t)[0],
                            argnums=(0, 1))(s, t)
  assert np.abs(np.asarray(grad_s)).max() > 0
  np.testing.assert_array_equal(grad_t, 0.0)


def test_alignment_loss_dispatch_and_metrics():
  s, t = _random(15, (2, 4, 8)), _random(16, (2, 4, 8))
  loss, metrics = align.alignment_loss(align.AlignConfig(), s.astype(jnp.bfloat16), t)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, align.cosine_loss(s.astype(jnp.bfloat16).astype(jnp.float32), t),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["align/cos_sim"], -loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["align/teacher_norm"],
                             np.linalg.norm(np.asarray(t), axis=-1).mean(), rtol=1e-5)
  l2, _ = align.alignment_loss(align.AlignConfig(loss="l2"), s, t)
  np.testing.assert_allclose(l2, align.l2_loss(s, t), rtol=1e-6)
  kl, _ = align.alignment_loss(align.AlignConfig(loss="kl", temperature=0.3), s, t)
  np.testing.assert_allclose(kl, align.kl_loss(s, t, temperature=0.3), rtol=1e-6)
  jitted = jax.jit(lambda s, t: align.alignment_loss(align.AlignConfig(), s, t))
  np.testing.assert_allclose(jitted(s, t)[0], align.cosine_loss(s, t), rtol=1e-6)


def test_alignment_loss_shape_mismatch_is_an_input_error():
  with pytest.raises(InputError, match="match_teacher_grid"):
    align.alignment_loss(align.AlignConfig(), jnp.zeros((2, 4, 8)), jnp.zeros((2, 9, 8)))
  with pytest.raises(InputError, match="mask"):
    align.alignment_loss(align.AlignConfig(), jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8)),
                         jnp.ones((2, 5), bool))


# ---------------------------------------------------------------------------------------
# Projector.
# ---------------------------------------------------------------------------------------
def test_projector_matches_torch_reference():
  torch.manual_seed(0)
  ds, width, dt = 12, 16, 10
  ref = torch.nn.Sequential(
      torch.nn.LayerNorm(ds), torch.nn.Linear(ds, width), torch.nn.SiLU(), torch.nn.Dropout(0.1),
      torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Dropout(0.1),
      torch.nn.Linear(width, dt)).eval()
  with torch.no_grad():  # non-trivial LayerNorm affine parameters
    ref[0].weight.uniform_(0.5, 1.5)
    ref[0].bias.uniform_(-0.5, 0.5)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  params = {"norm": {"scale": sd["0.weight"], "bias": sd["0.bias"]}}
  for ours, theirs in (("fc1", "1"), ("fc2", "4"), ("fc3", "7")):
    params[ours] = {"kernel": sd[f"{theirs}.weight"].T, "bias": sd[f"{theirs}.bias"]}
  x = np.random.default_rng(0).normal(size=(2, 5, ds)).astype(np.float32) * 3
  module = align.AlignProjector(teacher_dim=dt, width=width)
  expected_shapes = jax.tree.map(np.shape, module.init(jax.random.PRNGKey(0), x)["params"])
  assert jax.tree.map(np.shape, params) == expected_shapes
  got = module.apply({"params": params}, x)
  want = ref(torch.from_numpy(x)).detach().numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_projector_init_follows_torch_linear_bounds():
  module = align.AlignProjector(teacher_dim=8, width=64)
  params = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 1, 32)))["params"]
  for name, fan_in in (("fc1", 32), ("fc2", 64), ("fc3", 64)):
    for leaf in ("kernel", "bias"):
      value = np.abs(np.asarray(params[name][leaf]))
      assert value.max() <= 1 / np.sqrt(fan_in) and value.max() > 0.5 / np.sqrt(fan_in)


def test_frozen_projector_uses_no_dropout_randomness():
  x = _random(17, (2, 4, 16))
  frozen = align.AlignProjector.from_config(align.AlignConfig(projector_width=32), teacher_dim=8)
  variables = frozen.init(jax.random.PRNGKey(0), x)
  # No "dropout" rng passed: a frozen projector must not ask for one.
  train_out = frozen.apply(variables, x, deterministic=False)
  np.testing.assert_array_equal(train_out, frozen.apply(variables, x))
  assert train_out.shape == (2, 4, 8) and train_out.dtype == jnp.float32
  assert frozen.apply(variables, x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_trainable_projector_applies_dropout():
  x = _random(18, (2, 4, 16))
  config = align.AlignConfig(projector_width=32, projector_trainable=True, projector_dropout=0.5)
  module = align.AlignProjector.from_config(config, teacher_dim=8)
  variables = module.init(jax.random.PRNGKey(0), x)
  a = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  b = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, x))


# ---------------------------------------------------------------------------------------
# Grid matching.
# ---------------------------------------------------------------------------------------
def test_teacher_input_size():
  assert align.teacher_input_size(16, 14) == 224
  assert align.teacher_input_size(16, 16) == 256
  with pytest.raises(ConfigError):
    align.teacher_input_size(0, 14)


def _linear_field(side, coeffs):
  """Tokens [1, side^2, D] of f_d(x, y) = a_d x + b_d y + c_d at cell centres, row-major."""
  centres = (np.arange(side) + 0.5) / side
  y, x = np.meshgrid(centres, centres, indexing="ij")
  feats = np.stack([a * x + b * y + c for a, b, c in coeffs], axis=-1)
  return feats.reshape(1, side * side, len(coeffs)).astype(np.float32)


@pytest.mark.parametrize("src,dst", [(37, 16), (32, 16), (14, 16), (8, 16), (16, 16), (1, 4)])
def test_resample_is_exact_on_constant_and_linear_fields(src, dst):
  constant = np.full((2, src * src, 3), 2.5, np.float32)
  np.testing.assert_allclose(align.resample_patch_grid(constant, dst), 2.5, rtol=1e-6)
  if src == 1:
    return
  coeffs = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (2.0, -3.0, 0.5)]
  got = align.resample_patch_grid(_linear_field(src, coeffs), dst)
  assert got.shape == (1, dst * dst, 3)
  np.testing.assert_allclose(got, _linear_field(dst, coeffs), atol=1e-5)


def test_resample_keeps_dtype_and_jits():
  x = _random(19, (2, 64, 4)).astype(jnp.bfloat16)
  out = jax.jit(align.resample_patch_grid, static_argnums=1)(x, 4)
  assert out.shape == (2, 16, 4) and out.dtype == jnp.bfloat16
  # Shrinking averages: the output varies less than the input (antialiasing).
  assert np.asarray(out, np.float32).std() < 0.8 * np.asarray(x, np.float32).std()


def test_match_teacher_grid_modes_and_errors():
  teacher = _random(20, (2, 37 * 37, 4))
  with pytest.raises(ConfigError) as e:
    align.match_teacher_grid(teacher, 256, "resize_input")
  message = str(e.value)
  assert "37x37" in message and "16x16" in message
  assert "resample_features" in message and "teacher_input_size" in message
  out = align.match_teacher_grid(teacher, 256, "resample_features")
  np.testing.assert_allclose(out, align.resample_patch_grid(teacher, 16))
  same = _random(21, (2, 256, 4))
  assert align.match_teacher_grid(same, 256, "resize_input") is same
  with pytest.raises(ConfigError, match="not a square grid"):
    align.match_teacher_grid(_random(22, (1, 257, 4)), 256, "resample_features")
  with pytest.raises(ConfigError, match="grid_match"):
    align.match_teacher_grid(same, 64, "nearest")


def test_resize_images():
  images = jnp.full((2, 20, 30, 3), 0.25, jnp.float32)
  out = align.resize_images(images, 14)
  assert out.shape == (2, 14, 14, 3)
  np.testing.assert_allclose(out, 0.25, rtol=1e-6)
  assert align.resize_images(images, (40, 10)).shape == (2, 40, 10, 3)
  assert align.resize_images(images.astype(jnp.bfloat16), 7).dtype == jnp.bfloat16
  with pytest.raises(InputError):
    align.resize_images(jnp.zeros((20, 30, 3)), 14)
