"""What training carries from step to step, and which student parameters it may change.

`TrainConfig` holds the optimisation hyper-parameters (validated before anything
compiles). The trainable set is a boolean mask over the student's parameter tree
(`trainable_mask`): everything ("full"), nothing but LoRA factors ("lora"), or
everything except the vision towers ("freeze_vision", the paper's Freeze baseline),
optionally also freezing the student's vision->LLM projector. `split_params` cuts the
student tree by that mask into the part the optimizer sees and the frozen rest;
`merge_params` glues them back for the forward pass.

`TrainState` holds only what is optimised: the step, the trainable student parameters,
the LoRA factors (empty when LoRA is off), the optimizer state and an rng. The frozen
student parameters, the teacher and the alignment projector travel beside it as
`frozen_params = {"student", "teacher", "projector"}`: never optimised and never
saved with the train state.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from vla_jax.experiment import Experiment
from vla_jax.models import lora as lora_lib
from vla_jax.typed_config import require

TRAINABLE = ("full", "lora", "freeze_vision")
SCHEDULES = ("constant", "warmup_cosine")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
# Student parameter subtrees that are the vision towers (OpenVLA: both; PaliGemma: siglip).
VISION_TOWERS = ("siglip", "dino")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation hyper-parameters (defaults: the paper's recipe, AdamW at constant 5e-4).

  Attributes:
    learning_rate: peak learning rate.
    schedule: "constant" (after `warmup_steps` of linear warmup, if any) or
      "warmup_cosine" (linear warmup, cosine decay to `end_lr_factor * learning_rate`
      at `num_steps`).
    warmup_steps: linear warmup length (0 = none).
    end_lr_factor: final learning rate of the cosine schedule, as a fraction of the peak.
    weight_decay: AdamW decoupled weight decay (applied to every trainable leaf).
    adam_b1, adam_b2, adam_eps: AdamW moments.
    grad_clip_norm: clip the global gradient norm to this (0 = no clipping).
    grad_accum_steps: split each batch into this many micro-batches, one forward and
      backward each, and apply one update with their summed gradients.
    trainable: "full", "lora" (needs the experiment's LoRA config) or "freeze_vision".
    freeze_projector: also freeze the student's vision->LLM projector.
    remat_policy: "none" keeps the model configs' own remat setting; any other value
      turns on rematerialisation of the LLM blocks with that `jax.checkpoint` policy.
    compute_dtype: activation dtype of the student and teacher; parameters stay float32.
    batch_size: global batch size (all devices, all micro-batches).
    num_steps: total optimizer steps.
    seed: seeds parameter init, LoRA init and the train rng.
    max_nonfinite_steps: a step with a NaN/inf loss or gradient norm is skipped (no
      update); this many in a row stop the run with an error (the run has diverged).
    ema_decay: keep an exponential moving average of the trainable weights (and LoRA
      factors), ema <- d * ema + (1 - d) * weights after every applied update, started
      from the initial weights; 0 = off. When on, validation, checkpoints' inference
      params, evaluation and export use the average (openpi fine-tunes with 0.99).
  """
  learning_rate: float = 5e-4
  schedule: str = "constant"
  warmup_steps: int = 0
  end_lr_factor: float = 0.0
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_clip_norm: float = 1.0
  grad_accum_steps: int = 1
  trainable: str = "lora"
  freeze_projector: bool = False
  remat_policy: str = "none"
  compute_dtype: str = "float32"
  batch_size: int = 8
  num_steps: int = 60_000
  seed: int = 0
  max_nonfinite_steps: int = 10
  ema_decay: float = 0.0

  def __post_init__(self):
    require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate!r}.")
    require(self.schedule in SCHEDULES,
            f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
    for key in ("batch_size", "num_steps", "grad_accum_steps", "max_nonfinite_steps"):
      value = getattr(self, key)
      require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
              f"train.{key} must be a positive integer, got {value!r}.")
    require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.num_steps,
            f"train.warmup_steps must be an int in [0, train.num_steps={self.num_steps}], got "
            f"{self.warmup_steps!r}.")
    require(0.0 <= self.end_lr_factor <= 1.0,
            f"train.end_lr_factor must be in [0, 1], got {self.end_lr_factor!r}.")
    require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay!r}.")
    require(isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0,
            f"train.ema_decay must be in [0, 1) (0 = no moving average; openpi uses 0.99), "
            f"got {self.ema_decay!r}.")
    require(self.grad_clip_norm >= 0,
            f"train.grad_clip_norm must be >= 0 (0 disables clipping), got {self.grad_clip_norm!r}.")
    require(self.batch_size % self.grad_accum_steps == 0,
            f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum_steps "
            f"({self.grad_accum_steps}): every micro-batch has batch_size / grad_accum_steps "
            "examples.")
    require(self.trainable in TRAINABLE,
            f"train.trainable must be one of {TRAINABLE}, got {self.trainable!r}.")
    require(self.remat_policy in REMAT_POLICIES,
            f"train.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}.")
    require(self.compute_dtype in COMPUTE_DTYPES,
            f"train.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}.")

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum_steps


def check_compatible(experiment: Experiment, train_config: TrainConfig) -> None:
  """Cross-checks the train config against the experiment; ConfigError names the keys."""
  lora_on = experiment.lora is not None
  require(lora_on == (train_config.trainable == "lora"),
          f"train.trainable={train_config.trainable!r} but lora.enabled={lora_on}; use "
          "train.trainable='lora' exactly when lora.enabled=True.")
  require(not experiment.align.projector_trainable,
          "align.projector_trainable=True is not supported: the alignment projector is frozen "
          "and lives outside the train state (the paper found a trainable one worse). Set it "
          "to False.")


def apply_train_overrides(experiment: Experiment, train_config: TrainConfig) -> Experiment:
  """The experiment with the train config's compute dtype and remat policy applied.

  Call before `build_models`: dtype and remat are static model attributes. Parameters
  are still created in float32 (the master weights); only activations change dtype.
  """
  dtype = train_config.compute_dtype
  model = experiment.model
  llm = dataclasses.replace(model.llm, dtype=dtype)
  if train_config.remat_policy != "none":
    llm = dataclasses.replace(llm, remat=True, remat_policy=train_config.remat_policy)
  model = dataclasses.replace(
      model, llm=llm, siglip=dataclasses.replace(model.siglip, dtype=dtype),
      dino=None if model.dino is None else dataclasses.replace(model.dino, dtype=dtype))
  teacher = experiment.teacher
  teacher = dataclasses.replace(teacher, tower=dataclasses.replace(teacher.tower, dtype=dtype))
  return dataclasses.replace(experiment, model=model, teacher=teacher)


# ---------------------------------------------------------------------------------------
# The trainable set: a mask over the student's tree.
# ---------------------------------------------------------------------------------------
def trainable_mask(student_params: Any, train_config: TrainConfig) -> Any:
  """Bool tree like `student_params`: True at the leaves the optimizer updates.

  "lora" marks nothing (only the separate LoRA factors train); "freeze_vision" marks
  all but the vision towers; `freeze_projector` additionally unmarks `projector/`.
  """
  frozen_roots = set()
  if train_config.trainable == "freeze_vision":
    frozen_roots.update(VISION_TOWERS)
  if train_config.freeze_projector:
    frozen_roots.add("projector")

  def is_trainable(path, _):
    if train_config.trainable == "lora":
      return False
    root = lora_lib.path_str(path[:1])
    return root not in frozen_roots

  return jax.tree_util.tree_map_with_path(is_trainable, student_params)


def split_params(params: Dict[str, Any], mask: Dict[str, Any]) -> Tuple[Dict, Dict]:
  """Cuts a nested dict by a bool tree into (trainable, frozen), both pruned.

  Subtrees left without leaves are dropped, so a frozen tower adds no optimizer state.
  """
  trainable, frozen = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      sub_t, sub_f = split_params(value, mask[key])
      if sub_t:
        trainable[key] = sub_t
      if sub_f:
        frozen[key] = sub_f
    elif mask[key]:
      trainable[key] = value
    else:
      frozen[key] = value
  return trainable, frozen


def merge_params(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
  """Inverse of `split_params`: the union of two disjoint nested dicts."""
  out = dict(a)
  for key, value in b.items():
    if key in out:
      out[key] = merge_params(out[key], value)
    else:
      out[key] = value
  return out


# ---------------------------------------------------------------------------------------
# Optimizer and state.
# ---------------------------------------------------------------------------------------
def learning_rate_schedule(train_config: TrainConfig) -> optax.Schedule:
  """step -> learning rate, as configured."""
  c = train_config
  if c.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
        decay_steps=c.num_steps, end_value=c.end_lr_factor * c.learning_rate)
  if c.warmup_steps == 0:
    return optax.constant_schedule(c.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps),
       optax.constant_schedule(c.learning_rate)], [c.warmup_steps])


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the schedule (gradient accumulation is in the step)."""
  c = train_config
  parts = []
  if c.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(c), b1=c.adam_b1, b2=c.adam_b2,
                           eps=c.adam_eps, weight_decay=c.weight_decay))
  return optax.chain(*parts)


def apply_optimizer(train_config: TrainConfig, grads: Any, opt_state: Any, params: Any,
                    finite: jax.Array) -> Tuple[Any, Any]:
  """`make_optimizer`'s update + `optax.apply_updates`, skipped unless `finite`.

  Returns (new params, new opt_state): with `finite` true, what
  `optimizer.update(grads, opt_state, params)` and `optax.apply_updates` give (the same
  operations in the same order, tested against them); with `finite` false, `params`
  and `opt_state` unchanged, so one NaN/inf gradient cannot poison the weights or the
  Adam moments. `opt_state` is `make_optimizer(train_config).init(params)`'s tree.

  Why not optax's update followed by `where(finite, new, old)` on every leaf: there the
  new params are computed from the un-selected moments, so XLA reads each old moment
  in two places (the params' fusion and the moment's own select, which overwrites the
  donated buffer in place) and must copy every moment first: 221 copies in the 64 px
  full-fine-tuning step on CPU (4 ms of its wall time), 3.1 GiB of temporaries per
  device for full fine-tuning of `openvla_7b` on 8-way FSDP. Here the params are computed
  from the selected moments, which only their own fusion reads.
  """
  c = train_config
  expected = jax.tree.structure(jax.eval_shape(make_optimizer(c).init, params))
  if jax.tree.structure(opt_state) != expected:
    raise ValueError(f"apply_optimizer: opt_state is not make_optimizer's state for these "
                     f"params (got {jax.tree.structure(opt_state)}, want {expected}).")
  clip_state, (adam, decay_state, schedule_state) = (
      opt_state if c.grad_clip_norm > 0 else (None, opt_state[0]))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  if c.grad_clip_norm > 0:  # optax.clip_by_global_norm
    g_norm = optax.tree.norm(grads)
    trigger = jnp.squeeze(g_norm < c.grad_clip_norm)
    grads = jax.tree.map(lambda t: jax.lax.select(
        trigger, t, (t / g_norm.astype(t.dtype)) * c.grad_clip_norm), grads)
  # optax.scale_by_adam; the moments are selected before anything else reads them.
  count = optax.safe_increment(adam.count)
  mu = keep(optax.tree.update_moment(grads, adam.mu, c.adam_b1, 1), adam.mu)
  nu = keep(optax.tree.update_moment_per_elem_norm(grads, adam.nu, c.adam_b2, 2), adam.nu)
  updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + c.adam_eps),
                         optax.tree.bias_correction(mu, c.adam_b1, count),
                         optax.tree.bias_correction(nu, c.adam_b2, count))
  if c.weight_decay:  # optax.add_decayed_weights
    updates = jax.tree.map(lambda u, p: u + c.weight_decay * p, updates, params)
  # optax.scale_by_learning_rate(schedule)
  step_size = -learning_rate_schedule(c)(schedule_state.count)
  updates = jax.tree.map(lambda u: jnp.array(step_size, dtype=u.dtype) * u, updates)
  new_params = keep(optax.apply_updates(params, updates), params)
  adam = adam._replace(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu)
  schedule_state = schedule_state._replace(count=jnp.where(
      finite, optax.safe_increment(schedule_state.count), schedule_state.count))
  inner = (adam, decay_state, schedule_state)
  return new_params, ((clip_state, inner) if c.grad_clip_norm > 0 else (inner,))


@flax.struct.dataclass
class TrainState:
  """Everything a step updates.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the trainable part of the student's tree (`split_params`; {} under LoRA).
    lora: LoRA factors {kernel path: {"a", "b"}} ({} when LoRA is off).
    opt_state: optimizer state over `{"params": params, "lora": lora}`.
    rng: key for stochastic parts of the step (LoRA dropout), folded with `step`.
    ema: moving average of `trainable` ({"params", "lora"}; {} when train.ema_decay=0).
  """
  step: jax.Array
  params: Dict[str, Any]
  lora: Dict[str, Any]
  opt_state: Any
  rng: jax.Array
  ema: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def trainable(self) -> Dict[str, Any]:
    """The tree the optimizer sees."""
    return {"params": self.params, "lora": self.lora}

  @property
  def inference_trainable(self) -> Dict[str, Any]:
    """What validation, checkpoints' inference params and export use: the moving
    average when the run keeps one, else the weights themselves."""
    return self.ema or self.trainable


def create_train_state(experiment: Experiment, train_config: TrainConfig,
                       params: Dict[str, Any], rng: jax.Array) -> Tuple[TrainState, Dict]:
  """Splits initial parameters into the train state and the frozen parameters.

  Args:
    params: {"student", "teacher", "projector"} (e.g. `modeling.init_params`).
    rng: key for the LoRA init and the train rng.
  Returns:
    (state, frozen_params) with frozen_params = {"student" (the frozen part of the
    student), "teacher", "projector"}; jittable (wrap it in `jax.jit` with out_shardings).
  """
  check_compatible(experiment, train_config)
  lora_key, state_key = jax.random.split(rng)
  trainable, frozen = split_params(params["student"],
                                   trainable_mask(params["student"], train_config))
  lora = {}
  if experiment.lora is not None:
    lora = lora_lib.init_lora(lora_key, params["student"], experiment.lora)
  opt_state = make_optimizer(train_config).init({"params": trainable, "lora": lora})
  # The average starts at the initial weights (a copy: the step donates the state).
  ema = (jax.tree.map(jnp.copy, {"params": trainable, "lora": lora})
         if train_config.ema_decay > 0 else {})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, lora=lora,
                     opt_state=opt_state, rng=state_key, ema=ema)
  frozen_params = {"student": frozen, "teacher": params["teacher"],
                   "projector": params["projector"]}
  return state, frozen_params


def student_params(state: TrainState, frozen_params: Dict[str, Any],
                   lora_config: Optional[lora_lib.LoraConfig]) -> Dict[str, Any]:
  """The student's full tree with LoRA merged: what inference and export use (with the
  moving average of the weights in place of the weights when the run keeps one)."""
  trainable = state.inference_trainable
  full = merge_params(trainable["params"], frozen_params["student"])
  if lora_config is not None and trainable["lora"]:
    full = lora_lib.merge(full, trainable["lora"], lora_config)
  return full
