"""Orbax checkpoints of a training run, and the exported inference checkpoint.

A run's directory holds one folder per saved step with four Orbax items:

  train_state/    the TrainState (trainable params, LoRA factors, optimizer state, step, rng)
  params/         the student's inference parameters (LoRA merged), ready to serve
  assets/         JSON: normalisation statistics, the experiment config, tokenizer reference
  data_iterator/  JSON: where the input pipeline is (e.g. {"examples_seen": ...})

The teacher and the alignment projector are never saved: they are frozen and rebuilt
from the config. Saves are asynchronous; old steps are pruned (keep the last N plus
every K-th). Restoring takes a target with shardings, so a run saved on one mesh
resumes on any other. Temporary folders left by a crashed save are removed when the
manager opens the directory, so they never block the next run.

`export` writes a standalone inference checkpoint (params in a chosen dtype, LoRA
merged, norm stats and config inside); `load_policy_params` reads it back.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from vla_jax import modeling
from vla_jax.actions import NormStats
from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.experiment import Experiment, parse_config
from vla_jax.train.state import TrainState
from vla_jax.weights import convert as convert_lib

ITEMS = ("train_state", "params", "assets", "data_iterator")
EXPORT_FORMAT_VERSION = 1


def check_retention(keep_checkpoints: Optional[int], keep_period: Optional[int]) -> None:
  """ConfigError unless both are None or integers >= 0 (0 = keep all / no period)."""
  for key, value in (("keep_checkpoints", keep_checkpoints), ("keep_period", keep_period)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
      raise ConfigError(f"config.{key} must be an integer >= 0 (0 = off: keep_checkpoints=0 "
                        f"keeps every checkpoint, keep_period=0 keeps no extra ones), got "
                        f"{value!r}.")


def make_manager(directory: str, *, max_to_keep: Optional[int] = 3,
                 keep_period: Optional[int] = None,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` with this module's four items.

  Args:
    max_to_keep: keep the N most recent steps (None or 0 = all).
    keep_period: additionally keep every step that is a multiple of K (None or 0 = none).
    async_save: write in a background thread; call `manager.wait_until_finished()`
      before exiting (or `manager.close()`).
  """
  check_retention(max_to_keep, keep_period)
  directory = os.path.abspath(os.fspath(directory))
  # Orbax's max_to_keep=0 deletes each step right after writing it; 0 means "off" here,
  # like keep_period=0, so it keeps everything.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep or None, keep_period=keep_period or None,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist")
                               else str(o)))


def experiment_to_config(experiment: Experiment, *, lora_merged: bool = False) -> Dict[str, Any]:
  """The experiment as the nested dict `parse_config` reads (JSON-ready)."""
  lora = {"enabled": False}
  if experiment.lora is not None and not lora_merged:
    lora = {"enabled": True, **dataclasses.asdict(experiment.lora)}
  return _jsonable({"model": dataclasses.asdict(experiment.model),
                    "teacher": dataclasses.asdict(experiment.teacher),
                    "align": dataclasses.asdict(experiment.align), "lora": lora})


def experiment_from_assets(assets: Mapping[str, Any]) -> Experiment:
  """Rebuilds the (validated) Experiment stored in a checkpoint's assets."""
  if "config" not in assets:
    raise CheckpointError(f"checkpoint assets have no 'config' (keys: {sorted(assets)}); it "
                          "was not written by vla_jax.train.checkpoint.")
  return parse_config(ml_collections.ConfigDict(assets["config"]))


def make_assets(experiment: Experiment, norm_stats: Mapping[str, NormStats], *,
                tokenizer: str = "", extra: Optional[Mapping[str, Any]] = None) -> Dict:
  """The JSON `assets` item: {"config", "norm_stats": {name: stats}, "tokenizer", ...}."""
  return _jsonable({"config": experiment_to_config(experiment),
                    "norm_stats": {k: v.to_dict() for k, v in norm_stats.items()},
                    "tokenizer": os.fspath(tokenizer), **(extra or {})})


def norm_stats_from_assets(assets: Mapping[str, Any]) -> Dict[str, NormStats]:
  return {k: NormStats.from_dict(v) for k, v in assets.get("norm_stats", {}).items()}


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def nonfinite_leaves(tree: Any) -> list:
  """Paths of the floating leaves of `tree` holding a NaN or inf ([] when all finite).

  One jitted reduction decides; only a non-finite tree is searched leaf by leaf.
  """
  if bool(_all_finite(tree)):
    return []
  return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x)))]


def check_finite(tree: Any, what: str, fix: str) -> None:
  """CheckpointError naming the NaN/inf leaves of `tree` (`what` is, `fix` says what to do)."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise CheckpointError(f"{what} hold NaN or inf in {len(bad)} array(s) (first: {bad[:3]}); "
                          f"{fix}")


# Typed PRNG keys are stored as their raw uint32 data.
def _to_storable(state: TrainState) -> TrainState:
  return state.replace(rng=jax.random.key_data(state.rng))


def _abstract_storable(abstract_state: TrainState) -> TrainState:
  return abstract_state.replace(rng=jax.eval_shape(jax.random.key_data, abstract_state.rng))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, params: Any,
         assets: Mapping[str, Any], data_iterator: Mapping[str, Any], *,
         force: bool = False) -> bool:
  """Saves one step (asynchronously if the manager is async); returns whether it saved.

  Args:
    state: the train state.
    params: inference params of the student (`state.student_params(...)`, LoRA merged).
    assets: `make_assets(...)`; data_iterator: JSON-able position of the input pipeline.
  """
  if not jax.tree.leaves(params):
    raise CheckpointError("save() got empty inference params; pass the student's full tree "
                          "(vla_jax.train.state.student_params(state, frozen_params, lora)).")
  # A diverged state must never replace good checkpoints (rotation would delete them).
  check_finite({"train_state": state.trainable, "opt_state": state.opt_state},
               f"refusing to save step {step}: the train state and optimizer state",
               "the run has diverged. Resume from the last good checkpoint with a lower "
               "train.learning_rate.")
  args = ocp.args.Composite(
      train_state=ocp.args.StandardSave(_to_storable(state)),
      params=ocp.args.StandardSave(params),
      assets=ocp.args.JsonSave(_jsonable(dict(assets))),
      data_iterator=ocp.args.JsonSave(_jsonable(dict(data_iterator))))
  return manager.save(int(step), args=args, force=force)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState,
            state_shardings: Any = None, step: Optional[int] = None
            ) -> Tuple[TrainState, Dict[str, Any], Dict[str, Any]]:
  """Restores (state, assets, data_iterator) of `step` (default: the latest).

  Args:
    abstract_state: `jax.eval_shape` of the state creation (shapes and dtypes).
    state_shardings: target shardings like `abstract_state` (any mesh; default: one
      device). The rng's sharding is taken from its own entry.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {manager.directory}; train first, or point "
                          "--workdir at a run directory.")
  target = _with_shardings(abstract_state, state_shardings)
  target = target.replace(rng=jax.ShapeDtypeStruct(
      _abstract_storable(abstract_state).rng.shape, jnp.uint32, sharding=target.rng.sharding))
  restored = manager.restore(int(step), args=ocp.args.Composite(
      train_state=ocp.args.StandardRestore(target), assets=ocp.args.JsonRestore(),
      data_iterator=ocp.args.JsonRestore()))
  state = restored["train_state"]
  state = state.replace(rng=jax.random.wrap_key_data(state.rng))
  return state, restored["assets"], restored["data_iterator"]


def maybe_restore(manager: ocp.CheckpointManager, state: TrainState, state_shardings: Any = None
                  ) -> Tuple[TrainState, Optional[Dict], Optional[Dict]]:
  """Automatic resume: the latest checkpoint if there is one, else `state` unchanged."""
  step = manager.latest_step()
  if step is None:
    return state, None, None
  logging.info("Resuming from step %d in %s", step, manager.directory)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return restore(manager, abstract, state_shardings, step)


def restore_params(manager: ocp.CheckpointManager, abstract_params: Any, shardings: Any = None,
                   step: Optional[int] = None) -> Any:
  """The inference `params` item of a run checkpoint."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(int(step), args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_with_shardings(abstract_params, shardings))))
  return restored["params"]


# ---------------------------------------------------------------------------------------
# Export: a standalone inference checkpoint.
# ---------------------------------------------------------------------------------------
def export(path: str, params: Any, experiment: Experiment, norm_stats: Mapping[str, NormStats],
           *, dtype: Optional[str] = None, tokenizer: str = "",
           extra: Optional[Mapping[str, Any]] = None) -> str:
  """Writes an inference checkpoint: params (LoRA already merged) + assets.

  Args:
    path: output directory (must not exist).
    params: the student's full parameter tree with LoRA merged
      (`state.student_params(...)`).
    experiment: the run's experiment; stored with LoRA marked as merged.
    norm_stats: {dataset or key name: NormStats} used to un-normalise actions.
    dtype: e.g. "bfloat16" casts floating params; None keeps their dtypes.
  Returns:
    The absolute path written. Writes go to `path + ".partial"` renamed at the end.
  """
  assets = _jsonable({
      "format_version": EXPORT_FORMAT_VERSION,
      "config": experiment_to_config(experiment, lora_merged=True),
      "norm_stats": {k: v.to_dict() for k, v in norm_stats.items()},
      "tokenizer": os.fspath(tokenizer), "dtype": dtype or "as_trained", **(extra or {})})
  return convert_lib.write_params(path, params, {"assets": assets}, dtype=dtype)


def load_policy_params(path: str, shardings: Any = None
                       ) -> Tuple[Any, Experiment, Dict[str, NormStats], Dict[str, Any]]:
  """Reads an `export`ed checkpoint.

  Args:
    path: the export directory.
    shardings: optional target shardings like the params (default: one device).
  Returns:
    (params, experiment (lora=None: merged), norm stats by name, raw assets).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(os.path.join(path, "params")) or not os.path.isdir(
      os.path.join(path, "assets")):
    raise CheckpointError(f"{path} is not an exported policy (needs params/ and assets/); "
                          "write one with vla_jax.train.checkpoint.export (--mode=export).")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    assets = checkpointer.restore(path, ocp.args.Composite(assets=ocp.args.JsonRestore()))
    assets = assets["assets"]
    experiment = experiment_from_assets(assets)
    abstract = modeling.abstract_params(modeling.build_models(experiment), experiment)["student"]
    if assets.get("dtype") not in (None, "as_trained"):
      abstract = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, assets["dtype"])
          if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)
    target = _with_shardings(abstract, shardings)
    params = checkpointer.restore(path, ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))["params"]
  return params, experiment, norm_stats_from_assets(assets), assets


def export_latest(run_dir: str, path: str, *, dtype: Optional[str] = None,
                  step: Optional[int] = None) -> str:
  """Exports a run's checkpoint (latest step by default) as a standalone policy.

  Args:
    run_dir: the run's checkpoint directory (`WORKDIR/checkpoints`).
    path: output directory (must not exist).
    dtype: cast floating params, e.g. "bfloat16"; None keeps float32.
  Returns:
    The export path; `load_policy_params(path)` reads it back.
  """
  manager = make_manager(run_dir, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {run_dir}; train first (--mode=train).")
  assets = manager.restore(int(step), args=ocp.args.Composite(
      assets=ocp.args.JsonRestore()))["assets"]
  experiment = experiment_from_assets(assets)
  abstract = modeling.abstract_params(modeling.build_models(experiment), experiment)["student"]
  params = restore_params(manager, abstract, step=step)
  manager.close()
  return export(path, params, experiment, norm_stats_from_assets(assets), dtype=dtype,
                tokenizer=assets.get("tokenizer", ""), extra={"source_step": int(step)})
