"""Orbax checkpoints of a training run, and the exported inference checkpoint.

A run's directory holds one folder per saved step with these Orbax items:

  train_state/    the TrainState (trainable params, LoRA factors, optimizer state, step, rng,
                  the moving average of the weights when train.ema_decay > 0)
  params/         the student's inference parameters (LoRA merged; the moving average when
                  there is one), ready to serve. Not written by LoRA runs (config
                  `checkpoint_params`): their policy is rebuilt on load from the factors
                  and the base weights recorded in assets["base"] (`base_record`)
  assets/         JSON: normalisation statistics, the experiment config, tokenizer reference
  data_iterator/  JSON: where the input pipeline is (e.g. {"examples_seen": ...})
  checksums/      JSON: a checksum of every array above (with its dtype and shape) and
                  of both JSON items (vla_jax/train/checksums.py)

The teacher and the alignment projector are never saved: they are frozen and rebuilt
from the config. Saves are asynchronous; old steps are pruned (keep the last N plus
every K-th). Restoring takes a target with shardings, so a run saved on one mesh
resumes on any other. Temporary folders left by a crashed save are removed when the
manager opens the directory, so they never block the next run.

Every restore verifies the checksums (computed on device from the logical arrays, so
they do not depend on the mesh). A step whose array differs from its checksum, or whose
files cannot be read, is a `CorruptCheckpointError`; `maybe_restore` (training resume)
and `restore_inference` (evaluation, export) then fall back to the newest valid step
with a warning, and `maybe_restore` moves the corrupt steps aside (`STEP.corrupt`).
Checkpoints written before checksums existed load with a warning that they cannot be
verified.

`export` writes a standalone inference checkpoint (params in a chosen dtype, LoRA
merged, norm stats and config inside); `load_policy_params` reads it back.
"""

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from vla_jax import modeling
from vla_jax.actions import NormStats
from vla_jax.errors import CheckpointError, ConfigError, VlaJaxError
from vla_jax.experiment import Experiment, parse_config
from vla_jax.train import checksums as checksums_lib
from vla_jax.train.state import TrainState
from vla_jax.typed_config import from_mapping
from vla_jax.weights import convert as convert_lib

ITEMS = ("train_state", "params", "assets", "data_iterator", "checksums")
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


def jsonable(value: Any) -> Any:
  """`value` as plain JSON types (arrays as lists, anything else unknown as its str)."""
  return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist")
                               else str(o)))


def experiment_to_config(experiment: Experiment, *, lora_merged: bool = False) -> Dict[str, Any]:
  """The experiment as the nested dict `parse_config` reads (JSON-ready)."""
  lora = {"enabled": False}
  if experiment.lora is not None and not lora_merged:
    lora = {"enabled": True, **dataclasses.asdict(experiment.lora)}
  return jsonable({"model": dataclasses.asdict(experiment.model),
                    "teacher": experiment.teacher.to_mapping(),
                    "align": dataclasses.asdict(experiment.align), "lora": lora})


def experiment_from_assets(assets: Mapping[str, Any]) -> Experiment:
  """Rebuilds the (validated) Experiment stored in a checkpoint's assets."""
  if "config" not in assets:
    raise CheckpointError(f"checkpoint assets have no 'config' (keys: {sorted(assets)}); it "
                          "was not written by vla_jax.train.checkpoint.")
  return parse_config(ml_collections.ConfigDict(assets["config"]))


# Settings that change how, not what, a run computes: a run may resume with another value
# (lora.in_layer computes the same function inside the layers or on materialised kernels).
EXECUTION_ONLY = ("remat", "remat_policy", "dtype", "in_layer")


_ABSENT = object()


def _show(value: Any) -> str:
  if value is _ABSENT:
    return "(absent)"
  return "{...}" if isinstance(value, Mapping) else repr(value)


def _differences(a: Any, b: Any, key: str, ignore: Tuple[str, ...]) -> List[str]:
  if key.rsplit(".", 1)[-1] in ignore:
    return []
  if (a is None and b is _ABSENT) or (a is _ABSENT and b is None):
    return []  # an unset sub-config (older checkpoints record `teacher.dino: None`)
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return [line for k in sorted(set(a) | set(b)) for line in _differences(
        a.get(k, _ABSENT), b.get(k, _ABSENT), f"{key}.{k}" if key else str(k), ignore)]
  return [] if a == b else [f"{key}: {_show(a)} -> {_show(b)}"]


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: Tuple[str, ...] = EXECUTION_ONLY) -> List[str]:
  """"key: saved -> current" for each setting of two experiment configs that differs (a
  sub-config present on one side only is one line; keys whose last name is in `ignore`
  are skipped), in sorted key order."""
  return _differences(jsonable(saved), jsonable(current), "", ignore)


def _summarize_differences(differences: List[str], shown: int = 4) -> str:
  more = len(differences) - shown
  return "; ".join(differences[:shown]) + (f" (and {more} more)" if more > 0 else "")


def train_layout(train_config: Any) -> Dict[str, Any]:
  """The train config's keys that shape the saved train state (what it holds, not how it
  is optimised): a run is resumed only into the same layout."""
  return {"trainable": train_config.trainable,
          "freeze_projector": bool(train_config.freeze_projector),
          "ema": train_config.ema_decay > 0}


def check_resume_config(manager: ocp.CheckpointManager, experiment: Experiment,
                        preset: str = "", layout: Optional[Mapping[str, Any]] = None) -> None:
  """ConfigError if the run's latest checkpoint was written for another experiment.

  Without this a run resumed with another preset or model setting either fails deep in
  Orbax or, where the shapes happen to agree, silently continues a different experiment.
  Unreadable assets are left to `maybe_restore` (which falls back past corrupt steps).
  """
  step = manager.latest_step()
  if step is None:
    return
  try:
    assets = _restore_step(manager, step, {}, ("assets",))["assets"]
  except CheckpointError:
    return
  if "config" not in assets:
    return
  differences = config_differences(assets["config"], experiment_to_config(experiment))
  # Checkpoints written before the layout was recorded kept no moving average.
  saved_layout = assets.get("train_layout", {"ema": False})
  if layout is not None:
    differences += [f"train.{'ema_decay > 0' if k == 'ema' else k}: {saved_layout[k]!r} "
                    f"-> {v!r}" for k, v in layout.items()
                    if k in saved_layout and saved_layout[k] != v]
  if not differences:
    return
  workdir = os.path.dirname(os.fspath(manager.directory))
  written = f", preset {assets['preset']!r}" if assets.get("preset") else ""
  now = f" (this config: preset {preset!r})" if preset else ""
  raise ConfigError(
      f"{workdir} holds a run of another experiment (checkpoint step {step}{written}){now}: "
      f"{_summarize_differences(differences)}. To resume it, pass the config it was written "
      "with; to start another run, pass a new --workdir; to fine-tune from it, export it "
      f"(--mode=export --workdir={workdir}) and start the new run with "
      "--config.weights.student=EXPORT_DIR --config.weights.student_format=export.")


def load_export_as_student(path: str, experiment: Experiment, shardings: Any = None) -> Any:
  """The student params of an export, to fine-tune from (weights.student_format="export"),
  read onto `shardings` if given; ConfigError unless the export's model config equals
  this experiment's (checked before any parameter is read)."""
  exported = experiment_from_assets(read_export_assets(path))
  differences = config_differences({"model": dataclasses.asdict(exported.model)},
                                   {"model": dataclasses.asdict(experiment.model)}, ignore=())
  if differences:
    raise ConfigError(f"the export {path} was made for another student: "
                      f"{_summarize_differences(differences)}. Use its model config, e.g. the "
                      "preset it was trained with.")
  return load_policy_params(path, shardings)[0]


def make_assets(experiment: Experiment, norm_stats: Mapping[str, NormStats], *,
                tokenizer: str = "", extra: Optional[Mapping[str, Any]] = None) -> Dict:
  """The JSON `assets` item: {"config", "norm_stats": {name: stats}, "tokenizer", ...}."""
  return jsonable({"config": experiment_to_config(experiment),
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


# ---------------------------------------------------------------------------------------
# Verified restores: checksums, falling back past corrupt steps.
# ---------------------------------------------------------------------------------------
class CorruptCheckpointError(CheckpointError):
  """A checkpoint cannot be used: an array differs from its checksum, or a file is unreadable.

  `step` is None for an exported policy.
  """

  def __init__(self, directory: Any, step: Optional[int], reason: str):
    self.directory, self.step, self.reason = os.fspath(directory), step, reason
    where = (f"checkpoint step {step} in {self.directory}" if step is not None
             else f"the checkpoint {self.directory}")
    super().__init__(f"{where} is corrupt: {reason}")


def _reason(error: BaseException) -> str:
  """One line: the innermost cause of a failed read (TensorStore's names the file)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


@functools.lru_cache(maxsize=None)
def _warn_unverified(path: str) -> None:  # once per checkpoint and process
  logging.warning("%s has no checksums (written before vla_jax recorded them): its arrays "
                  "cannot be verified.", path)


def _restore_checked(read: Callable[[ocp.args.Composite], Mapping[str, Any]], path: str,
                     step: Optional[int], arrays: Mapping[str, Any],
                     json_names: Tuple[str, ...] = ()) -> Dict[str, Any]:
  """Restores `arrays` ({item: target}) and JSON items, verified against the checksums.

  Args:
    read: restores a Composite of items of this checkpoint (a manager's step, a path).
    path: the checkpoint's directory (for the checksums item and messages).
    step: its step (None: an exported policy).
  Raises:
    CorruptCheckpointError: a file cannot be read (truncated, damaged, missing) or an
      item differs from its checksum.
    CheckpointError: the targets have other arrays or shapes than the saved ones (a
      checkpoint of another model; not damage, so no fallback).
  A checkpoint without checksums (written before they existed) is restored with a
  warning that it cannot be verified.
  """
  directory = os.path.dirname(path) if step is not None else path

  def read_or_raise(items: Mapping[str, Any]) -> Dict[str, Any]:
    try:
      return dict(read(ocp.args.Composite(**items)))
    except VlaJaxError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # TensorStore, JSON, OS errors
      raise CorruptCheckpointError(directory, step, f"a file cannot be read ({_reason(e)})"
                                   ) from e

  if not (epath.Path(path) / "checksums").exists():
    _warn_unverified(path)
    return read_or_raise({**{k: ocp.args.StandardRestore(t) for k, t in arrays.items()},
                          **{k: ocp.args.JsonRestore() for k in json_names}})
  record = read_or_raise({"checksums": ocp.args.JsonRestore()})["checksums"]
  problem = checksums_lib.record_problem(record)
  if problem:
    raise CorruptCheckpointError(directory, step, problem)
  saved = {}
  for name, target in arrays.items():
    problem = checksums_lib.fit_problem(record.get(name) or {}, target, name)
    if problem:
      where = f"step {step} in {directory}" if step is not None else directory
      raise CheckpointError(f"the checkpoint {where} was written for another model: {problem}. "
                            "Use the config it was written with, or start a new --workdir.")
    saved[name] = checksums_lib.with_saved_dtypes(record[name], target)
  restored = read_or_raise({**{k: ocp.args.StandardRestore(t) for k, t in saved.items()},
                            **{k: ocp.args.JsonRestore() for k in json_names}})
  problem = checksums_lib.describe_mismatch(record, restored, json_names)
  if problem:
    raise CorruptCheckpointError(directory, step, problem)
  for name, target in arrays.items():  # cast to the dtypes asked for, as Orbax would have
    restored[name] = jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
                                  restored[name], target)
  return restored


def _restore_step(manager: ocp.CheckpointManager, step: int, arrays: Mapping[str, Any],
                  json_names: Tuple[str, ...] = ()) -> Dict[str, Any]:
  if step not in manager.all_steps():
    raise CheckpointError(f"step {step} is not in {manager.directory}; saved steps: "
                          f"{list(manager.all_steps())}.")
  path = os.path.join(os.fspath(manager.directory), str(step))
  return _restore_checked(lambda args: manager.restore(int(step), args=args), path, step,
                          arrays, json_names)


T = TypeVar("T")


def newest_valid(manager: ocp.CheckpointManager, load: Callable[[int], T]
                 ) -> Tuple[int, T, List[CorruptCheckpointError]]:
  """(step, load(step), corrupt newer steps) for the newest step `load` accepts.

  Each corrupt step (a CorruptCheckpointError from `load`) is logged as a warning naming
  the step and the array, then the previous step is tried. If none is valid: one
  CheckpointError naming the directory, each step's fault and what to do.
  """
  failures: List[CorruptCheckpointError] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, load(step), failures
    except CorruptCheckpointError as e:
      failures.append(e)
      logging.warning("%s. Trying the previous checkpoint.", e)
  if not failures:
    raise CheckpointError(f"no checkpoint in {manager.directory}; train first, or point "
                          "--workdir at a run directory.")
  faults = "; ".join(f"step {e.step}: {e.reason}" for e in failures)
  raise CheckpointError(
      f"none of the {len(failures)} checkpoints in {manager.directory} can be used: {faults}. "
      "Restore them from a copy, or move the directory aside (or use a new --workdir) to "
      "start from scratch.")


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames the corrupt `step` to `STEP.corrupt`: kept for inspection, out of rotation.

  Orbax no longer lists it, so the run saves that step again and `keep_checkpoints`
  counts only valid steps: rotation never deletes the good step resumed from to keep a
  corrupt one.
  """
  directory = epath.Path(manager.directory)
  target, n = directory / f"{step}.corrupt", 1
  while target.exists():
    target, n = directory / f"{step}.corrupt{n}", n + 1
  if jax.process_index() == 0:
    (directory / str(step)).rename(target)
  ocp.multihost.sync_global_processes(f"vla_jax_set_aside_{step}")
  manager.reload()
  logging.warning("Moved the corrupt checkpoint step %d to %s; delete it once inspected.",
                  step, target)
  return os.fspath(target)


# Typed PRNG keys are stored as their raw uint32 data.
@flax.struct.dataclass
class _StateWithoutEma:
  """How a train state without a moving average is stored: the layout of checkpoints
  written before `TrainState.ema` existed, so that they still restore (Orbax matches
  the tree by field names)."""
  step: Any
  params: Any
  lora: Any
  opt_state: Any
  rng: Any


def _without_empty_ema(state: TrainState) -> Any:
  if state.ema:
    return state
  return _StateWithoutEma(step=state.step, params=state.params, lora=state.lora,
                          opt_state=state.opt_state, rng=state.rng)


def _from_stored(stored: Any) -> TrainState:
  if isinstance(stored, TrainState):
    return stored
  return TrainState(step=stored.step, params=stored.params, lora=stored.lora,
                    opt_state=stored.opt_state, rng=stored.rng, ema={})


def _to_storable(state: TrainState) -> Any:
  return _without_empty_ema(state.replace(rng=jax.random.key_data(state.rng)))


def _abstract_storable(abstract_state: TrainState) -> Any:
  return _without_empty_ema(abstract_state.replace(
      rng=jax.eval_shape(jax.random.key_data, abstract_state.rng)))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, params: Optional[Any],
         assets: Mapping[str, Any], data_iterator: Mapping[str, Any], *,
         force: bool = False) -> bool:
  """Saves one step (asynchronously if the manager is async); returns whether it saved.

  The checksums of every array are computed first, on device (one pass over the state,
  a few integer operations per element; see `checksums.array_checksums`).

  Args:
    state: the train state.
    params: inference params of the student (`state.student_params(...)`, LoRA merged),
      or None: the step then holds the train state only, and `restore_inference` rebuilds
      the policy from it and the base weights that `assets["base"]` (`base_record`)
      names (a LoRA run at 7B saves its factors, not 14 GB of merged weights per step).
    assets: `make_assets(...)`; data_iterator: JSON-able position of the input pipeline.
  """
  if params is not None and not jax.tree.leaves(params):
    raise CheckpointError("save() got empty inference params; pass the student's full tree "
                          "(vla_jax.train.state.student_params(state, frozen_params, lora)).")
  # A diverged state must never replace good checkpoints (rotation would delete them).
  check_finite({"train_state": state.trainable, "opt_state": state.opt_state, "ema": state.ema},
               f"refusing to save step {step}: the train state and optimizer state",
               "the run has diverged. Resume from the last good checkpoint with a lower "
               "train.learning_rate.")
  storable = _to_storable(state)
  assets, data_iterator = jsonable(dict(assets)), jsonable(dict(data_iterator))
  # Written as one more item of the same step, so they commit (or not) with it.
  arrays = {"train_state": storable, **({"params": params} if params is not None else {})}
  checksums = checksums_lib.make_record(arrays, {"assets": assets,
                                                 "data_iterator": data_iterator})
  args = ocp.args.Composite(
      **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
      assets=ocp.args.JsonSave(assets),
      data_iterator=ocp.args.JsonSave(data_iterator),
      checksums=ocp.args.JsonSave(checksums))
  return manager.save(int(step), args=args, force=force)


def base_record(weights: Any, seed: int, train_config: Any, frozen_student: Any
                ) -> Dict[str, Any]:
  """What rebuilds the frozen part of the student (assets["base"]): the weights config,
  the init seed, the train config (the state's layout) and a checksum of the frozen
  parameters, so that a changed base checkpoint is refused, never silently merged."""
  weights = dict(weights.to_dict() if hasattr(weights, "to_dict") else weights)
  return {"weights": weights, "seed": int(seed), "train": dataclasses.asdict(train_config),
          "checksum": checksums_lib.json_checksum(checksums_lib.array_checksums(frozen_student))}


def _rebuild_inference(manager: ocp.CheckpointManager, step: int, assets: Mapping[str, Any],
                       experiment: Experiment, shardings: Any) -> Any:
  """The merged student of a step saved without inference params: base weights (as
  training built them) + the restored train state, merged as training would have."""
  from vla_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  where = f"step {step} in {manager.directory}"
  base = assets.get("base")
  if not base:
    raise CheckpointError(f"{where} holds neither inference params nor a record of its base "
                          "weights; it cannot be turned into a policy.")
  train_config = from_mapping(state_lib.TrainConfig, base["train"], "train")
  models = modeling.build_models(experiment)
  shown = {k: v for k, v in base["weights"].items() if v}
  try:
    params = modeling.create_params(models, experiment, base["weights"],
                                    jax.random.key(base["seed"]), parts=("student",))
  except (VlaJaxError, OSError, ValueError) as e:
    raise CheckpointError(
        f"{where} holds the trained factors, not merged weights (a LoRA run); its policy is "
        f"rebuilt from the base weights it was trained on ({shown or 'random init'}), and "
        f"reading them failed: {e}. Make them available at that path again, or export the "
        "run (--mode=export) on a machine that has them.") from None
  _, frozen = state_lib.split_params(params["student"],
                                     state_lib.trainable_mask(params["student"], train_config))
  if checksums_lib.json_checksum(checksums_lib.array_checksums(frozen)) != base["checksum"]:
    raise CheckpointError(
        f"{where} was trained on other base weights than the ones at {shown or 'random init'} "
        "now (their checksum differs): merging its factors into them would give another "
        "model. Point weights at the original base checkpoint and export from there.")
  abstract = jax.eval_shape(  # the state's shapes; no teacher or projector is built
      lambda p: state_lib.create_train_state(experiment, train_config, p,
                                             jax.random.key(0))[0],
      modeling.abstract_params(models, experiment))
  state, _, _ = restore(manager, abstract, None, step)
  merged = state_lib.student_params(state, {"student": frozen}, experiment.lora)
  return merged if shardings is None else jax.device_put(merged, shardings)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState,
            state_shardings: Any = None, step: Optional[int] = None
            ) -> Tuple[TrainState, Dict[str, Any], Dict[str, Any]]:
  """Restores (state, assets, data_iterator) of `step` (default: the latest), verified.

  Args:
    abstract_state: `jax.eval_shape` of the state creation (shapes and dtypes).
    state_shardings: target shardings like `abstract_state` (any mesh; default: one
      device). The rng's sharding is taken from its own entry.
  Raises:
    CorruptCheckpointError: a file of the step cannot be read, or an item differs from
      its checksum (no fallback here; `maybe_restore` falls back).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {manager.directory}; train first, or point "
                          "--workdir at a run directory.")
  target = _with_shardings(abstract_state, state_shardings)
  target = target.replace(rng=jax.ShapeDtypeStruct(
      _abstract_storable(abstract_state).rng.shape, jnp.uint32, sharding=target.rng.sharding))
  restored = _restore_step(manager, step, {"train_state": _without_empty_ema(target)},
                          ("assets", "data_iterator"))
  state = _from_stored(restored["train_state"])
  state = state.replace(rng=jax.random.wrap_key_data(state.rng))
  return state, restored["assets"], restored["data_iterator"]


def maybe_restore(manager: ocp.CheckpointManager, state: TrainState, state_shardings: Any = None
                  ) -> Tuple[TrainState, Optional[Dict], Optional[Dict]]:
  """Automatic resume: the newest valid checkpoint if there is one, else `state` unchanged.

  Corrupt newer steps are logged (step and array), then moved aside (`set_aside`); if no
  step is valid, a CheckpointError says so and what to do.
  """
  if manager.latest_step() is None:
    return state, None, None
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  step, restored, failures = newest_valid(
      manager, lambda s: restore(manager, abstract, state_shardings, s))
  for failure in failures:
    set_aside(manager, failure.step)
  logging.info("Resuming from step %d in %s", step, manager.directory)
  return restored


def restore_params(manager: ocp.CheckpointManager, abstract_params: Any, shardings: Any = None,
                   step: Optional[int] = None) -> Any:
  """The inference `params` item of a run checkpoint, verified (CorruptCheckpointError)."""
  step = manager.latest_step() if step is None else step
  return _restore_step(manager, step,
                       {"params": _with_shardings(abstract_params, shardings)})["params"]


def restore_inference(manager: ocp.CheckpointManager, step: Optional[int] = None,
                      shardings: Any = None) -> Tuple[int, Any, Experiment, Dict[str, Any]]:
  """(step, student params, experiment, assets) of a run checkpoint, verified.

  Args:
    step: the step to load; a corrupt one is a CheckpointError. None: the newest valid
      step, falling back past corrupt ones with a warning (nothing is moved or deleted).
    shardings: optional target shardings like the params (default: one device).
  """
  def load(s: int) -> Tuple[Any, Experiment, Dict[str, Any]]:
    assets = _restore_step(manager, s, {}, ("assets",))["assets"]
    experiment = experiment_from_assets(assets)
    if not (epath.Path(manager.directory) / str(s) / "params").exists():
      return _rebuild_inference(manager, s, assets, experiment, shardings), experiment, assets
    abstract = modeling.abstract_params(modeling.build_models(experiment), experiment)
    params = restore_params(manager, abstract["student"], shardings, step=s)
    return params, experiment, assets

  if step is None:
    step, (params, experiment, assets), _ = newest_valid(manager, load)
    return step, params, experiment, assets
  try:
    return (step, *load(step))
  except CorruptCheckpointError as e:
    raise CheckpointError(f"{e}. Choose another step (saved: {list(manager.all_steps())}), "
                          "or none for the newest valid one.") from None


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
    The absolute path written (with a `checksums` item, like a run's steps). Writes go
    to `path + ".partial"` renamed at the end.
  """
  assets = jsonable({
      "format_version": EXPORT_FORMAT_VERSION,
      "config": experiment_to_config(experiment, lora_merged=True),
      "norm_stats": {k: v.to_dict() for k, v in norm_stats.items()},
      "tokenizer": os.fspath(tokenizer), "dtype": dtype or "as_trained", **(extra or {})})
  params = convert_lib.cast_floating(params, dtype)
  checksums = checksums_lib.make_record({"params": params}, {"assets": assets})
  return convert_lib.write_params(path, params, {"assets": assets, "checksums": checksums})


def _export_dir(path: str) -> str:
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(os.path.join(path, "params")) or not os.path.isdir(
      os.path.join(path, "assets")):
    raise CheckpointError(f"{path} is not an exported policy (needs params/ and assets/); "
                          "write one with vla_jax.train.checkpoint.export (--mode=export).")
  return path


def read_export_assets(path: str) -> Dict[str, Any]:
  """The assets (config, norm stats, tokenizer, ...) of an export, verified; no params read."""
  path = _export_dir(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    read = lambda args: checkpointer.restore(path, args)
    try:
      return _restore_checked(read, path, None, {}, ("assets",))["assets"]
    except CorruptCheckpointError as e:
      raise CheckpointError(f"{e}. Export it again from its run (--mode=export).") from None


def load_policy_params(path: str, shardings: Any = None
                       ) -> Tuple[Any, Experiment, Dict[str, NormStats], Dict[str, Any]]:
  """Reads an `export`ed checkpoint.

  Args:
    path: the export directory.
    shardings: optional target shardings like the params (default: one device).
  Returns:
    (params, experiment (lora=None: merged), norm stats by name, raw assets).
  """
  path = _export_dir(path)
  assets = read_export_assets(path)
  experiment = experiment_from_assets(assets)
  abstract = modeling.abstract_params(modeling.build_models(experiment), experiment)["student"]
  if assets.get("dtype") not in (None, "as_trained"):
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, assets["dtype"])
        if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    read = lambda args: checkpointer.restore(path, args)
    try:
      params = _restore_checked(read, path, None,
                                {"params": _with_shardings(abstract, shardings)})["params"]
    except CorruptCheckpointError as e:
      raise CheckpointError(f"{e}. Export it again from its run (--mode=export).") from None
  return params, experiment, norm_stats_from_assets(assets), assets


def export_latest(run_dir: str, path: str, *, dtype: Optional[str] = None,
                  step: Optional[int] = None) -> str:
  """Exports a run's checkpoint (latest step by default) as a standalone policy.

  Args:
    run_dir: the run's checkpoint directory (`WORKDIR/checkpoints`).
    path: output directory (must not exist).
    dtype: cast floating params, e.g. "bfloat16"; None keeps float32.
    step: the step to export (default: the newest valid one; see `restore_inference`).
  Returns:
    The export path; `load_policy_params(path)` reads it back.
  """
  manager = make_manager(run_dir, async_save=False)
  if manager.latest_step() is None:
    raise CheckpointError(f"no checkpoint in {run_dir}; train first (--mode=train).")
  step, params, experiment, assets = restore_inference(manager, step)
  manager.close()
  return export(path, params, experiment, norm_stats_from_assets(assets), dtype=dtype,
                tokenizer=assets.get("tokenizer", ""), extra={
                    "source_step": int(step),
                    # the policy's prompt layout (proprio tokens) and state statistics
                    **{k: assets[k] for k in ("data", "state_stats") if k in assets}})
