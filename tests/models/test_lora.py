"""Tests of LoRA as a pytree transform (vla_jax/models/lora.py) on tiny flax modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import lora
from vla_jax.typed_config import from_mapping


class Mlp(nn.Module):
  """Dense -> relu -> Dense, plus an attention-style output kernel [heads, head_dim, D]."""

  @nn.compact
  def __call__(self, x):  # x [B, 8]
    h = nn.relu(nn.Dense(12, name="fc1")(x))
    h = nn.Dense(6, name="fc2")(h)  # [B, 6] viewed as 2 heads x 3
    return nn.DenseGeneral(5, axis=(-2, -1), name="out")(h.reshape(h.shape[:-1] + (2, 3)))


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + jnp.tanh(nn.Dense(x.shape[-1], name="mlp")(x)), None


class Scanned(nn.Module):
  """3 blocks under nn.scan: kernels `layers/mlp/kernel` are [3, D, D]."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="layers")(x, None)[0]


def _random_b(lora_params, seed=1):
  """Nonzero B factors so that the delta is visible."""
  key = jax.random.PRNGKey(seed)
  out = {}
  for i, (path, f) in enumerate(sorted(lora_params.items())):
    b = 0.3 * jax.random.normal(jax.random.fold_in(key, i), f["b"].shape)
    out[path] = {"a": f["a"], "b": b}
  return out


def _mlp_setup(config):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  params = Mlp().init(jax.random.PRNGKey(1), x)["params"]
  factors = _random_b(lora.init_lora(jax.random.PRNGKey(2), params, config))
  return x, params, factors


def test_targets_and_factor_shapes():
  config = lora.LoraConfig(rank=2)
  x, params, factors = _mlp_setup(config)
  assert sorted(factors) == ["fc1/kernel", "fc2/kernel", "out/kernel"]
  assert factors["fc1/kernel"]["a"].shape == (8, 2) and factors["fc1/kernel"]["b"].shape == (2, 12)
  # The output kernel [2, 3, 5] takes its input over two axes: a matrix [6, 5].
  assert factors["out/kernel"]["a"].shape == (6, 2) and factors["out/kernel"]["b"].shape == (2, 5)
  assert lora.count_params(factors) == 8 * 2 + 2 * 12 + 12 * 2 + 2 * 6 + 6 * 2 + 2 * 5


def test_apply_lora_equals_explicit_low_rank_computation():
  config = lora.LoraConfig(rank=2, alpha=3.0)
  x, params, factors = _mlp_setup(config)
  got = Mlp().apply({"params": lora.apply_lora(params, factors, config)}, x)
  s = 3.0 / 2

  def dense(h, name, w):
    f = factors[f"{name}/kernel"]
    return h @ w + s * (h @ f["a"]) @ f["b"] + params[name]["bias"]

  h = jax.nn.relu(dense(x, "fc1", params["fc1"]["kernel"]))
  h = dense(h, "fc2", params["fc2"]["kernel"])
  want = dense(h, "out", params["out"]["kernel"].reshape(6, 5))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, Mlp().apply({"params": params}, x), atol=1e-3)


def test_zero_b_at_init_leaves_the_model_unchanged():
  config = lora.LoraConfig(rank=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  params = Mlp().init(jax.random.PRNGKey(1), x)["params"]
  factors = lora.init_lora(jax.random.PRNGKey(2), params, config)
  assert all(np.all(f["b"] == 0) and np.any(f["a"] != 0) for f in factors.values())
  adapted = Mlp().apply({"params": lora.apply_lora(params, factors, config)}, x)
  np.testing.assert_array_equal(adapted, Mlp().apply({"params": params}, x))


def test_merge_then_unmerge_returns_the_original():
  config = lora.LoraConfig(rank=2)
  _, params, factors = _mlp_setup(config)
  merged = lora.merge(params, factors, config)
  assert not np.allclose(merged["fc1"]["kernel"], params["fc1"]["kernel"])
  np.testing.assert_array_equal(merged["fc1"]["bias"], params["fc1"]["bias"])
  restored = lora.unmerge(merged, factors, config)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_scanned_layers_get_per_layer_factors():
  config = lora.LoraConfig(rank=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  params = Scanned().init(jax.random.PRNGKey(1), x)["params"]
  kernel = params["layers"]["mlp"]["kernel"]
  assert kernel.shape == (3, 4, 4)
  factors = _random_b(lora.init_lora(jax.random.PRNGKey(2), params, config))
  f = factors["layers/mlp/kernel"]
  assert f["a"].shape == (3, 4, 2) and f["b"].shape == (3, 2, 4)
  assert not np.allclose(f["a"][0], f["a"][1])
  got = Scanned().apply({"params": lora.apply_lora(params, factors, config)}, x)
  want = x
  for layer in range(3):  # each layer uses its own A, B
    w = kernel[layer] + config.scale * f["a"][layer] @ f["b"][layer]
    want = want + jnp.tanh(want @ w + params["layers"]["mlp"]["bias"][layer])
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name,shape,equation,to_matrix", [
    # Gemma's q_einsum/w [heads, D, head_dim]: input on axis 1.
    ("q_einsum", (2, 5, 4), "td,ndh->tnh", (1, 0, 2)),
    # Gemma's kv_einsum/w [2, kv_heads, D, head_dim]: input on axis 2.
    ("kv_einsum", (2, 3, 5, 4), "td,skdh->tskh", (2, 0, 1, 3)),
])
def test_einsum_weight_with_input_in_the_middle(name, shape, equation, to_matrix):
  config = lora.LoraConfig(rank=3)
  w = jax.random.normal(jax.random.PRNGKey(0), shape)
  params = {"attn": {name: {"w": w}}}
  factors = _random_b(lora.init_lora(jax.random.PRNGKey(1), params, config))
  f = factors[f"attn/{name}/w"]
  out_size = w.size // 5
  assert f["a"].shape == (5, 3) and f["b"].shape == (3, out_size)
  x = jax.random.normal(jax.random.PRNGKey(2), (7, 5))
  w_eff = lora.apply_lora(params, factors, config)["attn"][name]["w"]
  got = jnp.einsum(equation, x, w_eff)
  flat = jnp.transpose(w, to_matrix).reshape(5, out_size)
  want = (x @ flat + config.scale * (x @ f["a"]) @ f["b"]).reshape(got.shape)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_regex_selection_mask_and_errors():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  params = Mlp().init(jax.random.PRNGKey(1), x)["params"]
  config = lora.LoraConfig(rank=2, target_regex=r"^fc\d/")
  assert sorted(lora.init_lora(jax.random.PRNGKey(0), params, config)) == [
      "fc1/kernel", "fc2/kernel"]
  mask = lora.lora_mask(params, config)
  assert mask["fc1"]["kernel"] and mask["fc2"]["kernel"]
  assert not mask["out"]["kernel"] and not mask["fc1"]["bias"]
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  with pytest.raises(ConfigError, match="fc1/kernel") as e:
    lora.init_lora(jax.random.PRNGKey(0), params, lora.LoraConfig(target_regex="q_proj"))
  assert "q_proj" in str(e.value)


def test_factors_must_match_params():
  config = lora.LoraConfig(rank=2)
  _, params, factors = _mlp_setup(config)
  with pytest.raises(InputError, match="rank"):
    lora.apply_lora(params, factors, lora.LoraConfig(rank=3))
  with pytest.raises(InputError, match="no matching"):
    lora.apply_lora(params, {**factors, "nope/kernel": factors["fc1/kernel"]}, config)


def test_dropout_only_when_not_deterministic():
  config = lora.LoraConfig(rank=4, dropout=0.5)
  x, params, factors = _mlp_setup(config)
  det = lora.apply_lora(params, factors, config)
  np.testing.assert_array_equal(det["fc1"]["kernel"],
                                lora.merge(params, factors, config)["fc1"]["kernel"])
  with pytest.raises(InputError, match="rng"):
    lora.apply_lora(params, factors, config, deterministic=False)
  a = lora.apply_lora(params, factors, config, rng=jax.random.PRNGKey(0), deterministic=False)
  b = lora.apply_lora(params, factors, config, rng=jax.random.PRNGKey(1), deterministic=False)
  assert not np.allclose(a["fc1"]["kernel"], b["fc1"]["kernel"])
  assert not np.allclose(a["fc1"]["kernel"], det["fc1"]["kernel"])


def test_init_distributions():
  params = {"big": {"kernel": jnp.zeros((512, 256))}}
  gaussian = lora.init_lora(jax.random.PRNGKey(0), params, lora.LoraConfig(rank=32))
  np.testing.assert_allclose(np.std(gaussian["big/kernel"]["a"]), 1 / 32, rtol=0.05)
  kaiming = lora.init_lora(jax.random.PRNGKey(0), params, lora.LoraConfig(rank=32, init="kaiming"))
  assert np.abs(kaiming["big/kernel"]["a"]).max() <= 1 / np.sqrt(512)


def test_gradients_reach_the_factors_and_jit():
  config = lora.LoraConfig(rank=2)
  x, params, factors = _mlp_setup(config)

  @jax.jit
  def loss(factors):
    return jnp.sum(Mlp().apply({"params": lora.apply_lora(params, factors, config)}, x) ** 2)

  grads = jax.grad(loss)(factors)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_config_validation():
  with pytest.raises(ConfigError, match="lora.rank"):
    lora.LoraConfig(rank=0)
  with pytest.raises(ConfigError, match="lora.target_regex"):
    lora.LoraConfig(target_regex="(")
  with pytest.raises(ConfigError, match="lora.init"):
    lora.LoraConfig(init="zeros")
  # Lists (from JSON / ConfigDict) are normalised to tuples.
  config = from_mapping(lora.LoraConfig, {"in_axes": [["o_proj/kernel$", [0, 1]]]}, "lora")
  assert config.in_axes == (("o_proj/kernel$", (0, 1)),)
  params = {"o_proj": {"kernel": jnp.zeros((4, 4))}}
  with pytest.raises(ConfigError, match="at least one output axis"):
    lora.init_lora(jax.random.PRNGKey(0), params, config)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_in_layer_low_rank_gradients_equal_autodiff(dtype):
  """The in-layer path's hand-written backward (operands reordered for XLA:CPU's layouts)
  gives autodiff's gradients of (x @ A) @ B for x, A and B."""
  rng = np.random.default_rng(0)
  x, a, b, dy = (jnp.asarray(rng.normal(size=shape), dtype)
                 for shape in ((12, 10), (10, 3), (3, 7), (12, 7)))
  plain = lambda x, a, b: jnp.dot(jnp.dot(x, a), b)
  ours = lambda x, a, b: lora._low_rank_delta(x, a, b, None)  # pylint: disable=protected-access
  out, ours_vjp = jax.vjp(ours, x, a, b)
  expected_out, plain_vjp = jax.vjp(plain, x, a, b)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected_out, np.float32),
                             rtol=tol, atol=tol)
  for got, want in zip(ours_vjp(dy), plain_vjp(dy)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
