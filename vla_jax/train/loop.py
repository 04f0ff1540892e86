"""The training loop, readable top to bottom: config -> mesh -> data -> state -> steps.

Sections: (1) typed configs, validated before anything compiles; (2) data: the input
pipeline over the configured RLDS sources (by default the bundled tabletop dataset and a
tokenizer trained on its prompts, both built on first use); (3) models and a train state
created already sharded on the mesh; (4) automatic resume from `WORKDIR/checkpoints`
(state and data position); (5) the jitted, sharded `train_step`; (6) the loop with a
progress bar, TensorBoard and JSONL metrics, periodic open-loop evaluation and async
checkpoints; (7) a summary JSON and a PNG of the loss curves.
"""

import dataclasses
import json
import logging
import os
import statistics
import time
from typing import Any, Dict, Iterator, Optional

import jax
import numpy as np
from tqdm import tqdm

from vla_jax import modeling
from vla_jax.actions import ActionTokenizer
from vla_jax.data import pipeline as data_lib
from vla_jax.errors import ConfigError
from vla_jax.experiment import Experiment, parse_config
from vla_jax.text import Tokenizer
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import sharding as sharding_lib
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib
from vla_jax.typed_config import from_mapping

BUNDLED = "bundled"


# ----------------------------------------------------------------------------- data
def resolve_data(config: Any, experiment: Experiment, train_config: state_lib.TrainConfig
                 ) -> data_lib.DataConfig:
  """The DataConfig of a run: fills the bundled dataset / tokenizer and shared sizes.

  `train.batch_size` and `model.image_size` are the single source of the batch size and
  resolution; `data_dir=""` on the `tabletop` source and `tokenizer="bundled"` mean the
  bundled dataset and its tokenizer (built on first use, cached).
  """
  data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data)
  sources = []
  for source in data.pop("sources", ()):
    source = dict(source)
    if not source.get("data_dir"):
      if source.get("name") != "tabletop":
        raise ConfigError(f"data source {source.get('name')!r} needs a data_dir; only the "
                          "bundled 'tabletop' dataset is found automatically.")
      from vla_jax.sim import bundled  # pylint: disable=g-import-not-at-top
      source["data_dir"] = bundled.bundled_dataset_dir()
    sources.append(source)
  tokenizer = config.tokenizer
  if tokenizer == BUNDLED:
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
  """TensorBoard (tensorboardX) + `metrics.jsonl`; only process 0 writes."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if self._active:
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
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [json.loads(line) for line in open(jsonl_path)] if os.path.exists(jsonl_path) else []
  panels = [("loss/action", "train action loss"), ("loss/align", "train align loss"),
            ("align/cos_sim", "train cos sim"), ("action/token_accuracy", "train token acc.")]
  panels = [(k, t) for k, t in panels if any(k in r for r in rows)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
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
  plt.close(fig)
  return png_path


# ----------------------------------------------------------------------------- train
def train(config: Any, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the experiment in `config` under `workdir`; returns a summary."""
  # (1) Typed configs, validated before anything compiles.
  experiment = parse_config(config)
  train_config = from_mapping(state_lib.TrainConfig, config.train, "train")
  sharding_config = from_mapping(sharding_lib.ShardingConfig, config.sharding, "sharding")
  sharding_lib.initialize_distributed(config.distributed)
  experiment = state_lib.apply_train_overrides(experiment, train_config)
  state_lib.check_compatible(experiment, train_config)
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
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(train_config.seed))
  params = modeling.load_checkpoints(params, models, experiment, config.weights)
  (state, frozen), (state_sharding, frozen_sharding) = sharding_lib.sharded_init(
      lambda p: state_lib.create_train_state(experiment, train_config, p,
                                             jax.random.key(train_config.seed + 1)),
      mesh, sharding_config, params)
  del params

  # (4) Resume.
  os.makedirs(workdir, exist_ok=True)
  manager = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"),
                                  max_to_keep=config.keep_checkpoints,
                                  keep_period=config.keep_period or None)
  state, _, data_state = ckpt_lib.maybe_restore(manager, state, state_sharding)
  iterator = data_lib.make_iterator(data_config, state=data_state)
  norm_stats = {name: s.action for name, s in iterator.info["statistics"].items()}
  assets = ckpt_lib.make_assets(experiment, norm_stats, tokenizer=data_config.tokenizer,
                                extra={"data": {"sources": [s.name for s in data_config.sources]}})
  with open(os.path.join(workdir, "norm_stats.json"), "w") as f:
    json.dump(assets["norm_stats"], f, indent=1)

  # (5) The jitted, sharded steps.
  train_step = sharding_lib.jit_train_step(
      step_lib.make_train_step(models, experiment, train_config, action_tokenizer),
      mesh, state_sharding, frozen_sharding)
  eval_step = sharding_lib.jit_eval_step(
      step_lib.make_eval_step(models, experiment, action_tokenizer),
      mesh, state_sharding, frozen_sharding)

  def save(step_number: int) -> None:
    ckpt_lib.save(manager, step_number, state,
                  state_lib.student_params(state, frozen, experiment.lora), assets,
                  iterator.state())

  val_config = dataclasses.replace(data_config, sources=tuple(
      dataclasses.replace(s, split="val") for s in data_config.sources))

  def evaluate() -> Dict[str, float]:
    val_iter: Iterator = data_lib.make_iterator(val_config, train=False)
    totals: Dict[str, list] = {}
    for _ in range(config.eval_batches):
      batch = sharding_lib.shard_batch(to_train_batch(next(val_iter)), mesh)
      for k, v in jax.device_get(eval_step(state, frozen, batch)).items():
        totals.setdefault(k, []).append(float(v))
    return {f"val/{k}": float(np.mean(v)) for k, v in totals.items()}

  # (6) The loop.
  writer = MetricsWriter(workdir)
  start = int(jax.device_get(state.step))
  if start:
    logging.info("Resumed at step %d (data batch %d).", start, iterator.state()["batches"])
  step_times, last = [], {}
  progress = tqdm(range(start, train_config.num_steps), initial=start,
                  total=train_config.num_steps, desc="train", disable=jax.process_index() != 0)
  tick = time.perf_counter()
  for step_number in progress:
    batch = sharding_lib.shard_batch(to_train_batch(next(iterator)), mesh)
    state, metrics = train_step(state, frozen, batch)
    done = step_number + 1
    if done % config.log_every == 0 or done == train_config.num_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - tick
      steps = done - (start if not step_times else step_times[-1][0])
      step_times.append((done, elapsed / steps))
      metrics["throughput/steps_per_s"] = steps / elapsed
      metrics["throughput/frames_per_s"] = steps * train_config.batch_size / elapsed
      tick = time.perf_counter()
      if config.eval_every and (done % config.eval_every == 0 or
                                done == train_config.num_steps):
        metrics.update(evaluate())
      writer.write(done, metrics)
      last = metrics
      progress.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()
                            if k in ("loss/action", "loss/align", "align/cos_sim")})
    if done % config.checkpoint_every == 0 or done == train_config.num_steps:
      save(done)
  manager.wait_until_finished()
  writer.close()

  # (7) Summary and plots.
  summary = {
      "steps": train_config.num_steps, "resumed_from": start, "workdir": os.path.abspath(workdir),
      "final_metrics": last, "checkpoint_steps": list(manager.all_steps()),
      "median_step_s": statistics.median([t for _, t in step_times[1:]] or
                                         [t for _, t in step_times] or [float("nan")]),
      "loss_curves": plot_curves(writer.path, os.path.join(workdir, "loss_curves.png")),
  }
  manager.close()
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
