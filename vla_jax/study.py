"""The study: does fine-tuning blind the pretrained VLA, and does alignment keep its sight?

`python -m vla_jax.main --config=configs/study.py[:smoke] --mode=study --workdir=DIR` runs,
on the CPU-sized tabletop benchmark, the paper's comparison end to end:

  1. pretrain   the frozen teacher tower and the student VLM (`vla_jax.train.pretrain`,
                `vla_jax.train.vlm_pretrain`), on renders of every split's content;
                cached by a hash of their settings (shared with the default run's
                "bundled" weights when the settings are the defaults).
  2. finetune   one run per (method, seed) in DIR/runs/<method>_seed<seed>, all from the
                same pretrained VLM on the `train` split's demonstrations only:
                sft (align_coeff 0), align (the config's coefficient, 0.2), freeze
                (vision towers frozen, no alignment). Same recipe otherwise.
  3. evaluate   closed-loop success of every run on `train` and on every OOD split and
                VL-Think environment, on shared episode seeds -> <run>/eval_sim/.
  4. probe      linear probes on mean-pooled visual-token features at each aligned layer
                (teacher, pretrained VLM, every run; the catalogue's unseen objects
                included) -> DIR/probe.json.
  5. attention  "Do you see the {object}?" attention maps of one object for the
                pretrained VLM and the first seed of each method -> DIR/attention.png.
  6. report     DIR/report.md (the paper's Table 1 layout, paired Wilcoxon tests, the
                probe table), DIR/summary.json, DIR/axes.png, DIR/probe.png.

Every stage keeps its output in DIR and is skipped when that output exists with the same
settings, so an interrupted study resumes where it stopped (a run resumes from its last
checkpoint); DIR/study_state.json records the seconds each stage took.
"""

import copy
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vla_jax.errors import ConfigError
from vla_jax.eval.config import EVAL_SPLITS, EvalConfig
from vla_jax.typed_config import from_mapping, require

METHODS = ("sft", "align", "freeze")
AXES = ("semantic", "vision", "execution", "vlthink")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What the study runs (`config.study`).

  Attributes:
    methods: fine-tuning methods, from METHODS.
    seeds: fine-tuning seeds (data order, projector init, train rng); every method runs
      every seed, from the same pretrained VLM.
    eval_episodes: closed-loop episodes per environment and run (shared seeds).
    eval_splits: environments evaluated ("train" first: in-distribution success).
    probe_images_per_object: rendered images per catalogue object for the probe.
    attention_object: catalogue object of the attention maps.
    pretrain: overrides of `pretrain.PretrainConfig` (empty: the defaults, which the
      default run's "bundled" weights also use).
    vlm_pretrain: overrides of `vlm_pretrain.VLMPretrainConfig`.
    cache_dir: where pretraining is cached ("" = ~/.cache/vla_jax, shared with the
      default run; the smoke preset uses DIR/cache).
  """
  methods: Tuple[str, ...] = METHODS
  seeds: Tuple[int, ...] = (0, 1, 2)
  eval_episodes: int = 32
  eval_splits: Tuple[str, ...] = ("train",) + EVAL_SPLITS
  probe_images_per_object: int = 24
  attention_object: int = 0
  pretrain: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  vlm_pretrain: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  cache_dir: str = ""

  def __post_init__(self):
    # The command line gives words as one string: --config.study.methods=sft,align arrives
    # as ("sft,align",) (ml_collections keeps the field a tuple), a dict as "sft,align".
    for key in ("methods", "eval_splits"):
      value = getattr(self, key)
      items = (value,) if isinstance(value, str) else tuple(value)
      object.__setattr__(self, key, tuple(
          w.strip() for item in items
          for w in (item.split(",") if isinstance(item, str) else (item,)) if w.strip()))
    for method in self.methods:
      require(method in METHODS, f"study.methods: unknown method {method!r}; choose from "
              f"{', '.join(METHODS)}.")
    require(len(set(self.methods)) == len(self.methods) and self.methods,
            f"study.methods must be distinct and non-empty, got {self.methods}.")
    require(len(set(self.seeds)) == len(self.seeds) and self.seeds,
            f"study.seeds must be distinct and non-empty, got {self.seeds}.")
    require(self.eval_episodes > 0, f"study.eval_episodes must be > 0, got "
            f"{self.eval_episodes}.")
    require("train" in self.eval_splits, "study.eval_splits must include 'train' (the "
            "in-distribution success every comparison is read against).")
    EvalConfig(splits=tuple(self.eval_splits), attention_objects=(self.attention_object,))


def run_name(method: str, seed: int) -> str:
  return f"{method}_seed{seed}"


def method_config(config: Any, method: str, seed: int, weights: Mapping[str, str]) -> Any:
  """The training config of one run: the study's base recipe with the method's changes."""
  run = copy.deepcopy(config)
  with run.unlocked():
    del run["study"]
    run.seed = seed
    run.train.seed = seed
    run.weights.update(dict(weights))
    if method in ("sft", "freeze"):
      run.align.align_coeff = 0.0
    if method == "freeze":
      run.train.trainable = "freeze_vision"
  return run


# ------------------------------------------------------------------------- state
class _State:
  """DIR/study_state.json: the settings the outputs were made with, seconds per stage."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "study_state.json")
    self.data = {"seconds": {}, "invocations": []}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.data = json.load(f)

  def add_seconds(self, stage: str, seconds: float) -> None:
    self.data["seconds"][stage] = self.data["seconds"].get(stage, 0.0) + float(seconds)
    self.save()

  def save(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1)
    os.replace(tmp, self.path)


def _run_finished(run_dir: str, num_steps: int) -> bool:
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    summary = json.load(f)
  return summary.get("steps") == num_steps and num_steps in summary.get("checkpoint_steps", [])


def _eval_finished(run_dir: str, splits: Sequence[str], seeds: Sequence[int]) -> bool:
  path = os.path.join(run_dir, "eval_sim", "results.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    results = json.load(f)
  return (sorted(results["splits"]) == sorted(splits) and
          all(results["splits"][s]["seeds"] == list(seeds) for s in splits))


# ------------------------------------------------------------------------ stages
def pretrain_weights(config: Any, study: StudyConfig) -> Dict[str, str]:
  """Stage 1: the pretrained teacher and VLM (built if missing) as `config.weights`."""
  from vla_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  from vla_jax.train import vlm_pretrain  # pylint: disable=g-import-not-at-top
  experiment = experiment_lib.parse_config(config)
  if experiment.teacher.kind != "siglip":
    raise ConfigError("the study pretrains its own SigLIP teacher; set the config's teacher "
                      f"to a SigLIP tower (got {experiment.teacher.kind!r}).")
  paths = pretrain.ensure_pretrained(
      experiment, from_mapping(pretrain.PretrainConfig, dict(study.pretrain), "study.pretrain"),
      study.cache_dir or None, parts=("student_vision", "teacher", "student"),
      vlm_config=from_mapping(vlm_pretrain.VLMPretrainConfig, dict(study.vlm_pretrain),
                              "study.vlm_pretrain"))
  return {"student": paths["student"], "student_format": "bundled", "student_vision": "",
          "teacher": paths["teacher"], "teacher_format": "big_vision"}


def _eval_settings(config: Any, study: StudyConfig) -> EvalConfig:
  from vla_jax.eval import config as eval_config_lib  # pylint: disable=g-import-not-at-top
  return eval_config_lib.eval_config(config, {"splits": tuple(study.eval_splits),
                                              "seeds": study.eval_episodes, "first_seed": 0,
                                              "step": 0})


def probe_all(config: Any, study: StudyConfig, workdir: str, weights: Mapping[str, str],
              runs: Mapping[str, str]) -> Dict[str, Any]:
  """Stage 4: probe accuracy of the teacher, the pretrained VLM and every run (cached)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vla_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from vla_jax import modeling  # pylint: disable=g-import-not-at-top
  from vla_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import probe as probe_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.models.vla import VLA  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "probe.json")
  experiment = experiment_lib.parse_config(config)
  # Every aligned layer is probed; a model's headline numbers are those of the first
  # (the only one by default), the others are under "by_layer".
  layers = experiment.align.layers
  settings = {"layer": layers[0] if len(layers) == 1 else list(layers),
              "images_per_object": study.probe_images_per_object,
              "epochs": int(config.eval.probe_epochs), "seed": int(config.seed)}
  cached = {}
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get("settings") == settings:
      cached = stored["results"]
  wanted = ["teacher", "pretrained", *runs]
  if all(name in cached for name in wanted):
    return cached
  size = experiment.model.image_size
  images, labels, unseen = probe_lib.object_image_set(study.probe_images_per_object, size,
                                                      int(config.seed))
  images = np.stack([augment_lib.preprocess_for_serving(im, size) for im in images])
  protocol = probe_lib.ProbeConfig(epochs=settings["epochs"], seed=settings["seed"])
  models = modeling.build_models(experiment)
  results = dict(cached)
  if "teacher" not in results or "pretrained" not in results:
    params = modeling.create_params(models, experiment, weights, jax.random.key(0))
    features = probe_lib.teacher_features(models.teacher, params["teacher"], images,
                                          experiment.model.grid, experiment.align.grid_match)
    results["teacher"] = probe_lib.probe_features(features, labels, protocol, unseen)
    results["pretrained"] = _probe_layers(probe_lib, models.student, params["student"],
                                          images, layers, labels, protocol, unseen)
  for name, run_dir in runs.items():
    if name in results:
      continue
    params, run_experiment, _, _ = policy_lib.load_checkpoint(run_dir)
    results[name] = _probe_layers(probe_lib, VLA(run_experiment.model), params, images,
                                  layers, labels, protocol, unseen)
    logging.info("probe %s: %s", name, results[name])
  with open(path, "w") as f:
    json.dump({"settings": settings, "classes": int(labels.max()) + 1,
               "images": int(len(labels)), "results": results}, f, indent=1)
  return results


def _probe_layers(probe_lib, model, params, images, layers, labels, protocol, unseen):
  """The probe of a student at each of `layers`: the first layer's result, with every
  layer's under "by_layer" when there are several."""
  by_layer = {}
  for layer in layers:
    features = probe_lib.student_features(model, params, images, layer)
    by_layer[str(layer)] = probe_lib.probe_features(features, labels, protocol, unseen)
  first = dict(by_layer[str(layers[0])])
  if len(layers) > 1:
    first["by_layer"] = by_layer
  return first


def attention_grid(config: Any, study: StudyConfig, workdir: str, weights: Mapping[str, str],
                   runs: Mapping[str, str]) -> str:
  """Stage 5: rows = pretrained VLM and the given runs; columns = image, then layers."""
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vla_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from vla_jax import modeling  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import attention as attention_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import commands  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import probe as probe_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.models.vla import VLA  # pylint: disable=g-import-not-at-top
  from vla_jax.sim import bundled  # pylint: disable=g-import-not-at-top
  from vla_jax.sim import catalogue as cat  # pylint: disable=g-import-not-at-top
  from vla_jax.text import Tokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "attention.png")
  experiment = experiment_lib.parse_config(config)
  models = modeling.build_models(experiment)
  candidates = [("pretrained", models.student, modeling.create_params(
      models, experiment, weights, jax.random.key(0), parts=("student",))["student"])]
  for name, run_dir in runs.items():
    run_params, run_experiment, _, _ = policy_lib.load_checkpoint(run_dir)
    candidates.append((name, VLA(run_experiment.model), run_params))
  size = experiment.model.image_size
  obj = study.attention_object
  images, _, _ = probe_lib.object_image_set(1, size, int(config.seed), (obj,))
  tokenizer = Tokenizer.from_path(bundled.bundled_tokenizer_path(study.cache_dir or None))
  name = cat.OBJECTS[obj].name
  question = commands._prompts(tokenizer, [attention_lib.QUESTION.format(object=name)])  # pylint: disable=protected-access
  generic = commands._prompts(tokenizer, [attention_lib.GENERIC_PROMPT])  # pylint: disable=protected-access
  layers = tuple(sorted({max(0, min(l, experiment.model.llm.depth - 1)) for l in
                         tuple(config.eval.layers) + experiment.align.layers}))
  from vla_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  image = augment_lib.preprocess_for_serving(images[0], size)[None]
  rows, labels = [], []
  for label, model, model_params in candidates:
    attend = attention_lib.jitted_visual_attention(model, layers)
    maps = [np.asarray(attend(model_params, image, t, n)) for t, n in (question, generic)]
    heat = attention_lib.normalized_attention(*maps)[0]
    rows.append(np.concatenate([image[0]] + [attention_lib.overlay(image[0], heat[j])
                                             for j in range(len(layers))], axis=1))
    labels.append(label)
  grid = np.concatenate(rows, axis=0)
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
  with open(os.path.join(workdir, "attention.json"), "w") as f:
    json.dump({"object": name, "rows": labels, "columns": ["image"] + [
        f"layer {l}" for l in layers], "question": attention_lib.QUESTION.format(object=name)},
              f, indent=1)
  return path


# ------------------------------------------------------------------------ report
def _axis_per_episode(results: Mapping[str, Any], axis: str) -> Optional[np.ndarray]:
  """Per evaluation seed, the mean success over the axis' environments: float [n]."""
  rows = [r for r in results["splits"].values() if r["axis"] == axis]
  if not rows:
    return None
  return np.mean([np.asarray(r["success"], float) for r in rows], axis=0)


def summarize(study: StudyConfig, evals: Mapping[str, Mapping[str, Any]],
              probe: Mapping[str, Any]) -> Dict[str, Any]:
  """The study's numbers from the per-episode records (`evals`: {run name: results})."""
  from vla_jax.eval import sim_eval  # pylint: disable=g-import-not-at-top
  methods = [m for m in study.methods if any(run_name(m, s) in evals for s in study.seeds)]
  seeds = {m: [s for s in study.seeds if run_name(m, s) in evals] for m in methods}
  splits = list(study.eval_splits)
  per_env = {m: {split: [evals[run_name(m, s)]["splits"][split]["rate"] for s in seeds[m]]
                 for split in splits} for m in methods}
  axis_means = {name: {axis: float(np.mean(_axis_per_episode(r, axis)))
                       for axis in AXES if _axis_per_episode(r, axis) is not None}
                for name, r in evals.items()}
  method_axes = {m: {axis: float(np.mean([axis_means[run_name(m, s)][axis] for s in seeds[m]]))
                     for axis in axis_means[run_name(m, seeds[m][0])]} for m in methods}
  p_values = {}
  for other in ("sft", "freeze"):
    if "align" not in methods or other not in methods:
      continue
    shared = [s for s in seeds["align"] if s in seeds[other]]
    table = {}
    for axis in ("train",) + AXES:
      def pick(results, axis=axis):
        if axis == "train":
          return np.asarray(results["splits"]["train"]["success"], float)
        return _axis_per_episode(results, axis)
      if not shared or pick(evals[run_name("align", shared[0])]) is None:
        continue
      baseline = np.concatenate([pick(evals[run_name(other, s)]) for s in shared])
      aligned = np.concatenate([pick(evals[run_name("align", s)]) for s in shared])
      table[axis] = sim_eval.paired_wilcoxon(baseline, aligned)
    p_values[f"align_vs_{other}"] = table
  in_distribution = {m: float(np.mean(per_env[m]["train"])) for m in methods}
  probe_accuracy = {}
  for name in ("teacher", "pretrained"):
    if name in probe:
      probe_accuracy[name] = probe[name]["test_top1"]
  probe_unseen = {name: probe[name].get("test_unseen_top1") for name in probe_accuracy}
  for m in methods:
    names = [run_name(m, s) for s in seeds[m] if run_name(m, s) in probe]
    if names:
      probe_accuracy[m] = float(np.mean([probe[n]["test_top1"] for n in names]))
      probe_unseen[m] = float(np.mean([probe[n].get("test_unseen_top1", np.nan)
                                       for n in names]))
  return {"seeds": seeds, "methods": methods, "eval_episodes": study.eval_episodes,
          "in_distribution_success": in_distribution,
          "in_distribution_per_seed": {m: per_env[m]["train"] for m in methods},
          "per_environment": per_env, "axis_means": axis_means, "method_axis_means": method_axes,
          "p_values": p_values, "probe_accuracy": probe_accuracy,
          "probe_unseen_accuracy": probe_unseen,
          "probe_per_run": {n: r["test_top1"] for n, r in probe.items()}}


def _fmt(values: Sequence[float]) -> str:
  values = list(values)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def report_markdown(summary: Mapping[str, Any]) -> str:
  """The report: Table 1 layout (mean ± sd over seeds), paired tests, the probe table."""
  from vla_jax.sim import catalogue as cat  # pylint: disable=g-import-not-at-top
  methods = summary["methods"]
  names = {"sft": "SFT", "align": "Align", "freeze": "Freeze"}
  header = ["axis", "environment"] + [names[m] for m in methods]
  lines = ["# Does alignment help? The study", "",
           f"Command: `{summary.get('command', '')}`  ",
           f"Wall clock: {summary.get('wall_clock_s', 0) / 60:.1f} min; seeds per method: "
           + ", ".join(f"{names[m]} {summary['seeds'][m]}" for m in methods)
           + f"; {summary['eval_episodes']} episodes per environment and run (shared seeds)."
           + (f" Fine-tuning not timed by the study (found finished): "
              f"{', '.join(summary['untimed_runs'])}." if summary.get("untimed_runs") else ""),
           "", "Success per environment, mean ± sd over fine-tuning seeds:", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  per_env = summary["per_environment"]
  order = sorted(per_env[methods[0]], key=lambda s: (
      (("train",) + AXES).index(cat.AXES.get(s, "train")), s != "train"))
  for split in order:
    lines.append(f"| {cat.AXES.get(split, 'train')} | {split} | " +
                 " | ".join(_fmt(per_env[m][split]) for m in methods) + " |")
  for axis in AXES:
    values = [[summary["axis_means"][f"{m}_seed{s}"].get(axis) for s in summary["seeds"][m]]
              for m in methods]
    if all(v is not None for vs in values for v in vs):
      lines.append(f"| **{axis}** | mean | " + " | ".join(f"**{_fmt(v)}**" for v in values)
                   + " |")
  lines += ["", "One-sided paired Wilcoxon signed-rank p-values (Align better), pairs = "
            "(fine-tuning seed, evaluation episode), an episode's value = its mean success "
            "over the axis' environments:", "",
            "| comparison | " + " | ".join(("train",) + AXES) + " |", "|---|" + "---|" * 5]
  for name, table in summary["p_values"].items():
    lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(
        f"{table[a]:.3g}" if a in table else "–" for a in ("train",) + AXES) + " |")
  probe, unseen = summary["probe_accuracy"], summary["probe_unseen_accuracy"]
  lines += ["", "Linear probe on mean-pooled visual-token features (object identity, held-out "
            "images; seed mean for fine-tuned runs):", "",
            "| features | top-1 | top-1, objects never in the robot data |", "|---|---|---|"]
  for name, value in probe.items():
    u = unseen.get(name)
    lines.append(f"| {names.get(name, name)} | {value:.3f} | "
                 f"{'–' if u is None else f'{u:.3f}'} |")
  lines += ["", "![axis means](axes.png) ![probe](probe.png) ![attention](attention.png)", ""]
  return "\n".join(lines)


def plot_axes(summary: Mapping[str, Any], path: str) -> str:
  """Axis means per method (bars: seed mean; dots: each seed)."""
  # A Figure without pyplot: no global backend switch (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  methods = summary["methods"]
  axes = ["train"] + [a for a in AXES if a in summary["method_axis_means"][methods[0]]]
  width = 0.8 / len(methods)
  fig = Figure(figsize=(7, 3))
  ax = fig.subplots()
  for i, m in enumerate(methods):
    x = np.arange(len(axes)) + (i - (len(methods) - 1) / 2) * width
    per_seed = [[summary["per_environment"][m]["train"][k] if a == "train" else
                 summary["axis_means"][f"{m}_seed{s}"][a]
                 for k, s in enumerate(summary["seeds"][m])] for a in axes]
    ax.bar(x, [np.mean(v) for v in per_seed], width, label=m)
    for xi, v in zip(x, per_seed):
      ax.plot([xi] * len(v), v, "k.", ms=3)
  ax.set_xticks(np.arange(len(axes)))
  ax.set_xticklabels(axes)
  ax.set_ylim(0, 1)
  ax.set_ylabel("success")
  ax.legend(fontsize=8)
  ax.set_title("closed-loop success (bars: seed mean, dots: seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def plot_probe(summary: Mapping[str, Any], path: str) -> str:
  # A Figure without pyplot: no global backend switch (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  probe = summary["probe_accuracy"]
  fig = Figure(figsize=(5, 2.8))
  ax = fig.subplots()
  ax.bar(range(len(probe)), list(probe.values()), color="tab:blue")
  ax.set_xticks(range(len(probe)))
  ax.set_xticklabels(list(probe))
  ax.set_ylim(0, 1)
  ax.set_ylabel("probe top-1")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


# ---------------------------------------------------------------------- the command
def run_study(config: Any, workdir: str, command: str = "") -> Dict[str, Any]:
  """Runs (or resumes) every stage of the study in `workdir`; returns summary.json's dict."""
  from vla_jax.eval import commands  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import sim_eval  # pylint: disable=g-import-not-at-top
  from vla_jax.train import loop  # pylint: disable=g-import-not-at-top
  if "study" not in config:
    raise ConfigError("--mode=study needs a config with a `study` section: "
                      "--config=configs/study.py (or configs/study.py:smoke).")
  study = from_mapping(StudyConfig, config.study.to_dict(), "study")
  os.makedirs(workdir, exist_ok=True)
  state = _State(workdir)
  state.data["invocations"].append({"command": command or " ".join(sys.argv),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
  state.save()
  base = copy.deepcopy(config)
  with base.unlocked():
    del base["study"]

  tick = time.perf_counter()
  logging.info("study 1/6: pretraining (cached after first use)")
  weights = pretrain_weights(base, study)
  state.add_seconds("pretrain", time.perf_counter() - tick)

  runs = {run_name(m, s): os.path.join(workdir, "runs", run_name(m, s))
          for s in study.seeds for m in study.methods}
  settings = _eval_settings(config, study)
  seeds = sim_eval.eval_seeds(study.eval_episodes)
  for index, (name, run_dir) in enumerate(runs.items()):
    method, seed = name.rsplit("_seed", 1)
    run_config = method_config(config, method, int(seed), weights)
    if not _run_finished(run_dir, int(run_config.train.num_steps)):
      logging.info("study 2/6: fine-tuning %s (%d of %d)", name, index + 1, len(runs))
      tick = time.perf_counter()
      loop.train(run_config, run_dir)
      state.add_seconds(f"finetune/{name}", time.perf_counter() - tick)
    if not _eval_finished(run_dir, study.eval_splits, seeds):
      logging.info("study 3/6: evaluating %s (%d of %d)", name, index + 1, len(runs))
      tick = time.perf_counter()
      commands.run_eval_sim(run_config, run_dir, settings)
      state.add_seconds(f"evaluate/{name}", time.perf_counter() - tick)

  logging.info("study 4/6: linear probes")
  tick = time.perf_counter()
  probe = probe_all(base, study, workdir, weights, runs)
  state.add_seconds("probe", time.perf_counter() - tick)

  logging.info("study 5/6: attention maps")
  tick = time.perf_counter()
  first = {run_name(m, study.seeds[0]): runs[run_name(m, study.seeds[0])] for m in study.methods}
  attention_grid(base, study, workdir, weights, first)
  state.add_seconds("attention", time.perf_counter() - tick)

  logging.info("study 6/6: report")
  evals = {name: sim_eval.load_results(os.path.join(run_dir, "eval_sim"))
           for name, run_dir in runs.items()}
  summary = summarize(study, evals, probe)
  summary = {"command": state.data["invocations"][-1]["command"],
             "wall_clock_s": float(sum(state.data["seconds"].values())),
             "stage_seconds": state.data["seconds"],
             "invocations": state.data["invocations"],
             # Runs found finished (trained by another command): not in wall_clock_s.
             "untimed_runs": [n for n in runs if f"finetune/{n}" not in state.data["seconds"]],
             **summary}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot_axes(summary, os.path.join(workdir, "axes.png"))
  plot_probe(summary, os.path.join(workdir, "probe.png"))
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report_markdown(summary))
  logging.info("study report: %s", os.path.join(workdir, "report.md"))
  return summary

