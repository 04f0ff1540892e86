"""VLM pretraining: questions encode the scene, the student learns them, files load safely."""

import json

import chex
import jax
import numpy as np
import pytest

from configs.align import get_config
from vla_jax import modeling
from vla_jax.actions import ActionTokenizer
from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.experiment import parse_config
from vla_jax.sim import bundled
from vla_jax.text import Tokenizer
from vla_jax.train import loop, pretrain, vlm_pretrain

SMALL = pretrain.PretrainConfig(splits=("train",), episodes_per_split=40,
                                frames_per_episode=4, steps=30, batch_size=16,
                                learning_rate=2e-3, warmup_steps=5)
SMALL_VLM = vlm_pretrain.VLMPretrainConfig(steps=80, batch_size=16, learning_rate=2e-3,
                                           warmup_steps=10)


@pytest.fixture(scope="module")
def experiment():
  return parse_config(get_config("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("tok"))
  return cache, Tokenizer.from_path(bundled.bundled_tokenizer_path(cache))


def _scene(rows=6):
  rng = np.random.default_rng(0)
  return {"images": np.zeros((rows, 64, 64, 3), np.uint8),
          "object_xy": rng.uniform(-0.2, 0.2, (rows, 2)).astype(np.float32),
          "receptacle_xy": rng.uniform(-0.2, 0.2, (rows, 2)).astype(np.float32),
          "effector": np.concatenate([rng.uniform(-0.2, 0.2, (rows, 2)),
                                      rng.uniform(0.0, 0.2, (rows, 1))], 1).astype(np.float32),
          "gripper": np.float32([1, 0, 1, 0, 1, 0][:rows]),
          "holding": np.float32([0, 1, 0, 0, 1, 0][:rows]),
          "yaw_error": np.float32([0.1, -0.2, 0, 0.3, 0, -0.5][:rows]),
          "object_name": np.array(["red cube"] * rows),
          "receptacle_name": np.array(["plate"] * rows)}


def test_questions_encode_the_scene_in_number_ids(tokenizer):
  _, tok = tokenizer
  action_tokenizer = ActionTokenizer(vocab_size=tok.vocab_size)
  scene = _scene()
  kinds = np.arange(len(vlm_pretrain.QUESTIONS))
  batch = vlm_pretrain.question_batch(scene, np.arange(6), kinds, tok, action_tokenizer, 48,
                                      tok.vocab_size)
  chex.assert_shape([batch["tokens"], batch["loss_mask"], batch["input_mask"]], (6, 48))
  for row, kind in enumerate(kinds):
    question, values = vlm_pretrain.answer(scene, row, kind)
    supervised = batch["tokens"][row][batch["loss_mask"][row]]
    assert supervised[-1] == tok.eos_id and len(supervised) == len(values) + 1
    assert action_tokenizer.is_action_token(supervised[:-1]).all()
    np.testing.assert_allclose(action_tokenizer.decode(supervised[:-1]), values, atol=2 / 255)
    prompt = batch["tokens"][row][batch["input_mask"][row] & ~batch["loss_mask"][row]]
    assert not action_tokenizer.is_action_token(prompt).any()
    assert tok.decode(prompt.tolist()).strip().startswith(f"In: {question}")
  # The relative questions are differences of the absolute ones (in table units).
  _, obj = vlm_pretrain.answer(scene, 0, 0)
  _, ee = vlm_pretrain.answer(scene, 0, 2)
  _, offset = vlm_pretrain.answer(scene, 0, 3)
  np.testing.assert_allclose(offset, np.clip(obj - ee[:2], -1, 1), atol=1e-6)


def test_bundled_student_needs_the_bundled_tokenizer(tmp_path):
  config = get_config("tiny")
  config.tokenizer = str(tmp_path / "other.model")
  with pytest.raises(ConfigError, match="bundled tokenizer"):
    loop.train(config, str(tmp_path / "run"))


@pytest.mark.slow  # renders and trains for about two minutes
def test_vlm_pretraining_learns_answers_and_its_file_loads(experiment, tokenizer):
  cache, _ = tokenizer
  paths = pretrain.ensure_pretrained(experiment, SMALL, cache, progress=False,
                                     parts=("student",), vlm_config=SMALL_VLM)
  with open(pretrain.metrics_path(paths["student"])) as f:
    metrics = json.load(f)  # held-out answers of the pretrained student vs the initial one
  assert metrics["l1"] < 0.75 * metrics["l1_before"], metrics
  trained = pretrain.load_student(paths["student"], experiment,
                                  pretrain.file_digest(bundled.bundled_tokenizer_path(cache)))
  models = modeling.build_models(experiment)
  loaded = modeling.create_params(models, experiment,
                                  {"student": paths["student"], "student_format": "bundled"},
                                  jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, loaded["student"], trained)
  other = get_config("tiny")
  other.model.llm.vocab_size = 896
  with pytest.raises(CheckpointError, match="another student"):
    pretrain.load_student(paths["student"], parse_config(other))
  with pytest.raises(CheckpointError, match="another tokenizer"):
    pretrain.load_student(paths["student"], experiment, "0123456789ab")
