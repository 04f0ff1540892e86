"""The evaluation commands behind `python -m vla_jax.main --mode=...` (I/O lives here).

  eval_sim   closed-loop success of WORKDIR's checkpoint -> WORKDIR/eval_sim/
             (results.json, table.md, success.png, strips/<split>.png); with
             --compare=NAME=DIR,NAME=DIR,... (DIR a workdir or its eval_sim folder, already
             evaluated) also WORKDIR/eval_sim/compare.md and compare.json.
  open_loop  action-token accuracy and per-dimension L1 of de-normalised actions on the
             RLDS "val" split of the run's data sources -> WORKDIR/eval_open_loop.json.
  probe      linear probes on student layers and the teacher -> WORKDIR/probe/
             (probe.json, probe.md, probe.png).
  attention  normalised attention overlays -> WORKDIR/attention/<object>_layer<i>.png
             and attention.png (a grid of all of them).
  tsne       object-token t-SNE -> WORKDIR/tsne/tsne_layer<i>.png.
Settings come from `config.eval` when the config has it (see `vla_jax.eval.config`), overridden by
the `--eval_*` flags of main.py.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import numpy as np

from vla_jax import modeling
from vla_jax.errors import ConfigError
from vla_jax.eval import attention as attention_lib
from vla_jax.eval import policy as policy_lib
from vla_jax.eval import probe as probe_lib
from vla_jax.eval import sim_eval
from vla_jax.eval import tsne as tsne_lib
from vla_jax.models.vla import VLA
from vla_jax.sim import catalogue as cat
from vla_jax.text import Tokenizer
from vla_jax.eval.config import EvalConfig
from vla_jax.typed_config import from_mapping


def note_checkpoint_config(config: Any, model_config: Any, workdir: str) -> List[str]:
  """Warns (and returns how) when --config describes another experiment than the one the
  checkpoint was trained with: evaluation always uses the checkpoint's own, as trained."""
  from vla_jax.experiment import parse_config  # pylint: disable=g-import-not-at-top
  from vla_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    given = parse_config(config)
  except Exception:  # pylint: disable=broad-except  # a config we cannot compare: say nothing
    return []
  differences = ckpt_lib.config_differences({"model": dataclasses.asdict(model_config)},
                                            {"model": dataclasses.asdict(given.model)})
  if differences:
    logging.warning(
        "%s was trained with another model config than --config (%s, preset %r): %s. "
        "Evaluating with the checkpoint's own config, as it was trained.", workdir,
        "checkpoint -> --config", config.get("preset", ""), "; ".join(differences[:4]) +
        (f" (and {len(differences) - 4} more)" if len(differences) > 4 else ""))
  return differences


def _policy(config: Any, workdir: str, settings: EvalConfig) -> policy_lib.VLAPolicy:
  policy = policy_lib.load_policy(workdir, step=settings.step or None,
                                  execute_steps=settings.execute_steps or None)
  note_checkpoint_config(config, policy.model.config, workdir)
  return policy


def run_eval_sim(config: Any, workdir: str, settings: EvalConfig,
                 compare_with: Sequence[str] = ()) -> Dict[str, Any]:
  """Evaluates WORKDIR's checkpoint; writes WORKDIR/eval_sim/. Returns the report paths."""
  out_dir = os.path.join(workdir, "eval_sim")
  policy = _policy(config, workdir, settings)
  results = sim_eval.evaluate(policy, settings.splits,
                              sim_eval.eval_seeds(settings.seeds, settings.first_seed),
                              max_steps=settings.max_steps,
                              batch_size=settings.batch_size or None,
                              strip_episodes=settings.strip_episodes,
                              workers=settings.workers)
  paths = sim_eval.write_report(results, out_dir, title=os.path.basename(
      os.path.abspath(workdir)))
  summary = {"paths": paths, "axes": results["axes"],
             "episodes_per_s": results["episodes_per_s"]}
  if compare_with:
    summary["compare"] = run_compare(
        [f"{os.path.basename(os.path.abspath(workdir))}={out_dir}", *compare_with], out_dir)
  return summary


def run_compare(entries: Sequence[str], out_dir: str) -> Dict[str, str]:
  """Compares evaluated workdirs: entries "NAME=DIR" (or DIR); the first is the baseline."""
  results = {}
  for entry in entries:
    name, _, path = entry.rpartition("=")
    name = name or os.path.basename(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, "eval_sim")):
      path = os.path.join(path, "eval_sim")
    results[name] = sim_eval.load_results(path)
  comparison = sim_eval.compare(results)
  os.makedirs(out_dir, exist_ok=True)
  paths = {"table": os.path.join(out_dir, "compare.md"),
           "json": os.path.join(out_dir, "compare.json")}
  with open(paths["table"], "w") as f:
    f.write(sim_eval.comparison_table(comparison))
  with open(paths["json"], "w") as f:
    json.dump(comparison, f, indent=1)
  return paths


def _teacher(config: Any, experiment) -> Tuple[Any, Any]:
  """The frozen teacher, rebuilt as training built it (same seed, same checkpoint)."""
  models = modeling.build_models(experiment)
  params = modeling.create_params(models, experiment, config.weights,
                                  jax.random.key(config.train.seed), parts=("teacher",))
  return models.teacher, params["teacher"]


def run_probe(config: Any, workdir: str, settings: EvalConfig) -> Dict[str, Any]:
  """Linear probes on each `settings.layers` of the student and on the teacher."""
  params, experiment, _, _ = policy_lib.load_checkpoint(workdir, settings.step or None)
  note_checkpoint_config(config, experiment.model, workdir)
  model = VLA(experiment.model)
  images, labels, unseen = probe_lib.object_image_set(
      settings.probe_images_per_object, experiment.model.image_size, config.seed)
  images_in = np.stack([policy_lib.augment_lib.preprocess_for_serving(
      im, experiment.model.image_size) for im in images])
  protocol = probe_lib.ProbeConfig(epochs=settings.probe_epochs, seed=config.seed)
  results = {}
  for layer in settings.layers:
    features = probe_lib.student_features(model, params, images_in, layer)
    results[f"student_layer{layer}"] = probe_lib.probe_features(features, labels, protocol,
                                                                unseen)
    logging.info("probe layer %d: %s", layer, results[f"student_layer{layer}"])
  teacher, teacher_params = _teacher(config, experiment)
  features = probe_lib.teacher_features(teacher, teacher_params, images_in,
                                        experiment.model.grid, experiment.align.grid_match)
  results["teacher"] = probe_lib.probe_features(features, labels, protocol, unseen)
  out_dir = os.path.join(workdir, "probe")
  os.makedirs(out_dir, exist_ok=True)
  lines = ["| features | top-1 (held out) | top-1 unseen objects | chance |", "|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['test_top1']:.3f} | {r.get('test_unseen_top1', float('nan')):.3f}"
                 f" | {r['chance']:.3f} |")
  with open(os.path.join(out_dir, "probe.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "probe.json"), "w") as f:
    json.dump({"classes": [o.name for o in cat.OBJECTS], "images": int(len(labels)),
               "results": results}, f, indent=1)
  _bar(results, os.path.join(out_dir, "probe.png"))
  return {"out_dir": out_dir, "results": results}


def _bar(results: Mapping[str, Mapping[str, float]], path: str) -> None:
  # A Figure without pyplot: no global backend switch (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(1.1 * len(results) + 1.5, 2.8))
  ax = fig.subplots()
  ax.bar(range(len(results)), [r["test_top1"] for r in results.values()], color="tab:blue")
  ax.axhline(next(iter(results.values()))["chance"], color="k", ls="--", lw=1, label="chance")
  ax.set_xticks(range(len(results)))
  ax.set_xticklabels(list(results), rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("probe top-1")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _prompts(tokenizer: Tokenizer, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.vocab_size
  ids = [tokenizer.encode(t) for t in texts]
  tokens = np.full((len(ids), max(map(len, ids))), pad, np.int32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
  return tokens, np.asarray([len(r) for r in ids], np.int32)


def run_attention(config: Any, workdir: str, settings: EvalConfig) -> Dict[str, Any]:
  """Normalised attention maps of "Do you see the {object}?" for a few objects."""
  policy = _policy(config, workdir, settings)
  size = policy.model.config.image_size
  objects = settings.attention_objects
  images, _, _ = probe_lib.object_image_set(1, size, config.seed, objects)
  images = policy.preprocess(images)
  names = [cat.OBJECTS[o].name for o in objects]
  layers = [min(layer, policy.model.config.llm.depth - 1) for layer in settings.layers]
  question = _prompts(policy.tokenizer, [attention_lib.QUESTION.format(object=n) for n in names])
  generic = _prompts(policy.tokenizer, [attention_lib.GENERIC_PROMPT] * len(names))
  attend = attention_lib.jitted_visual_attention(policy.model, layers)
  maps = [np.asarray(attend(policy.params, images, t, lengths))
          for t, lengths in (question, generic)]
  normalized = attention_lib.normalized_attention(*maps)
  out_dir = os.path.join(workdir, "attention")
  os.makedirs(out_dir, exist_ok=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows, written = [], []
  for i, name in enumerate(names):
    tiles = [images[i]]
    for j, layer in enumerate(layers):
      tile = attention_lib.overlay(images[i], normalized[i, j])
      path = os.path.join(out_dir, f"{name.replace(' ', '_')}_layer{layer}.png")
      Image.fromarray(tile).save(path)
      written.append(path)
      tiles.append(tile)
    rows.append(np.concatenate(tiles, axis=1))
  grid = os.path.join(out_dir, "attention.png")
  Image.fromarray(np.concatenate(rows, axis=0)).resize(
      (size * (len(layers) + 1) * 2, size * len(names) * 2), Image.NEAREST).save(grid)
  with open(os.path.join(out_dir, "attention.json"), "w") as f:
    json.dump({"objects": names, "layers": layers, "question": attention_lib.QUESTION,
               "generic_prompt": attention_lib.GENERIC_PROMPT,
               "grid": "rows: objects; columns: image, then layers"}, f, indent=1)
  return {"out_dir": out_dir, "grid": grid, "maps": written}


def run_tsne(config: Any, workdir: str, settings: EvalConfig) -> Dict[str, Any]:
  """t-SNE of the object token's embedding at each `settings.layers`."""
  policy = _policy(config, workdir, settings)
  objects = settings.tsne_objects
  images, labels, _ = probe_lib.object_image_set(
      settings.tsne_images_per_object, policy.model.config.image_size, config.seed, objects)
  images = policy.preprocess(images)
  names = [cat.OBJECTS[o].name for o in objects]
  tokens, lengths, index = tsne_lib.object_prompt_tokens(
      policy.tokenizer, [names[label] for label in labels])
  out_dir = os.path.join(workdir, "tsne")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for layer in settings.layers:
    embeddings = tsne_lib.object_token_embeddings(policy.model, policy.params, images, tokens,
                                                  lengths, index, layer)
    path = os.path.join(out_dir, f"tsne_layer{layer}.png")
    tsne_lib.tsne_plot(embeddings, labels, names, path, f"object token, layer {layer}",
                       config.seed)
    paths.append(path)
  return {"out_dir": out_dir, "plots": paths}


def run_open_loop(config: Any, workdir: str, settings: EvalConfig) -> Dict[str, Any]:
  """Open-loop metrics of WORKDIR's checkpoint on the val split of the run's data."""
  from vla_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import open_loop  # pylint: disable=g-import-not-at-top
  from vla_jax.experiment import parse_config  # pylint: disable=g-import-not-at-top
  from vla_jax.train import loop  # pylint: disable=g-import-not-at-top
  from vla_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  policy = _policy(config, workdir, settings)
  train_config = from_mapping(state_lib.TrainConfig, config.train, "train")
  data_config = loop.resolve_data(config, parse_config(config), train_config)
  if policy.model.config.image_size != data_config.image_size:
    raise ConfigError("the config's model.image_size differs from the checkpoint's; pass the "
                      "config the run was trained with.")
  data_config = data_lib.DataConfig(**{**data_config.__dict__, "tokenizer": str(
      policy.tokenizer.path), "action_horizon": policy.action_horizon, "sources": tuple(
          dataclasses.replace(s, split="val") for s in data_config.sources)})
  iterator = data_lib.make_iterator(data_config, train=False)
  batches = []
  for _ in range(settings.open_loop_batches):
    try:
      batches.append(loop.to_train_batch(next(iterator)))
    except StopIteration:
      break
  metrics = open_loop.open_loop_metrics(policy.model, policy.params, batches,
                                        policy.action_tokenizer, policy.norm_stats,
                                        action_horizon=policy.action_horizon)
  path = os.path.join(workdir, "eval_open_loop.json")
  with open(path, "w") as f:
    json.dump(metrics, f, indent=1)
  return {"path": path, **metrics}
