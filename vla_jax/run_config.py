"""One typed run config: every section of a `configs/*.py` config, parsed in one place.

`parse_run_config(config)` turns the ml_collections config that `python -m vla_jax.main`
receives into a `RunConfig`: the typed experiment (model, teacher, align, lora), train,
sharding, weights, eval, schedule (logging, evaluation and checkpoint intervals and
retention), tokenizer and seed. It runs before anything is built or compiled, and every
error names the path the user typed (`weights.student_format`, `eval.seeds`,
`checkpoint_every`, `data.shuffle_buffer`). The data section is typed without building the
bundled dataset or tokenizer it may name (`train.loop.resolve_data(build=False)`); the
train loop resolves it. `RunConfig.record(data)` is what a run writes to
`run_config.json` and into each checkpoint's assets.
"""

import dataclasses
import os
from typing import Any, Dict, Optional

from vla_jax.errors import ConfigError
from vla_jax.eval.config import EvalConfig, eval_config
from vla_jax.experiment import Experiment, parse_config
from vla_jax.modeling import BUNDLED, check_bundled_teacher
from vla_jax.train import checkpoint
from vla_jax.typed_config import from_mapping, require

# Formats any student / teacher reads besides the loaders its layout / family registers.
STUDENT_EXTRA_FORMATS = ("orbax", "export", BUNDLED)
TEACHER_EXTRA_FORMATS = ("orbax",)
CHECKPOINT_PARAMS = ("auto", "always", "never")
# Top-level keys that are not sections of a run: read by particular modes only.
OTHER_KEYS = ("preset", "batch_size", "distributed", "data", "study")


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
  """Checkpoints to start from ("" = random init; "bundled" = the CPU-sized pretraining).

  Attributes:
    student, student_format: the student's checkpoint and its format (the loaders its
      layout registers, e.g. "hf", or "orbax" / "export" / "bundled").
    student_vision: pretrained towers + projector laid over the student (.npz).
    teacher, teacher_format: the teacher's checkpoint and format (its family's loaders,
      e.g. "big_vision", "hf", or "orbax").
  """
  student: str = ""
  student_format: str = "hf"
  student_vision: str = ""
  teacher: str = ""
  teacher_format: str = "big_vision"

  def check(self, experiment: Experiment, tokenizer: str) -> None:
    """ConfigError naming the key for a format the model cannot read or a missing file."""
    if self.teacher == BUNDLED:
      check_bundled_teacher(self.teacher_format, experiment)
    student_formats = (*experiment.model.layout.loaders, *STUDENT_EXTRA_FORMATS)
    require(self.student_format in student_formats,
            f"weights.student_format={self.student_format!r}: a {experiment.model.arch} "
            f"student reads {', '.join(student_formats)}.")
    teacher_formats = (*experiment.teacher.family.loaders, *TEACHER_EXTRA_FORMATS)
    require(self.teacher_format in teacher_formats,
            f"weights.teacher_format={self.teacher_format!r}: a {experiment.teacher.kind} "
            f"teacher reads {', '.join(teacher_formats)}.")
    if self.student == BUNDLED and tokenizer != BUNDLED:
      raise ConfigError("weights.student='bundled' was pretrained with the bundled tokenizer "
                        f"(its ids mean those words), but tokenizer={tokenizer!r}. Set "
                        "tokenizer='bundled', or train another student.")
    for key in ("student", "student_vision", "teacher"):
      path = getattr(self, key)
      if path in ("", BUNDLED) or "://" in path:
        continue
      # big_vision files may name a subtree: `params.npz:img`.
      local = path if os.path.exists(path) else path.rsplit(":", 1)[0]
      require(os.path.exists(os.path.expanduser(local)),
              f"weights.{key}={path!r} does not exist; point it at a local checkpoint, "
              "'bundled' (CPU presets) or '' for a random init.")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """When the train loop logs, evaluates and saves, and which checkpoints it keeps.

  Attributes:
    log_every: log every N steps (>= 1).
    eval_every: validation every N steps (0 = off); eval_batches batches each (>= 1).
    checkpoint_every: save every N steps (>= 1; the last step is always saved).
    keep_checkpoints: newest checkpoints kept (0 = every one).
    keep_period: also keep every K-th step (0 = no).
    checkpoint_params: merged inference params in each checkpoint: "auto" (all runs but
      LoRA runs), "always", "never".
  """
  log_every: int = 100
  eval_every: int = 2_000
  eval_batches: int = 4
  checkpoint_every: int = 2_000
  keep_checkpoints: Optional[int] = 3
  keep_period: Optional[int] = 0
  checkpoint_params: str = "auto"

  def __post_init__(self):
    checkpoint.check_retention(self.keep_checkpoints, self.keep_period)
    for key, low, meaning in (
        ("log_every", 1, "log every N steps"),
        ("checkpoint_every", 1, "save every N steps; the last step is always saved"),
        ("eval_every", 0, "0 turns periodic evaluation off"),
        ("eval_batches", 1, "validation batches per evaluation")):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"config.{key}={value!r}: must be an integer >= {low} ({meaning}).")
    require(self.checkpoint_params in CHECKPOINT_PARAMS,
            f"config.checkpoint_params={self.checkpoint_params!r}: choose one of "
            f"{', '.join(CHECKPOINT_PARAMS)} (auto: every run but LoRA runs saves the merged "
            "inference params with each checkpoint).")

  def with_params(self, experiment: Experiment) -> bool:
    """Whether each checkpoint also holds the merged inference params."""
    return self.checkpoint_params == "always" or (
        self.checkpoint_params == "auto" and experiment.lora is None)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every section of a run, typed and validated (`parse_run_config`).

  `experiment` is as configured; `train_experiment` has the train config's compute dtype
  and remat applied (what the train step builds).
  """
  experiment: Experiment
  train_experiment: Experiment
  train: Any  # state.TrainConfig
  sharding: Any  # sharding.ShardingConfig
  weights: WeightsConfig
  eval: EvalConfig
  schedule: ScheduleConfig
  tokenizer: str
  seed: int
  preset: str
  data: Any  # data.pipeline.DataConfig, bundled dataset / tokenizer not yet built ("")

  def record(self, data: Optional[Any] = None) -> Dict[str, Any]:
    """JSON-ready: every section as parsed (and the data config as resolved, if given)."""
    data = self.data if data is None else data
    return checkpoint.jsonable({
        **checkpoint.experiment_to_config(self.train_experiment),
        "train": dataclasses.asdict(self.train),
        "sharding": dataclasses.asdict(self.sharding),
        "data": None if data is None else dataclasses.asdict(data),
        "weights": dataclasses.asdict(self.weights),
        "eval": dataclasses.asdict(self.eval),
        **dataclasses.asdict(self.schedule),
        "tokenizer": self.tokenizer, "seed": self.seed, "preset": self.preset})


def _section(config: Any, key: str) -> Dict[str, Any]:
  value = config.get(key, None)
  return dict(value.to_dict() if hasattr(value, "to_dict") else (value or {}))


def parse_run_config(config: Any) -> RunConfig:
  """The whole config, typed and checked; ConfigError naming the key on bad input."""
  from vla_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  sections = ("model", "teacher", "align", "lora", "train", "sharding", "weights", "eval",
              "tokenizer", "seed", *(f.name for f in dataclasses.fields(ScheduleConfig)))
  unknown = sorted(k for k in config.keys() if k not in sections + OTHER_KEYS)
  require(not unknown, f"Unknown top-level config key(s) {unknown}; valid: "
          f"{', '.join(sorted(sections + OTHER_KEYS))}.")
  experiment = parse_config(config)
  train = from_mapping(state_lib.TrainConfig, config.get("train", None), "train")
  sharding = from_mapping(sharding_lib.ShardingConfig, config.get("sharding", None),
                          "sharding")
  schedule = from_mapping(ScheduleConfig, {f.name: config[f.name]
                                           for f in dataclasses.fields(ScheduleConfig)
                                           if f.name in config}, "")
  tokenizer = config.get("tokenizer", "") or ""
  weights = from_mapping(WeightsConfig, _section(config, "weights"), "weights")
  weights.check(experiment, tokenizer)
  seed = config.get("seed", 0)
  require(isinstance(seed, int) and not isinstance(seed, bool),
          f"seed={seed!r}: must be an integer.")
  train_experiment = state_lib.apply_train_overrides(experiment, train)
  state_lib.check_compatible(train_experiment, train)
  data = None
  if "data" in config:
    from vla_jax.train import loop  # pylint: disable=g-import-not-at-top
    data = loop.resolve_data(config, train_experiment, train, build=False)
  return RunConfig(experiment=experiment, train_experiment=train_experiment, train=train,
                   sharding=sharding, weights=weights, eval=eval_config(config),
                   schedule=schedule, tokenizer=tokenizer, seed=seed,
                   preset=config.get("preset", "") or "", data=data)
