"""Moving average of the weights (`train.ema_decay`): the update rule, skipped steps, and
that validation, checkpoints, resume and export use the average."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import _config, jitted_train_step, make_batch
from tests.train.test_faults import make_config
from vla_jax.errors import ConfigError
from vla_jax.eval import policy as policy_lib
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import loop
from vla_jax.train import state as state_lib

DECAY = 0.75


def test_ema_decay_is_validated():
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ConfigError, match="train.ema_decay must be in"):
      state_lib.TrainConfig(ema_decay=bad)
  assert state_lib.create_train_state.__doc__  # off by default: no average is kept
  assert state_lib.TrainConfig().ema_decay == 0.0


def test_ema_follows_the_weights_and_skips_nonfinite_steps(tiny_setup):
  experiment, models, params = tiny_setup
  config = _config(ema_decay=DECAY)
  state, frozen = state_lib.create_train_state(experiment, config, params, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, state.ema, state.trainable)
  initial = jax.tree.map(np.asarray, state.trainable)
  train_step = jitted_train_step(models, experiment, config)
  after, metrics = train_step(state, frozen, make_batch(0))
  assert float(metrics["nonfinite"]) == 0.0
  # ema = d * initial + (1 - d) * weights after the update, leaf by leaf.
  expected = jax.tree.map(lambda e, w: DECAY * e + (1 - DECAY) * np.asarray(w), initial,
                          after.trainable)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               after.ema, expected)
  moved = jax.tree.leaves(jax.tree.map(lambda e, w: float(jnp.max(jnp.abs(e - w))),
                                       after.ema, after.trainable))
  assert max(moved) > 0  # the average lags the weights
  # The inference tree is the average (LoRA merged where there is LoRA).
  student = state_lib.student_params(after, frozen, experiment.lora)
  np.testing.assert_array_equal(student["projector"]["fc1"]["kernel"],
                                after.ema["params"]["projector"]["fc1"]["kernel"])
  # A skipped (NaN) step leaves the average untouched too.
  leaves, treedef = jax.tree.flatten(after.params)
  poisoned = after.replace(params=jax.tree.unflatten(treedef, [leaves[0] * jnp.nan]
                                                     + leaves[1:]))
  skipped, metrics = train_step(poisoned, frozen, make_batch(1))
  assert float(metrics["nonfinite"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, skipped.ema, poisoned.ema)


@pytest.mark.slow  # end-to-end runs
def test_ema_run_saves_resumes_and_exports_the_average(small_data, tmp_path):
  # A constant rate: a 2-step run then resumed to 4 follows the same schedule as 4 steps.
  config = lambda steps, **train: make_config(small_data, steps, **train)
  workdir = str(tmp_path / "run")
  loop.train(config(2, ema_decay=DECAY), workdir)
  loop.train(config(4, ema_decay=DECAY), workdir)  # resumed at 2
  manager = ckpt_lib.make_manager(tmp_path / "run" / "checkpoints", async_save=False)
  _, saved_params, _, _ = ckpt_lib.restore_inference(manager)
  manager.close()

  # An uninterrupted run of the same 4 steps: the resumed average equals it.
  straight = str(tmp_path / "straight")
  loop.train(config(4, ema_decay=DECAY), straight)
  params, _, _, _ = policy_lib.load_checkpoint(straight)
  jax.tree.map(np.testing.assert_array_equal, params, saved_params)

  # The export carries the average.
  export = ckpt_lib.export_latest(str(tmp_path / "run" / "checkpoints"),
                                  str(tmp_path / "export"))
  exported, _, _, _ = policy_lib.load_checkpoint(export)
  jax.tree.map(np.testing.assert_array_equal, exported, saved_params)

  # Resuming with the average switched off is refused before anything is restored.
  with pytest.raises(ConfigError, match=r"train.ema_decay > 0: True -> False"):
    loop.train(config(6), workdir)
