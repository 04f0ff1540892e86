"""Checkpoints: save/restore, exact resume, stale temporary folders, LoRA-merged export,
checksums (bit flips, truncated files, fallback to the newest valid step)."""

import logging
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.helpers import ACTION_TOKENIZER, _config, make_batch, small_experiment
from vla_jax.actions import NormStats
from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.eval import policy as policy_lib
from vla_jax.models import lora as lora_lib
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import checksums as checksums_lib
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


# Slow: trains, saves, restores and trains again (test_loop.py resumes the real loop).
@pytest.mark.slow
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


@pytest.mark.slow  # trains, exports and compiles two forward passes
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


# ----------------------------------------------------------------------------- corruption
def _read_item(item_dir):
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.leaves(jax.device_get(checkpointer.restore(os.fspath(item_dir))))


def damage(item_dir, how):
  """Damages a data file of an Orbax item folder (e.g. STEP/train_state) like a disk would.

  "flip": one bit, where plain Orbax still reads the item without error but with other
  values (bit rot inside an array's compressed bytes); "truncate": a data file cut to half
  its size, else a quarter, else a tenth (a partial copy, a full disk) where plain Orbax
  fails to read the item (OCDBT files may end in stale B-tree nodes nobody reads, so not
  every cut hits an array).
  """
  before = _read_item(item_dir)
  files = sorted((f for f in pathlib.Path(item_dir).rglob("*") if f.is_file() and "/d/" in str(f)),
                 key=lambda f: -f.stat().st_size)
  # A flip can land where nothing reads it (stale B-tree nodes, padding): try many places.
  flips = (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9, 0.05, 0.95)
  for path in files[:3] if how == "truncate" else files:
    data = path.read_bytes()
    for fraction in ((0.5, 0.25, 0.1) if how == "truncate" else flips):
      damaged = bytearray(data[:int(len(data) * fraction)] if how == "truncate" else data)
      if how == "flip":
        damaged[int(len(data) * fraction)] ^= 0x04
      path.write_bytes(bytes(damaged))
      try:
        after = _read_item(item_dir)
      except Exception:  # pylint: disable=broad-except  # TensorStore's read errors
        if how == "truncate":
          return
        continue
      if how == "flip" and not all(np.array_equal(a, b, equal_nan=True)
                                   for a, b in zip(before, after)):
        return
    path.write_bytes(data)
  raise AssertionError(f"found no {how} in {item_dir} that changes what Orbax reads")


def _train_and_save(run, directory, steps, max_to_keep=3):
  """Trains `steps` batches, saving each step; returns the states after each step."""
  experiment, _, create, train_step, batches = run
  state, frozen = create()
  manager = ckpt_lib.make_manager(directory, max_to_keep=max_to_keep)
  states = []
  for step, batch in enumerate(batches[:steps], start=1):
    state, _ = train_step(state, frozen, batch)
    _save(manager, step, state, frozen, experiment, {"batches_seen": step})
    states.append(jax.device_get(state))
  manager.close()
  return states, frozen


@pytest.mark.parametrize("how,fault", [("flip", "does not match the checksum"),
                                       pytest.param("truncate", "a file cannot be read",
                                                    marks=pytest.mark.slow)])  # 7 s
def test_corrupt_latest_checkpoint_falls_back_and_training_continues(run, tmp_path, caplog,
                                                                    how, fault):
  experiment, _, create, train_step, batches = run
  state, frozen = create()
  uninterrupted = []
  for batch in batches:
    state, metrics = train_step(state, frozen, batch)
    uninterrupted.append(float(metrics["loss/total"]))
  states, frozen = _train_and_save(run, tmp_path, 2, max_to_keep=2)
  damage(tmp_path / "2" / "train_state", how)

  manager = ckpt_lib.make_manager(tmp_path, max_to_keep=2)
  with caplog.at_level(logging.WARNING):
    state, _, position = ckpt_lib.maybe_restore(manager, create()[0])
  warning = caplog.text
  assert f"checkpoint step 2 in {tmp_path} is corrupt" in warning and fault in warning
  assert "train_state" in warning and "Trying the previous checkpoint" in warning
  assert int(state.step) == 1 and position == {"batches_seen": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.lora), states[0].lora)
  # The corrupt step is kept aside, out of rotation; the good step 1 stays.
  assert list(manager.all_steps()) == [1] and (tmp_path / "2.corrupt").is_dir()
  resumed = []
  for step, batch in enumerate(batches[1:], start=2):
    state, metrics = train_step(state, frozen, batch)
    resumed.append(float(metrics["loss/total"]))
    _save(manager, step, state, frozen, experiment, {"batches_seen": step})
    manager.wait_until_finished()
    if step == 2:  # step 2 is saved again (valid), the good step 1 is still kept
      assert list(manager.all_steps()) == [1, 2]
      restored, _, _ = ckpt_lib.restore(manager, jax.eval_shape(create)[0], step=2)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.lora),
                   states[1].lora)
  np.testing.assert_allclose(resumed, uninterrupted[1:], rtol=1e-6)
  manager.close()


def test_all_checkpoints_corrupt_is_one_clear_error(run, tmp_path):
  _train_and_save(run, tmp_path, 2)
  damage(tmp_path / "1" / "train_state", "truncate")
  damage(tmp_path / "2" / "train_state", "flip")
  manager = ckpt_lib.make_manager(tmp_path)
  with pytest.raises(CheckpointError) as error:
    ckpt_lib.maybe_restore(manager, run[2]()[0])
  message = str(error.value)
  assert "\n" not in message and f"none of the 2 checkpoints in {tmp_path} can be used" in message
  assert "step 2: array train_state" in message and "step 1: a file cannot be read" in message
  assert "move the directory aside" in message
  assert list(manager.all_steps()) == [1, 2]  # nothing moved when nothing was valid
  manager.close()


def test_evaluation_refuses_a_chosen_corrupt_step_and_falls_back_from_the_latest(
    run, tmp_path, caplog):
  _train_and_save(run, tmp_path, 2)
  damage(tmp_path / "2" / "params", "flip")
  with pytest.raises(CheckpointError, match=r"step 2 in .* is corrupt: array params\[.*Choose "
                     r"another step \(saved: \[1, 2\]\)"):
    policy_lib.load_checkpoint(str(tmp_path), 2)
  with caplog.at_level(logging.WARNING):
    params, _, _, assets = policy_lib.load_checkpoint(str(tmp_path))
  assert assets["step"] == 1 and "checkpoint step 2" in caplog.text
  assert (tmp_path / "2").is_dir()  # evaluation reads; it moves nothing
  # An exported policy carries checksums too.
  export = ckpt_lib.export(tmp_path / "policy", params, ckpt_lib.experiment_from_assets(assets),
                           STATS)
  damage(pathlib.Path(export) / "params", "flip")
  with pytest.raises(CheckpointError, match=r"is corrupt: array params.*Export it again"):
    policy_lib.load_checkpoint(export)


def test_checkpoints_without_checksums_still_load(run, tmp_path, caplog):
  experiment, _, create, _, _ = run
  state, frozen = create()
  manager = ckpt_lib.make_manager(tmp_path, async_save=False)
  # What `save` wrote before checksums existed: four items.
  params = state_lib.student_params(state, frozen, experiment.lora)
  manager.save(1, args=ocp.args.Composite(
      # (the train state's layout of then: no moving-average field)
      train_state=ocp.args.StandardSave(ckpt_lib._to_storable(state)),  # pylint: disable=protected-access
      params=ocp.args.StandardSave(params),
      assets=ocp.args.JsonSave(ckpt_lib.make_assets(experiment, STATS)),
      data_iterator=ocp.args.JsonSave({"batches_seen": 1})))
  manager.close()
  manager = ckpt_lib.make_manager(tmp_path)
  with caplog.at_level(logging.WARNING):
    restored, _, position = ckpt_lib.maybe_restore(manager, create()[0])
    loaded = policy_lib.load_checkpoint(str(tmp_path))[0]
  manager.close()
  assert position == {"batches_seen": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.lora),
               jax.device_get(state.lora))
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  assert "has no checksums (written before vla_jax recorded them)" in caplog.text


def test_a_checkpoint_of_another_model_is_a_clear_error_not_corruption(tmp_path):
  manager = ckpt_lib.make_manager(tmp_path, async_save=False)
  ckpt_lib.save(manager, 1, _tiny_state(1), {"w": np.ones(2)},
                ckpt_lib.make_assets(small_experiment(), STATS), {})
  other = _tiny_state(1).replace(params={"w": jax.numpy.ones(3)})
  with pytest.raises(CheckpointError, match=r"step 1 in .* was written for another model: it "
                     r"holds train_state.params\['w'\] with shape \(2,\), this model builds "
                     r"\(3,\)"):
    ckpt_lib.maybe_restore(manager, other)
  assert list(manager.all_steps()) == [1]
  manager.close()


def test_checksum_catches_every_single_bit_flip_and_ignores_the_sharding():
  rng = np.random.default_rng(0)
  for dtype in (np.float32, jax.numpy.bfloat16, np.int8, np.bool_):
    x = np.asarray(rng.normal(size=(3, 5)) > 0 if dtype == np.bool_ else
                   rng.normal(size=(3, 5)) * 10).astype(dtype)
    base = checksums_lib.array_checksums({"x": x})["['x']"]
    assert base["dtype"] == np.dtype(dtype).name and base["shape"] == [3, 5]
    raw = x.view(np.uint8).reshape(-1)
    seen = {base["checksum"]}
    for byte in range(raw.size):
      for bit in range(8):
        flipped = raw.copy()
        flipped[byte] ^= 1 << bit
        seen.add(checksums_lib.array_checksums({"x": flipped.view(x.dtype).reshape(x.shape)}
                                               )["['x']"]["checksum"])
    assert len(seen) == raw.size * 8 + 1, dtype  # every flip gives its own checksum
  # Integer sums are exact in any order: split over devices, the checksum is the same.
  big = rng.normal(size=(64, 48)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  sharded = jax.device_put(big, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
  assert (checksums_lib.array_checksums([sharded]) == checksums_lib.array_checksums([big]))
