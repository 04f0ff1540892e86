"""Checkpoints: save/restore, exact resume, stale temporary folders, LoRA-merged export."""

import os

import jax
import numpy as np
import pytest

from tests.train.helpers import ACTION_TOKENIZER, _config, make_batch, small_experiment
from vla_jax.actions import NormStats
from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.models import lora as lora_lib
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib

STATS = {"bridge": NormStats(mean=[0.1, 0.0], std=[1.0, 2.0], min=[-1.0, -2.0], max=[1.0, 2.0],
                             q01=[-0.9, -1.8], q99=[0.9, 1.7], mask=[True, False])}


@pytest.fixture(scope="module")
def run(tiny_setup):
  """A LoRA run: experiment, models, initial (state, frozen), jitted step, batches."""
  _, models, params = tiny_setup  # LoRA leaves the model and its parameters unchanged
  experiment = small_experiment(lora=True)
  config = _config(trainable="lora", learning_rate=1e-2)
  create = lambda: state_lib.create_train_state(experiment, config, params, jax.random.key(1))
  train_step = jax.jit(step_lib.make_train_step(models, experiment, config, ACTION_TOKENIZER))
  batches = [make_batch(i) for i in range(4)]
  return experiment, models, create, train_step, batches


def _save(manager, step, state, frozen, experiment, position):
  params = state_lib.student_params(state, frozen, experiment.lora)
  assets = ckpt_lib.make_assets(experiment, STATS, tokenizer="llama2.model")
  return ckpt_lib.save(manager, step, state, params, assets, position)


def test_resume_continues_with_the_same_losses(run, tmp_path):
  experiment, _, create, train_step, batches = run
  state, frozen = create()
  uninterrupted = []
  for batch in batches:
    state, metrics = train_step(state, frozen, batch)
    uninterrupted.append(float(metrics["loss/total"]))

  state, frozen = create()
  manager = ckpt_lib.make_manager(tmp_path, max_to_keep=2)
  for step, batch in enumerate(batches[:2], start=1):
    state, _ = train_step(state, frozen, batch)
    _save(manager, step, state, frozen, experiment, {"batches_seen": step})
  manager.wait_until_finished()
  saved = jax.device_get(state)
  manager.close()

  # A new process: fresh initial state, automatic resume from the workdir.
  manager = ckpt_lib.make_manager(tmp_path, max_to_keep=2)
  fresh, frozen = create()
  state, assets, position = ckpt_lib.maybe_restore(manager, fresh)
  assert int(state.step) == 2 and position == {"batches_seen": 2}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.lora), saved.lora)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), saved.opt_state)
  np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(saved.rng))
  assert ckpt_lib.experiment_from_assets(assets) == experiment
  assert ckpt_lib.norm_stats_from_assets(assets)["bridge"].to_dict() == STATS["bridge"].to_dict()
  resumed = []
  for batch in batches[position["batches_seen"]:]:
    state, metrics = train_step(state, frozen, batch)
    resumed.append(float(metrics["loss/total"]))
  np.testing.assert_allclose(resumed, uninterrupted[2:], rtol=1e-6)
  manager.close()


def test_stale_temporary_directory_is_ignored(run, tmp_path):
  experiment, _, create, train_step, batches = run
  state, frozen = create()
  manager = ckpt_lib.make_manager(tmp_path, async_save=False)
  _save(manager, 1, state, frozen, experiment, {"batches_seen": 1})
  manager.close()
  # A save of step 2 that crashed half-way leaves Orbax's temporary folder behind.
  stale = tmp_path / "2.orbax-checkpoint-tmp-1234"
  (stale / "train_state").mkdir(parents=True)
  (stale / "train_state" / "garbage").write_text("partial write")
  manager = ckpt_lib.make_manager(tmp_path, async_save=False)
  assert manager.latest_step() == 1
  assert _save(manager, 2, state, frozen, experiment, {"batches_seen": 2})
  assert manager.latest_step() == 2 and not stale.exists()
  manager.close()


def test_restore_without_checkpoint_is_a_clear_error(run, tmp_path):
  state, _ = run[2]()
  manager = ckpt_lib.make_manager(tmp_path)
  assert ckpt_lib.maybe_restore(manager, state)[1] is None
  with pytest.raises(CheckpointError, match="no checkpoint"):
    ckpt_lib.restore(manager, jax.eval_shape(lambda: state))
  manager.close()


def test_export_with_merged_lora_reproduces_unmerged_logits(run, tmp_path):
  experiment, models, create, train_step, batches = run
  state, frozen = create()
  for batch in batches[:2]:
    state, _ = train_step(state, frozen, batch)
  assert any(float(np.abs(f["b"]).max()) > 0 for f in state.lora.values())
  batch = batches[3]
  unmerged = lora_lib.apply_lora(frozen["student"], state.lora, experiment.lora)
  want = models.student.apply({"params": unmerged}, batch["images"], batch["tokens"],
                              batch["input_mask"])["logits"]
  merged = state_lib.student_params(state, frozen, experiment.lora)
  path = ckpt_lib.export(tmp_path / "policy", merged, experiment, STATS, tokenizer="tok.model")
  params, exported, stats, assets = ckpt_lib.load_policy_params(path)
  assert exported.lora is None and exported.model == experiment.model
  assert stats["bridge"].to_dict() == STATS["bridge"].to_dict() and assets["tokenizer"] == "tok.model"
  got = models.student.apply({"params": params}, batch["images"], batch["tokens"],
                             batch["input_mask"])["logits"]
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.argmax(got, -1).tolist() == np.argmax(want, -1).tolist()
  with pytest.raises(CheckpointError, match="already exists"):
    ckpt_lib.export(path, merged, experiment, STATS)
  # bfloat16 export: half the bytes, same argmax on the action positions.
  path16 = ckpt_lib.export(tmp_path / "policy16", merged, experiment, STATS, dtype="bfloat16")
  params16 = ckpt_lib.load_policy_params(path16)[0]
  assert {x.dtype.name for x in jax.tree.leaves(params16)} == {"bfloat16"}
  assert not os.path.exists(str(path16) + ".partial")


def _tiny_state(value):
  return state_lib.TrainState(step=jax.numpy.asarray(value, jax.numpy.int32),
                              params={"w": jax.numpy.full(2, float(value))}, lora={},
                              opt_state=(), rng=jax.random.key(0))


def test_keep_checkpoints_zero_keeps_all_and_negative_is_an_error(tmp_path):
  # Orbax's max_to_keep=0 deleted each checkpoint right after writing it.
  manager = ckpt_lib.make_manager(tmp_path, max_to_keep=0, keep_period=0, async_save=False)
  experiment = small_experiment()
  assets = ckpt_lib.make_assets(experiment, STATS)
  for step in (1, 2, 3, 4):
    ckpt_lib.save(manager, step, _tiny_state(step), {"w": np.ones(2)}, assets, {})
  manager.wait_until_finished()
  assert list(manager.all_steps()) == [1, 2, 3, 4]
  manager.close()
  with pytest.raises(ConfigError, match="keep_checkpoints must be an integer >= 0"):
    ckpt_lib.make_manager(tmp_path, max_to_keep=-1)
  with pytest.raises(ConfigError, match="keep_period"):
    ckpt_lib.check_retention(3, 2.5)


def test_nonfinite_state_is_never_saved(tmp_path):
  manager = ckpt_lib.make_manager(tmp_path, async_save=False)
  assets = ckpt_lib.make_assets(small_experiment(), STATS)
  ckpt_lib.save(manager, 1, _tiny_state(1), {"w": np.ones(2)}, assets, {})
  bad = _tiny_state(2).replace(params={"w": jax.numpy.asarray([1.0, np.nan])})
  with pytest.raises(CheckpointError, match=r"refusing to save step 2.*\['w'\]"):
    ckpt_lib.save(manager, 2, bad, {"w": np.ones(2)}, assets, {})
  assert list(manager.all_steps()) == [1]
  manager.close()
