"""Command-line entry point: `python -m vla_jax.main --config=configs/align.py[:PRESET]`.

Modes (`--mode`):
  train     (default) train or resume the experiment in WORKDIR: the embedded default is
            the tiny student on the bundled tabletop dataset on CPU (a few minutes);
            checkpoints, TensorBoard logs, metrics.jsonl, loss_curves.png, summary.json.
  describe  build the student, teacher and alignment projector of the config,
            load any checkpoints it names, run one jitted aligned forward pass on a
            batch and report parameter counts, the visual-token bookkeeping, the
            alignment loss and timings; writes `WORKDIR/describe.json`.
  export    write WORKDIR's latest checkpoint as a standalone inference policy (LoRA merged,
            `--export_dtype`, normalisation statistics inside) to `--export_dir`
            (default WORKDIR/export); `vla_jax.train.checkpoint.load_policy_params` reads it.
  convert   turn the local checkpoints named in `config.weights` (HF safetensors or
            big_vision .npz) into Orbax checkpoints under `WORKDIR/converted/` that
            later runs load with `--config.weights.student_format=orbax`.
  eval_sim  roll WORKDIR's checkpoint out on every OOD split and the VL-Think suite
            (`--eval_seeds`, `--eval_splits`); writes WORKDIR/eval_sim/ (results.json,
            table.md, success.png, strips/). `--compare=SFT=DIR,FREEZE=DIR` adds a paired
            comparison (compare.md) with workdirs evaluated before.
  open_loop token accuracy and per-dimension L1 on the val split -> WORKDIR/eval_open_loop.json.
  probe     linear probes (student layers `--eval_layers`, teacher) -> WORKDIR/probe/.
  attention normalised attention overlays for "Do you see the {object}?" -> WORKDIR/attention/.
  tsne      t-SNE of the object token's embedding -> WORKDIR/tsne/.
  (The analysis modes are documented in vla_jax/eval/commands.py.)
  study     the study of vla_jax/study.py (with --config=configs/study.py[:smoke]): pretrain,
            fine-tune SFT / Align / Freeze x seeds, evaluate, probe, report in WORKDIR.
  serve     serve WORKDIR's checkpoint (or an export dir) on `--host`:`--port` to openpi
            websocket clients and OpenVLA REST clients (POST /act); see vla_jax/serve/server.py.
"""

import json
import logging
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from vla_jax import experiment as experiment_lib
from vla_jax import modeling
from vla_jax import text as text_lib
from vla_jax.errors import VlaJaxError
from vla_jax.run_config import parse_run_config
from vla_jax.train import checkpoint as train_checkpoint
from vla_jax.train import loop
from vla_jax.weights import convert as convert_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "align.py"),
    "Experiment config file, optionally with a preset: configs/align.py:openvla_7b.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where outputs are written.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "describe", "convert", "export",
                                           "eval_sim", "open_loop", "probe", "attention",
                                           "tsne", "serve", "study"], "What to do.")
_EVAL_SEEDS = flags.DEFINE_integer("eval_seeds", None, "eval_sim: episodes per split.")
_EVAL_SPLITS = flags.DEFINE_list("eval_splits", None, "eval_sim: split names (default: all "
                                 "OOD splits and VL-Think).")
_EVAL_LAYERS = flags.DEFINE_list("eval_layers", None, "probe/attention/tsne: LLM layers.")
_EVAL_STEP = flags.DEFINE_integer("eval_step", None, "Checkpoint step (default: latest).")
_COMPARE = flags.DEFINE_list("compare", [], "eval_sim: NAME=WORKDIR entries to compare with.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: output directory.")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", None, ["float32", "bfloat16", "float16"],
                                  "--mode=export: cast the exported params (default: as trained).")

_HOST = flags.DEFINE_string("host", "127.0.0.1", "--mode=serve: address to listen on "
                            "(0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "--mode=serve: port of both protocols.")
_SERVE_MAX_BATCH = flags.DEFINE_integer("serve_max_batch", 8, "--mode=serve: most requests "
                                        "per policy call.")
_SERVE_MAX_WAIT_MS = flags.DEFINE_float("serve_max_wait_ms", 5.0, "--mode=serve: how long a "
                                        "request waits for others to batch with.")
_SERVE_OBS_KEYS = flags.DEFINE_string("serve_obs_keys", "libero", "--mode=serve: openpi "
                                      "observation keys: libero, droid or "
                                      "image=KEY,state=KEY[+KEY],prompt=KEY.")
_SERVE_API_KEY = flags.DEFINE_string("serve_api_key", None, "--mode=serve: required "
                                     "'Authorization: Api-Key KEY' (default: "
                                     "$VLA_JAX_API_KEY; unset: no authentication).")
_SERVE_MAX_REQUEST_MB = flags.DEFINE_float("serve_max_request_mb", 16.0, "--mode=serve: "
                                           "largest request accepted.")
_SERVE_UNNORM_KEY = flags.DEFINE_string("serve_unnorm_key", "", "--mode=serve: default "
                                        "normalisation statistics (default: the run's first "
                                        "data source).")

_INSTRUCTION = "put the carrot on the plate"


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _demo_batch(config, experiment, batch_size: int):
  """Images in [0, 1] and an OpenVLA prompt (real tokenizer if configured)."""
  rng = np.random.default_rng(config.seed)
  size = experiment.model.image_size
  images = rng.uniform(size=(batch_size, size, size, 3)).astype(np.float32)
  if config.tokenizer and config.tokenizer != "bundled":
    tokenizer = text_lib.Tokenizer.from_path(config.tokenizer)
    loop.check_vocab(tokenizer, experiment)
    ids = tokenizer.encode(text_lib.openvla_prompt(_INSTRUCTION))
    source = f"tokenizer {config.tokenizer}"
  else:
    ids = [1] + list(rng.integers(3, experiment.model.llm.vocab_size - 64, size=15))
    source = "synthetic ids (set --config.tokenizer=PATH for a real prompt)"
  tokens = np.tile(np.asarray(ids, np.int32), (batch_size, 1))
  return images, tokens, source


def describe(config, workdir: str) -> dict:
  experiment = experiment_lib.parse_config(config)
  # The prompt first: a tokenizer the LLM cannot embed is refused before anything compiles.
  images, tokens, token_source = _demo_batch(config, experiment, config.batch_size)
  models = modeling.build_models(experiment)
  start = time.perf_counter()
  params = modeling.create_params(models, experiment, config.weights,
                                  jax.random.key(config.seed))
  init_s = time.perf_counter() - start

  forward = jax.jit(lambda p, i, t: modeling.aligned_forward(models, experiment, p, i, t))
  start = time.perf_counter()
  out, loss, metrics = jax.block_until_ready(forward(params, images, tokens))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(forward(params, images, tokens))
    times.append(time.perf_counter() - start)

  model = experiment.model
  summary = {
      "preset": config.preset,
      "arch": model.arch,
      "devices": [str(d) for d in jax.devices()],
      "params_millions": {k: _count(v) / 1e6 for k, v in params["student"].items()},
      "teacher_params_millions": _count(params["teacher"]) / 1e6,
      "projector_params_millions": _count(params["projector"]) / 1e6,
      "image_size": model.image_size,
      "visual_tokens": {"start": model.visual_start, "count": model.num_visual_tokens,
                        "grid": model.grid},
      "sequence_length": int(out["logits"].shape[1]),
      "tokens_from": token_source,
      "align_layer": experiment.align.align_layer,
      "align_layers": list(experiment.align.layers),
      # [B, N, D]; with several aligned layers, one such shape per layer.
      "align_hidden_shape": (list(out["align_hidden"].shape)
                             if not experiment.align.multi_layer
                             else [list(h.shape) for h in out["align_hidden"]]),
      "metrics": {k: float(v) for k, v in metrics.items()},
      "init_and_load_s": round(init_s, 3),
      "compile_s": round(compile_s, 3),
      "forward_median_s": round(statistics.median(times), 5),
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "describe.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def convert(config, workdir: str) -> list:
  experiment = experiment_lib.parse_config(config)
  weights = config.weights
  if not weights.student and not weights.teacher:
    raise VlaJaxError("Nothing to convert: set --config.weights.student=PATH and/or "
                      "--config.weights.teacher=PATH (with *_format=hf|big_vision).")
  for part in ("student", "teacher"):
    if weights[part] and weights[f"{part}_format"] == "orbax":
      raise VlaJaxError(f"config.weights.{part} is already an Orbax checkpoint.")
  models = modeling.build_models(experiment)
  params = modeling.read_checkpoints(models, experiment, weights)
  written = []
  for part, part_config in (("student", experiment.model), ("teacher", experiment.teacher)):
    if weights[part]:
      out = os.path.join(workdir, "converted", part)
      written.append(convert_lib.save_converted(
          out, params[part], part_config, source=weights[part], fmt=weights[f"{part}_format"]))
      logging.info("Wrote %s", out)
  return written


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    if _MODE.value in ("study", "describe", "convert"):  # train parses it first itself
      parse_run_config(config)  # every section checked before anything is built
    if _MODE.value == "train":
      summary = loop.train(config, workdir)
      print(json.dumps(summary, indent=2))
    elif _MODE.value == "export":
      out = _EXPORT_DIR.value or os.path.join(workdir, "export")
      print("exported policy:", train_checkpoint.export_latest(
          os.path.join(workdir, "checkpoints"), out, dtype=_EXPORT_DTYPE.value))
    elif _MODE.value == "serve":
      try:
        from vla_jax.serve import inputs, server  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise SystemExit(f"error: --mode=serve needs the serve extra ({e}): "
                         "pip install -e '.[serve]'") from None
      server.serve(workdir, server.ServeConfig(
          host=_HOST.value, port=_PORT.value, max_batch=_SERVE_MAX_BATCH.value,
          max_wait_ms=_SERVE_MAX_WAIT_MS.value,
          obs_keys=inputs.observation_keys(_SERVE_OBS_KEYS.value),
          api_key=_SERVE_API_KEY.value if _SERVE_API_KEY.value is not None else
          os.environ.get("VLA_JAX_API_KEY", ""),
          max_request_bytes=int(_SERVE_MAX_REQUEST_MB.value * 2**20),
          unnorm_key=_SERVE_UNNORM_KEY.value), step=_EVAL_STEP.value)
    elif _MODE.value == "study":
      from vla_jax import study  # pylint: disable=g-import-not-at-top
      summary = study.run_study(config, workdir, " ".join(["python -m vla_jax.main"] +
                                                          sys.argv[1:]))
      print(json.dumps({k: summary[k] for k in ("wall_clock_s", "in_distribution_success",
                                                "method_axis_means", "p_values",
                                                "probe_accuracy")}, indent=2))
    elif _MODE.value == "describe":
      summary = describe(config, workdir)
      print(json.dumps(summary, indent=2))
    elif _MODE.value in ("eval_sim", "open_loop", "probe", "attention", "tsne"):
      from vla_jax.eval import commands  # pylint: disable=g-import-not-at-top
      from vla_jax.eval import config as eval_config_lib  # pylint: disable=g-import-not-at-top
      settings = eval_config_lib.eval_config(config, {
          "seeds": _EVAL_SEEDS.value, "splits": _EVAL_SPLITS.value, "step": _EVAL_STEP.value,
          "layers": [int(x) for x in _EVAL_LAYERS.value] if _EVAL_LAYERS.value else None})
      if _MODE.value == "eval_sim":
        summary = commands.run_eval_sim(config, workdir, settings, _COMPARE.value)
      else:
        summary = getattr(commands, f"run_{_MODE.value}")(config, workdir, settings)
      print(json.dumps(summary, indent=2, default=str))
    else:
      for path in convert(config, workdir):
        print(f"converted checkpoint: {path}")
  except VlaJaxError as e:  # bad input: a clear message, not a traceback
    raise SystemExit(f"error: {e}") from None


def _override_error(error: Exception) -> str:
  """One line for an exception ml_collections raised while applying --config.KEY=VALUE."""
  text = str(error.args[0]) if error.args else str(error)
  if isinstance(error, (KeyError, AttributeError)):
    key, _, hint = text.partition("\n")
    name = key.strip().strip("\"'")
    return f"unknown config key '{name}'" + (f" ({hint.strip()})" if hint else "")
  return " ".join(text.split())


def parse_flags(argv):
  """absl's flag parsing, with a bad --config.KEY=VALUE override as one error line.

  ml_collections applies the overrides while the flags are parsed and raises a bare
  KeyError / AttributeError / TypeError from deep inside; the user gets which key or
  value is wrong and how to list the valid ones instead of a 60-line traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own (unknown flag, bad value): as app.run reports them
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
             "on flags.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: a config override could not be applied: {_override_error(e)}. "
             f"Overrides given: {', '.join(overrides) or 'none'}. Valid keys are those "
             "of the config file (e.g. configs/align.py); nested ones are written "
             "--config.train.num_steps=N.")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
