"""Fixtures of the training tests: one small experiment initialised once per session."""

import jax
import pytest

from tests.train.helpers import small_experiment
from vla_jax import modeling


@pytest.fixture(scope="session")
def tiny_setup():
  """(experiment with align_coeff 0.2, models, params); LoRA variants reuse the params."""
  experiment = small_experiment(align_coeff=0.2)
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))
  return experiment, models, params
