"""Fixtures of the training tests: one small experiment initialised once per session."""

import jax
import pytest

from tests.train.helpers import small_experiment
from vla_jax import modeling
from vla_jax.sim import bundled
from vla_jax.text import openvla_prompt, train_sentencepiece


@pytest.fixture(scope="session")
def tiny_setup():
  """(experiment with align_coeff 0.2, models, params); LoRA variants reuse the params."""
  experiment = small_experiment(align_coeff=0.2)
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))
  return experiment, models, params


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
  """A 12-episode tabletop dataset and a tokenizer trained on its prompts (end-to-end runs)."""
  root = tmp_path_factory.mktemp("tabletop")
  data_dir = bundled.bundled_dataset_dir(str(root), num_train=12, num_val=4, progress=False)
  prompts = [openvla_prompt(f"put the {o} on the plate") for o in ("cube", "ball", "star")]
  tokenizer = train_sentencepiece(prompts * 4, root / "tok.model", vocab_size=300,
                                  action_ids=256)
  return data_dir, str(tokenizer.path)
