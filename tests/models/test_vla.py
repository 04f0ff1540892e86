"""The VLA student: presets, visual-token bookkeeping, LoRA on the whole model, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import lora as lora_lib
from vla_jax.models.vla import VLA, VLA_PRESETS, vla_config
from vla_jax.weights import vla as vla_weights


@pytest.fixture(scope="module")
def tiny():
  config = vla_config("tiny")
  model = VLA(config)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, 512).at[:, 0].set(1)
  params = jax.jit(model.init)(jax.random.key(2), images, tokens)["params"]
  return config, model, params, images, tokens


def test_outputs_and_visual_positions(tiny):
  config, model, params, images, tokens = tiny
  out = model.apply({"params": params}, images, tokens, align_layer=2, return_all_hidden=True)
  n = config.num_visual_tokens
  assert out["logits"].shape == (2, 6 + n, config.llm.vocab_size)
  np.testing.assert_array_equal(out["visual_positions"], np.arange(1, 1 + n))
  # The captured slice is exactly layer 2's hidden state at the visual positions.
  np.testing.assert_allclose(out["align_hidden"], out["hidden"][2][:, 1:1 + n], atol=1e-6)


def test_uint8_images_equal_float_images(tiny):
  _, model, params, images, tokens = tiny
  as_uint8 = jnp.round(images * 255).astype(jnp.uint8)
  a = model.apply({"params": params}, as_uint8, tokens)["logits"]
  b = model.apply({"params": params}, as_uint8.astype(jnp.float32) / 255, tokens)["logits"]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_lora_merge_equals_unmerged_forward_on_whole_vla(tiny):
  _, model, params, images, tokens = tiny
  config = lora_lib.LoraConfig(rank=4, alpha=8.0,
                               target_regex=r"^(?!.*(lm_head|embedding/kernel|patch_embed))")
  factors = lora_lib.init_lora(jax.random.key(3), params, config)
  # B starts at zero (identity); give it values so the test can fail.
  factors = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(4), x.shape),
                         factors)
  adapted = lora_lib.apply_lora(params, factors, config)
  merged = lora_lib.merge(params, factors, config)
  out_adapted = model.apply({"params": adapted}, images, tokens)["logits"]
  out_merged = model.apply({"params": merged}, images, tokens)["logits"]
  out_base = model.apply({"params": params}, images, tokens)["logits"]
  np.testing.assert_allclose(out_merged, out_adapted, atol=1e-5)
  assert np.abs(out_merged - out_base).max() > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lora_lib.unmerge(merged, factors, config), params)


@pytest.mark.parametrize("shape,match", [((2, 32, 32, 3), "64x64"),
                                         ((2, 64, 64, 4), "RGB"),
                                         ((3, 64, 64, 3), "batch")])
def test_bad_images_are_clear_errors(tiny, shape, match):
  _, model, params, _, tokens = tiny
  with pytest.raises(InputError, match=match):
    model.apply({"params": params}, jnp.zeros(shape), tokens)


def test_presets_and_abstract_params():
  assert set(VLA_PRESETS) >= {"tiny", "openvla_7b", "paligemma_3b"}
  with pytest.raises(ConfigError, match="Unknown VLA preset"):
    vla_config("openvla_13b")
  # The 7B layout is checked without allocating it: parameter count of OpenVLA-7B.
  abstract = vla_weights.abstract_params(vla_config("openvla_7b"))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))
  assert 7.4e9 < count < 7.6e9
