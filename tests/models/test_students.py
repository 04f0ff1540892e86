"""The student registry (`vla_jax.models.students`): `model.arch` -> `StudentLayout`.

A layout registered by one line is built, run, masked and refused by the parts that
read `model.arch`; unknown architectures and checkpoint formats are refused by name.
"""

import dataclasses

import jax
import numpy as np
import pytest

from tests.models.test_vla import _random_params, _small, _train_batch
from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.models import students
from vla_jax.models.vla import VLA, VLAConfig, sequence_layout, vla_config
from vla_jax.train import step as step_lib
from vla_jax.weights import vla as vla_weights


def test_registered_layouts_and_refusals():
  assert set(students.LAYOUTS) == {"openvla", "paligemma"}
  for preset, arch in (("tiny", "openvla"), ("tiny_paligemma", "paligemma")):
    config = vla_config(preset)
    assert config.layout is students.LAYOUTS[arch] and config.layout.arch == arch
  tiny = vla_config("tiny")
  with pytest.raises(ConfigError, match=r"model.arch='mamba'; expected one of"):
    dataclasses.replace(tiny, arch="mamba")
  # A layout's own checks still run: PaliGemma has no DINOv2 tower.
  with pytest.raises(ConfigError, match="model.dino must be None"):
    dataclasses.replace(tiny, arch="paligemma")
  with pytest.raises(CheckpointError, match=r"No 'big_vision' loader for arch='openvla'; "
                                            r"it loads 'hf'"):
    vla_weights.load_student("/nonexistent", tiny, "big_vision")


def test_a_new_layout_is_one_registration(monkeypatch):
  """A toy layout (PaliGemma's tower and projector, the image after BOS, positions from 0)
  registered by one line: the model, the sequence layout and the train step follow it."""
  toy = dataclasses.replace(students.layout("paligemma"), arch="toy", visual_start=1,
                            first_position=0, loaders={})
  monkeypatch.setitem(students.LAYOUTS, "toy", toy)
  config = dataclasses.replace(_small(vla_config("tiny_paligemma")), arch="toy")
  n = config.num_visual_tokens
  batch = _train_batch(config, np.random.default_rng(0))
  model = VLA(config)
  params = _random_params(model, batch)
  out = step_lib.student_forward(model, params, batch)
  np.testing.assert_array_equal(out["visual_positions"], np.arange(1, 1 + n))
  prefix = step_lib.supervised_prefix_mask(batch["input_mask"], batch["loss_mask"])
  mask, attn_mask, positions = jax.device_get(
      sequence_layout(config, batch["input_mask"], prefix))
  assert mask[:, 1:1 + n].all()
  np.testing.assert_array_equal(positions[0, :1 + n + 2], np.arange(1 + n + 2))
  # Prefix-LM: BOS sees the image (bidirectional prefix); the last target sees nothing after.
  assert attn_mask[0, 0, 1:1 + n].all()
  last = int(np.nonzero(mask[0])[0].max())
  assert not attn_mask[0, :last, last].any()
  # Logits at the visual tokens' text neighbours differ from PaliGemma's layout: the
  # registration really changed the sequence.
  paligemma = dataclasses.replace(config, arch="paligemma")
  other = step_lib.student_forward(VLA(paligemma), params, batch)
  assert not np.allclose(out["logits"], other["logits"])
  with pytest.raises(CheckpointError, match="No 'hf' loader for arch='toy'"):
    vla_weights.load_student("/nonexistent", config, "hf")


def test_unknown_arch_in_a_config_mapping_is_refused():
  with pytest.raises(ConfigError, match="model.arch='gpt'"):
    VLAConfig(arch="gpt", llm=vla_config("tiny").llm, siglip=vla_config("tiny").siglip)
