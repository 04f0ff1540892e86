"""The fused train step over several steps: gradient accumulation, alignment, eval."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.train.helpers import ACTION_TOKENIZER, make_batch
from tests.train.helpers import _config, _run, jitted_train_step
from vla_jax.train import step as step_lib


@pytest.fixture(scope="module")
def setup(tiny_setup):
  return tiny_setup


@pytest.mark.slow  # two compiled steps of another batch shape
def test_grad_accumulation_equals_big_batch(setup):
  experiment, models, params = setup
  batch = make_batch(5)
  # Large Adam epsilon: the first update is linear in the gradient (see test_step.py).
  config = _config(learning_rate=1.0, adam_eps=1.0)
  big, _, big_hist = _run(experiment, models, params, config, [batch])
  acc, _, acc_hist = _run(experiment, models, params,
                          dataclasses.replace(config, grad_accum_steps=2), [batch])
  for key in ("loss/total", "loss/action", "loss/align", "align/cos_sim", "grad_norm",
              "action/token_accuracy", "action/l1"):
    np.testing.assert_allclose(acc_hist[0][key], big_hist[0][key], rtol=2e-5, atol=1e-6,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), acc.params, big.params)


def test_alignment_improves_with_action_loss(setup):
  experiment, models, params = setup
  batch = make_batch(7)
  state, frozen, history = _run(experiment, models, params, _config(), [batch] * 15)
  first, last = history[0], history[-1]
  assert last["loss/align"] < first["loss/align"] - 0.05
  assert last["align/cos_sim"] > first["align/cos_sim"] + 0.05
  assert last["loss/action"] < 0.5 * first["loss/action"]
  assert all(h["learning_rate"] == pytest.approx(1e-3) for h in history)
  # Open-loop eval of the trained state agrees with the next train step's metrics.
  eval_step = jax.jit(step_lib.make_eval_step(models, experiment, ACTION_TOKENIZER))
  evaluated = jax.device_get(eval_step(state, frozen, batch))
  _, trained = jitted_train_step(models, experiment, _config())(state, frozen, batch)
  for key in ("loss/total", "loss/action", "loss/align", "align/cos_sim",
              "action/token_accuracy", "action/l1"):
    np.testing.assert_allclose(evaluated[key], trained[key], rtol=1e-5, atol=1e-6, err_msg=key)
