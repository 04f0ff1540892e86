"""The training loop, readable top to bottom: config -> mesh -> data -> state -> steps.

Sections: (1) typed configs, validated before anything compiles; (2) data: the input
pipeline over the configured RLDS sources (by default the bundled tabletop dataset and a
tokenizer trained on its prompts, both built on first use); (3) models and a train state
created already sharded on the mesh; (4) automatic resume from `WORKDIR/checkpoints`
(state and data position); (5) the jitted, sharded `train_step`; (6) the loop with a
progress bar, TensorBoard and JSONL metrics, periodic open-loop evaluation and async
checkpoints; steps with a NaN/inf loss are skipped by the step and counted here, and
`train.max_nonfinite_steps` of them in a row stop the run with a DivergenceError;
SIGTERM / SIGINT finish the step, save, wait for the save and raise TrainingStopped; (7)
a summary JSON and a PNG of the loss curves.
"""

import dataclasses
import errno
import json
import logging
import os
import signal
import statistics
import threading
import time
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vla_jax import modeling
from vla_jax.actions import ActionTokenizer
from vla_jax.data import pipeline as data_lib
from vla_jax.errors import CheckpointError, ConfigError, DivergenceError, TrainingStopped
from vla_jax.experiment import Experiment
from vla_jax.run_config import parse_run_config
from vla_jax.text import Tokenizer
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import sharding as sharding_lib
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib
from vla_jax.train import workdir as workdir_lib
from vla_jax.typed_config import from_mapping


# ----------------------------------------------------------------------------- data
def resolve_data(config: Any, experiment: Experiment, train_config: state_lib.TrainConfig,
                 build: bool = True) -> data_lib.DataConfig:
  """The DataConfig of a run: fills the bundled dataset / tokenizer and shared sizes.

  `train.batch_size` and `model.image_size` are the single source of the batch size and
  resolution; `data_dir=""` on the `tabletop` source and `tokenizer="bundled"` mean the
  bundled dataset and its tokenizer (built on first use, cached). `build=False` checks
  and types the section without building them (they stay "" / "bundled").
  """
  data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data)
  sources = []
  for source in data.pop("sources", ()):
    source = dict(source)
    if not source.get("data_dir"):
      if source.get("name") != "tabletop":
        raise ConfigError(f"data source {source.get('name')!r} needs a data_dir; only the "
                          "bundled 'tabletop' dataset is found automatically.")
      if build:
        from vla_jax.sim import bundled  # pylint: disable=g-import-not-at-top
        source["data_dir"] = bundled.bundled_dataset_dir()
    sources.append(source)
  tokenizer = config.tokenizer
  if tokenizer == modeling.BUNDLED and build:
    from vla_jax.sim import bundled  # pylint: disable=g-import-not-at-top
    tokenizer = bundled.bundled_tokenizer_path()
  for key in ("global_batch_size", "image_size", "tokenizer", "seed"):
    if key in data:
      raise ConfigError(f"config.data.{key} is derived (train.batch_size, model.image_size, "
                        "config.tokenizer, config.seed); set it there instead.")
  return from_mapping(data_lib.DataConfig, dict(
      data, sources=sources, global_batch_size=train_config.batch_size,
      image_size=experiment.model.image_size, tokenizer=tokenizer or None, seed=config.seed),
      "data")


def check_vocab(tokenizer: Tokenizer, experiment: Experiment) -> None:
  """The LLM must embed every tokenizer id and the padding id right after them."""
  needed = tokenizer.vocab_size + 1
  if experiment.model.llm.vocab_size < needed:
    raise ConfigError(
        f"model.llm.vocab_size={experiment.model.llm.vocab_size} is smaller than the tokenizer "
        f"({tokenizer.vocab_size} ids + <PAD>); set --config.model.llm.vocab_size="
        f"{-(-needed // 64) * 64} (OpenVLA pads to a multiple of 64).")


def to_train_batch(batch: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """A data-pipeline host batch -> the train-step batch contract (vla_jax/train/step.py)."""
  images = batch["observation"]["image_primary"]
  actions = batch["action"]
  return {"images": images, "tokens": batch["tokens"], "input_mask": batch["attention_mask"],
          "loss_mask": batch["loss_mask"],
          "actions": actions[:, 0] if actions.ndim == 3 else actions}


# ----------------------------------------------------------------------------- logging
class MetricsWriter:
  """TensorBoard (tensorboardX) + `metrics.jsonl`; only process 0 writes.

  On resume (`resumed_from` = the restored step) a torn last line and the lines of steps
  after it are dropped first (`workdir.repair_metrics`), so the file stays valid JSONL
  and the curve does not double back.
  """

  def __init__(self, workdir: str, resumed_from: int = 0):
    self._active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if self._active:
      workdir_lib.repair_metrics(self.path, resumed_from)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(self.path, "a")

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self._active:
      return
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()


def plot_curves(jsonl_path: str, png_path: str) -> Optional[str]:
  """Loss and alignment curves from `metrics.jsonl` as one PNG (None without data)."""
  # A Figure without pyplot: no global backend switch (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  rows = workdir_lib.read_metrics(jsonl_path)
  panels = [("loss/action", "train action loss"), ("loss/align", "train align loss"),
            ("align/cos_sim", "train cos sim"), ("action/token_accuracy", "train token acc.")]
  panels = [(k, t) for k, t in panels if any(k in r for r in rows)]
  if not panels:
    return None
  fig = Figure(figsize=(3.6 * len(panels), 3.0))
  axes = fig.subplots(1, len(panels))
  for ax, (key, title) in zip(np.atleast_1d(axes), panels):
    points = [(r["step"], r[key]) for r in rows if key in r]
    ax.plot(*zip(*points), lw=1.5)
    val = [(r["step"], r["val/" + key]) for r in rows if "val/" + key in r]
    if val:
      ax.plot(*zip(*val), "o-", ms=3, lw=1, label="val")
      ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  return png_path


# ----------------------------------------------------------------------------- divergence
@jax.jit
def count_nonfinite(counts: jax.Array, nonfinite: jax.Array) -> jax.Array:
  """int32 [3] (current streak, longest streak, total) of skipped steps, after one more.

  Runs on device beside the step, so watching for divergence costs no host sync per step.
  """
  bad = (nonfinite > 0).astype(jnp.int32)
  streak = (counts[0] + 1) * bad
  return jnp.stack([streak, jnp.maximum(counts[1], streak), counts[2] + bad])


def check_divergence(counts: jax.Array, limit: int, step: int, last_good: Optional[int],
                     checkpoint_dir: str, learning_rate: float) -> int:
  """DivergenceError once `limit` steps in a row were non-finite; else the total skipped."""
  _, longest, total = (int(x) for x in jax.device_get(counts))
  if longest >= limit:
    where = (f"the last good checkpoint is step {last_good} in {checkpoint_dir}"
             if last_good is not None else "no checkpoint was saved")
    raise DivergenceError(
        f"Training diverged: {longest} steps in a row had a NaN/inf loss or gradient norm (limit "
        f"train.max_nonfinite_steps={limit}), by step {step}. Their updates were skipped and no "
        f"non-finite state was saved; {where}. Lower train.learning_rate (now "
        f"{learning_rate:g}), add train.warmup_steps or train.grad_clip_norm, and resume.")
  return total


# ----------------------------------------------------------------------------- signals
class StopSignal:
  """SIGTERM / SIGINT -> a flag the loop reads after each step, then it saves and stops.

  Preemption (TPU VMs, SLURM) sends SIGTERM and Ctrl-C sends SIGINT; the default
  handlers would kill the process between checkpoints, or in the middle of an async
  save. Handlers can only be installed from the main thread; elsewhere this is a no-op.
  """

  def __init__(self):
    self.received: Optional[str] = None
    self._previous: Dict[int, Any] = {}

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is None:
      logging.warning("Got %s: finishing this step, then saving a checkpoint and stopping.",
                      signal.Signals(signum).name)
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ----------------------------------------------------------------------------- train
def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or any exception it was raised from, is ENOSPC (Orbax and TensorStore
  wrap the OSError of a full disk in their own types, or only keep its message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def disk_full_error(workdir: str, step: int, manager) -> CheckpointError:
  """One line instead of hundreds from Orbax's threads: what failed and what is safe."""
  try:
    saved = sorted(manager.all_steps())
  except Exception:  # pylint: disable=broad-except  # the listing itself may fail now
    saved = []
  resume = (f"the committed checkpoints (steps {saved}) are intact; free space (or pass a "
            f"--workdir on a larger disk) and run the same command to resume from step "
            f"{saved[-1]}" if saved else "no checkpoint had been committed; free space and "
            "run the same command to start again")
  return CheckpointError(f"No space left on device while the run in {os.path.abspath(workdir)} "
                         f"was writing (checkpoint or metrics) at step {step}: {resume}.")


def train(config: Any, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the experiment in `config` under `workdir`; returns a summary.

  One run at a time per workdir: a second one raises ConfigError naming the first
  (`workdir.workdir_lock`; a dead run's lock is taken over).
  """
  # Before any other JAX call (process_index below included) on a multi-host run.
  sharding_lib.initialize_distributed(config.distributed)
  with workdir_lib.workdir_lock(workdir, active=jax.process_index() == 0):
    return _train(config, workdir)


RUN_CONFIG_FILE = "run_config.json"


def _train(config: Any, workdir: str) -> Dict[str, Any]:
  # (1) Typed configs, validated before anything compiles.
  run = parse_run_config(config)
  experiment, train_config = run.train_experiment, run.train
  sharding_config, schedule = run.sharding, run.schedule
  with_params = schedule.with_params(experiment)
  mesh = sharding_lib.make_mesh(sharding_config)
  sharding_lib.check_batch_size(train_config.batch_size, mesh, train_config.grad_accum_steps)

  # (2) Data.
  data_config = resolve_data(config, experiment, train_config)
  if not data_config.tokenizer:
    raise ConfigError("Training needs a tokenizer: set config.tokenizer to a SentencePiece "
                      "model / HF tokenizer dir, or 'bundled'.")
  tokenizer = Tokenizer.from_path(data_config.tokenizer)
  check_vocab(tokenizer, experiment)
  action_tokenizer = ActionTokenizer(vocab_size=tokenizer.vocab_size)

  # (3) Models and a sharded train state.
  # Checkpoint tensors are read straight onto their shards and only the rest is
  # initialised; the state is then built from those (donated) shards.
  models = modeling.build_models(experiment)
  params = modeling.create_params(
      models, experiment, dataclasses.asdict(run.weights), jax.random.key(train_config.seed),
      sharding_lib.tree_shardings(modeling.abstract_params(models, experiment), mesh,
                                  sharding_config))
  (state, frozen), (state_sharding, frozen_sharding) = sharding_lib.sharded_init(
      lambda p: state_lib.create_train_state(experiment, train_config, p,
                                             jax.random.key(train_config.seed + 1)),
      mesh, sharding_config, params, donate=True)
  del params

  # (4) Resume.
  os.makedirs(workdir, exist_ok=True)
  manager = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"),
                                  max_to_keep=schedule.keep_checkpoints,
                                  keep_period=schedule.keep_period or None)
  ckpt_lib.check_resume_config(manager, experiment, run.preset,
                               ckpt_lib.train_layout(train_config))
  state, _, data_state = ckpt_lib.maybe_restore(manager, state, state_sharding)
  iterator = data_lib.make_iterator(data_config, state=data_state)
  norm_stats = {name: s.action for name, s in iterator.info["statistics"].items()}
  # The policy rebuilds its prompt from these: state tokens need the state statistics.
  state_stats = {name: s.state.to_dict() for name, s in iterator.info["statistics"].items()}
  assets = ckpt_lib.make_assets(experiment, norm_stats, tokenizer=data_config.tokenizer,
                                extra={"data": {"sources": [s.name for s in data_config.sources],
                                                "proprio_dims": list(data_config.proprio_dims),
                                                "action_horizon": data_config.action_horizon,
                                                "normalization": data_config.normalization},
                                       "state_stats": state_stats,
                                       "train_layout": ckpt_lib.train_layout(train_config),
                                       "preset": run.preset,
                                       "run_config": run.record(data_config)})
  if not with_params:  # what rebuilds the policy from the saved factors
    assets["base"] = ckpt_lib.base_record(dataclasses.asdict(run.weights), train_config.seed,
                                          train_config,
                                          frozen["student"])
  if jax.process_index() == 0:  # one writer per file on a shared multi-host workdir
    with open(os.path.join(workdir, "norm_stats.json"), "w") as f:
      json.dump(assets["norm_stats"], f, indent=1)
    with open(os.path.join(workdir, RUN_CONFIG_FILE), "w") as f:
      json.dump(assets["run_config"], f, indent=1)

  # (5) The jitted, sharded steps.
  train_step = sharding_lib.jit_train_step(
      step_lib.make_train_step(models, experiment, train_config, action_tokenizer),
      mesh, state_sharding, frozen_sharding)
  eval_step = sharding_lib.jit_eval_step(
      step_lib.make_eval_step(models, experiment, action_tokenizer),
      mesh, state_sharding, frozen_sharding)

  def save(step_number: int, force: bool = False) -> None:
    params = (state_lib.student_params(state, frozen, experiment.lora) if with_params
              else None)
    ckpt_lib.save(manager, step_number, state, params, assets, iterator.state(), force=force)

  val_config = dataclasses.replace(data_config, sources=tuple(
      dataclasses.replace(s, split="val") for s in data_config.sources))

  def evaluate() -> Dict[str, float]:
    val_iter: Iterator = data_lib.make_iterator(val_config, train=False)
    totals: Dict[str, list] = {}
    for _ in range(schedule.eval_batches):
      batch = sharding_lib.shard_batch(to_train_batch(next(val_iter)), mesh)
      for k, v in jax.device_get(eval_step(state, frozen, batch)).items():
        totals.setdefault(k, []).append(float(v))
    return {f"val/{k}": float(np.mean(v)) for k, v in totals.items()}

  # (6) The loop.
  start = int(jax.device_get(state.step))
  writer = MetricsWriter(workdir, resumed_from=start)
  if start:
    logging.info("Resumed at step %d (data batch %d).", start, iterator.state()["batches"])
  step_times, last = [], {}
  progress = tqdm(range(start, train_config.num_steps), initial=start,
                  total=train_config.num_steps, desc="train", disable=jax.process_index() != 0)
  nonfinite = jax.device_put(np.zeros(3, np.int32), sharding_lib.replicated(mesh))
  max_nonfinite = train_config.max_nonfinite_steps
  tick = time.perf_counter()
  stopped_at = None
  done = start
  try:
    with StopSignal() as stop:
      try:
        for step_number in progress:
          batch = sharding_lib.shard_batch(to_train_batch(next(iterator)), mesh)
          state, metrics = train_step(state, frozen, batch)
          nonfinite = count_nonfinite(nonfinite, metrics["nonfinite"])
          done = step_number + 1
          stopping = stop.received is not None  # read once: a signal may land mid-iteration
          is_last = done == train_config.num_steps
          is_log = done % schedule.log_every == 0 or is_last
          is_save = done % schedule.checkpoint_every == 0 or is_last or stopping
          # The streak is read from the device only when the host syncs anyway, or once
          # every max_nonfinite steps (the longest streak is kept, so none is missed).
          if is_log or is_save or done % max_nonfinite == 0:
            skipped = check_divergence(nonfinite, max_nonfinite, done, manager.latest_step(),
                                       manager.directory, train_config.learning_rate)
          if is_log:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics["nonfinite_steps"] = float(skipped)
            elapsed = time.perf_counter() - tick
            steps = done - (start if not step_times else step_times[-1][0])
            step_times.append((done, elapsed / steps))
            metrics["throughput/steps_per_s"] = steps / elapsed
            metrics["throughput/frames_per_s"] = steps * train_config.batch_size / elapsed
            tick = time.perf_counter()
            if schedule.eval_every and (done % schedule.eval_every == 0 or is_last):
              metrics.update(evaluate())
            writer.write(done, metrics)
            last = metrics
            progress.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()
                                  if k in ("loss/action", "loss/align", "align/cos_sim")})
          if is_save:
            save(done, force=stopping)
          if stopping and not is_last:
            stopped_at = done
            break
      finally:
        # Saves already under way hold good states (a diverged one raises before saving):
        # let them commit before the error, or the summary, leaves this function.
        manager.wait_until_finished()
        writer.close()
  except Exception as e:  # pylint: disable=broad-except
    if not is_disk_full(e):
      raise
    raise disk_full_error(workdir, done, manager) from None
  if stopped_at is not None:
    saved, directory = manager.latest_step(), manager.directory
    manager.close()
    raise TrainingStopped(
        f"Stopped by {stop.received} after step {stopped_at} of {train_config.num_steps}; "
        f"checkpoint step {saved} is saved in {directory}. Run the same command with "
        f"--workdir={os.path.abspath(workdir)} to resume from it.")

  # (7) Summary and plots (written by process 0, which alone has the metrics file).
  writes = jax.process_index() == 0
  summary = {
      "steps": train_config.num_steps, "resumed_from": start, "workdir": os.path.abspath(workdir),
      "final_metrics": last, "checkpoint_steps": list(manager.all_steps()),
      "median_step_s": statistics.median([t for _, t in step_times[1:]] or
                                         [t for _, t in step_times] or [float("nan")]),
      "loss_curves": (plot_curves(writer.path, os.path.join(workdir, "loss_curves.png"))
                      if writes else None),
  }
  manager.close()
  if writes:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
