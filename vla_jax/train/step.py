"""The fused train step and the open-loop eval step: action loss + alignment loss.

`make_train_step` returns one pure function
`train_step(state, frozen_params, batch) -> (state, metrics)`: the student forward
returns logits and the `align_layer` hidden states at the visual tokens (each of
`align_layers`' when several are aligned), the teacher runs on the same images under
`stop_gradient`, the frozen projector(s) map the student side, and
`loss/total = loss/action + align_coeff * loss/align` (`loss/align` summed over the
aligned layers). With
`align_coeff == 0` the teacher and the projector are not run at all, so plain SFT
costs nothing extra. Gradients flow only into the train state (the trainable mask and
the LoRA factors); a batch is split into `grad_accum_steps` micro-batches by a
`lax.scan` whose summed gradients equal the big batch's.

Batch contract (numpy or jax arrays, global batch B):
  images     uint8 [B, H, W, 3] (or float in [0, 1])
  tokens     int32 [B, T]   BOS-led prompt + action tokens + EOS, right padded
  input_mask bool  [B, T]   True at real tokens
  loss_mask  bool  [B, T]   True at supervised targets (action tokens and EOS)
  actions    float32 [B, A] normalised continuous actions (for `action/l1`)
Text position t sits at sequence position `text_to_sequence_positions(...)[t]` of the
student's logits (visual tokens are inserted), and is predicted from the position
before it.

The supervised suffix is causal for every student: `student_forward` (the only place the
steps run the student) passes `supervised_prefix_mask(batch)`, which makes the text
before the first supervised target the prefix. A prefix-LM student (PaliGemma) then
attends bidirectionally over image + prompt only, as big_vision and transformers train
it; without it the whole text, targets included, would be prefix, and the logits that
predict a target would see that target.
"""

from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vla_jax.actions import ActionTokenizer
from vla_jax.errors import InputError
from vla_jax.experiment import Experiment
from vla_jax.modeling import Models
from vla_jax.models import align as align_lib
from vla_jax.models import flat_dense
from vla_jax.models import lora as lora_lib
from vla_jax.models.vla import VLAConfig
from vla_jax.train.state import TrainConfig, TrainState, apply_optimizer, merge_params
from vla_jax.train.state import learning_rate_schedule

Batch = Dict[str, Any]
Metrics = Dict[str, jax.Array]
BATCH_KEYS = ("images", "tokens", "input_mask", "loss_mask", "actions")
# The alignment metrics a step reports (per-layer ones with a "/layer_k" suffix).
_ALIGN_METRICS = ("loss/align", "align/cos_sim")


def text_to_sequence_positions(config: VLAConfig, length: int) -> np.ndarray:
  """[T] int32: where text token t sits in the student's sequence.

  The N visual tokens are inserted at `visual_start` (OpenVLA: after BOS; PaliGemma:
  first), so t maps to t for t < visual_start and to t + N otherwise.
  """
  t = np.arange(length, dtype=np.int32)
  return np.where(t < config.visual_start, t, t + config.num_visual_tokens).astype(np.int32)


def target_logits(config: VLAConfig, logits: jax.Array) -> jax.Array:
  """Logits that predict each text token: [B, S, V] -> [B, T, V], T = S - N.

  Row t holds the logits at the sequence position just before text token t (row 0,
  which predicts nothing, repeats position 0; it must be outside the loss mask).
  """
  length = logits.shape[1] - config.num_visual_tokens
  previous = np.maximum(text_to_sequence_positions(config, length) - 1, 0)
  return jnp.take(logits, previous, axis=1)


def supervised_prefix_mask(input_mask: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """[B, T] bool: the real text tokens before each row's first supervised target.

  This is the prompt (BOS, instruction, separator) of a train batch; the targets and
  everything after the first of them form the causal suffix. Only prefix-LM students
  (PaliGemma) read it; causal students ignore it.
  """
  real = jnp.asarray(input_mask).astype(bool)
  supervised = jnp.asarray(loss_mask).astype(bool) & real
  return real & (jnp.cumsum(supervised, axis=1) == 0)


# In-layer LoRA of a forward pass: (the LoraConfig, `lora_lib.layer_factors`'s tree).
InLayerLora = Tuple[lora_lib.LoraConfig, Dict[str, Any]]


def student_forward(model: Any, params: Any, batch: Batch,
                    align_layer: Optional[Union[int, Tuple[int, ...]]] = None,
                    lora: Optional[InLayerLora] = None) -> Dict[str, jax.Array]:
  """The student's forward pass on a train batch, with the prompt as the only prefix.

  Args:
    model: the student `VLA` module.
    params: its parameter tree.
    batch: images, tokens, input_mask and loss_mask of the batch contract.
    align_layer: capture the LLM residual stream after this many blocks (a tuple: after
      each of them; `AlignConfig.capture`), or None.
    lora: in-layer LoRA factors to add inside the Dense layers (`student_weights`), or
      None (params are used as they are).
  Returns:
    `VLA.__call__`'s outputs (logits [B, T + N, V], align_hidden, ...).
  """
  prefix = supervised_prefix_mask(batch["input_mask"], batch["loss_mask"])
  args = (batch["images"], batch["tokens"], batch["input_mask"])
  kwargs = dict(prefix_mask=prefix, align_layer=align_layer)
  if lora is not None:
    return lora_lib.apply_in_layer(model, params, lora[1], lora[0], *args, **kwargs)
  with flat_dense.flat_dense_layers():  # the kernels are trained: see flat_dense
    return model.apply({"params": params}, *args, **kwargs)


def check_batch(batch: Batch, num_micro_batches: int = 1) -> None:
  """InputError unless `batch` follows the batch contract (shapes only; jit-safe)."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise InputError(f"batch is missing {missing}; a train batch needs {list(BATCH_KEYS)} "
                     f"(see vla_jax/train/step.py), got keys {sorted(batch)}.")
  size, length = np.shape(batch["tokens"])
  for key in ("input_mask", "loss_mask"):
    if tuple(np.shape(batch[key])) != (size, length):
      raise InputError(f"batch['{key}'] must be [B, T] = {(size, length)} like tokens, got "
                       f"{tuple(np.shape(batch[key]))}.")
  for key in ("images", "actions"):
    if np.shape(batch[key])[0] != size:
      raise InputError(f"batch['{key}'] has batch size {np.shape(batch[key])[0]} but tokens "
                       f"have {size}; every entry must share the leading batch axis.")
  if size % num_micro_batches:
    raise InputError(f"batch size {size} is not a multiple of train.grad_accum_steps="
                     f"{num_micro_batches}; use a batch of k * {num_micro_batches} examples.")


def _action_sums(config: VLAConfig, action_tokenizer: ActionTokenizer, logits: jax.Array,
                 batch: Batch) -> Dict[str, jax.Array]:
  """Sums (not means) of the action-token statistics of one (micro-)batch.

  Returns nll_sum, num_targets (loss-mask positions), correct and num_action_tokens
  (action-token positions), and l1_sum / l1_count over the decoded actions [B, A].
  """
  tokens = batch["tokens"]
  loss_mask = batch["loss_mask"].astype(bool) & batch["input_mask"].astype(bool)
  logits = target_logits(config, logits).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  is_action = loss_mask & action_tokenizer.is_action_token(tokens)
  # The k-th action token of a row is action dimension k: scatter decoded predictions
  # into [B, A] by that rank (prompts differ in length, so positions differ per row).
  dims = batch["actions"].shape[-1]
  rank = jnp.cumsum(is_action, axis=1) - 1
  slot = jax.nn.one_hot(jnp.where(is_action, rank, -1), dims, dtype=jnp.float32)  # [B, T, A]
  decoded = action_tokenizer.decode(predicted)  # [B, T]
  predicted_actions = jnp.einsum("bta,bt->ba", slot, decoded)
  filled = slot.sum(axis=1)  # [B, A]: 1 where the row has that action dimension
  error = jnp.abs(predicted_actions - batch["actions"].astype(jnp.float32)) * filled
  return {
      "nll_sum": jnp.sum(nll * loss_mask),
      "num_targets": jnp.sum(loss_mask).astype(jnp.float32),
      "correct": jnp.sum((predicted == tokens) & is_action).astype(jnp.float32),
      "num_action_tokens": jnp.sum(is_action).astype(jnp.float32),
      "l1_sum": jnp.sum(error),
      "l1_count": jnp.sum(filled),
  }


def _forward(models: Models, experiment: Experiment, action_tokenizer: ActionTokenizer,
             student: Tuple[Dict[str, Any], Optional[InLayerLora]],
             frozen_params: Dict[str, Any], batch: Batch, with_align: bool) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
  """One (micro-)batch: (action sums, alignment values {loss/align, align/cos_sim} and,
  with several aligned layers, their per-layer loss/align/layer_k, align/cos_sim/layer_k)."""
  align = experiment.align
  params, lora = student
  out = student_forward(models.student, params, batch,
                        align.capture if with_align else None, lora)
  sums = _action_sums(experiment.model, action_tokenizer, out["logits"], batch)
  if not with_align:
    return sums, {}
  teacher = models.teacher.apply({"params": frozen_params["teacher"]}, batch["images"],
                                 experiment.model.grid, align.grid_match)
  teacher = jax.lax.stop_gradient(teacher)
  projector = jax.lax.stop_gradient(frozen_params["projector"])
  loss, metrics = align_lib.alignment_from_hidden(align, models.projector, projector,
                                                  out["align_hidden"], teacher)
  return sums, {"loss/align": loss,
                **{k: v for k, v in metrics.items() if k.startswith(_ALIGN_METRICS)}}


def student_weights(experiment: Experiment, trainable: Dict[str, Any],
                    frozen_student: Dict[str, Any], rng: Optional[jax.Array],
                    deterministic: bool) -> Tuple[Dict[str, Any], Optional[InLayerLora]]:
  """(student params, in-layer LoRA or None) for `student_forward`.

  Trainable + frozen params; with LoRA on, the factors either go inside the layers
  (`lora.in_layer`, default: the frozen kernels get no gradient) or are added to the
  kernels they adapt (`apply_lora`).
  """
  full = merge_params(trainable["params"], frozen_student)
  config = experiment.lora
  if config is None or not trainable["lora"]:
    return full, None
  if config.in_layer:
    return full, (config, lora_lib.layer_factors(trainable["lora"], config, rng=rng,
                                                  deterministic=deterministic))
  return lora_lib.apply_lora(full, trainable["lora"], config, rng=rng,
                             deterministic=deterministic), None


def _split_micro_batches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B / num, ...]; micro-batch i holds rows i, i + num, ...

  Strided rows keep each device's shard of a batch-sharded array inside every
  micro-batch, so no data moves between devices.
  """
  def split(x):
    x = jnp.asarray(x)
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return {k: split(batch[k]) for k in BATCH_KEYS}


def _finish_metrics(sums: Dict[str, jax.Array], align_values: Dict[str, jax.Array],
                    align_coeff: float) -> Metrics:
  action_loss = sums["nll_sum"] / jnp.maximum(sums["num_targets"], 1.0)
  metrics = {
      "loss/action": action_loss,
      "action/token_accuracy": sums["correct"] / jnp.maximum(sums["num_action_tokens"], 1.0),
      "action/l1": sums["l1_sum"] / jnp.maximum(sums["l1_count"], 1.0),
      "loss/total": action_loss,
  }
  if align_values:
    metrics.update(align_values)
    metrics["loss/total"] = action_loss + align_coeff * align_values["loss/align"]
  return metrics


def make_train_step(models: Models, experiment: Experiment, train_config: TrainConfig,
                    action_tokenizer: Optional[ActionTokenizer] = None
                    ) -> Callable[[TrainState, Dict[str, Any], Batch], Tuple[TrainState, Metrics]]:
  """A pure `train_step(state, frozen_params, batch) -> (state, metrics)` to jit.

  Args:
    models, experiment: from `build_models(apply_train_overrides(experiment, ...))`.
    train_config: optimizer, schedule, clipping and `grad_accum_steps`.
    action_tokenizer: decodes predicted action tokens (default: OpenVLA's, Llama-2).
  Returns:
    train_step; metrics are float32 scalars named loss/total, loss/action, loss/align
    and align/cos_sim (only when align_coeff > 0; with several aligned layers also
    loss/align/layer_k and align/cos_sim/layer_k per layer k, loss/align being their
    sum and align/cos_sim their mean), action/token_accuracy, action/l1,
    grad_norm (before clipping), learning_rate (of this update) and nonfinite (1.0 when
    the loss or the gradient norm was NaN/inf: the update was skipped, only the step
    advanced; params and optimizer state are unchanged).
  """
  action_tokenizer = action_tokenizer or ActionTokenizer()
  schedule = learning_rate_schedule(train_config)
  align_coeff = float(experiment.align.align_coeff)
  with_align = align_coeff > 0
  num_micro = train_config.grad_accum_steps

  def train_step(state: TrainState, frozen_params: Dict[str, Any], batch: Batch):
    check_batch(batch, num_micro)
    micro_batches = _split_micro_batches(batch, num_micro)
    # Normalise by whole-batch counts so k micro-batches sum to the big batch's loss.
    loss_mask = jnp.asarray(batch["loss_mask"]).astype(bool) & jnp.asarray(
        batch["input_mask"]).astype(bool)
    num_targets = jnp.maximum(jnp.sum(loss_mask).astype(jnp.float32), 1.0)
    step_rng = jax.random.fold_in(state.rng, state.step)

    def micro_loss(trainable, micro, index):
      rng = jax.random.fold_in(step_rng, index)
      student = student_weights(experiment, trainable, frozen_params["student"], rng,
                                deterministic=False)
      sums, align_values = _forward(models, experiment, action_tokenizer, student,
                                    frozen_params, micro, with_align)
      loss = sums["nll_sum"] / num_targets
      if with_align:
        loss = loss + align_coeff * align_values["loss/align"] / num_micro
      return loss, (sums, align_values)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def accumulate(carry, xs):
      grads, totals = carry
      micro, index = xs
      micro_grads, (sums, align_values) = grad_fn(state.trainable, micro, index)
      values = {**sums, **{k: v / num_micro for k, v in align_values.items()}}
      grads = jax.tree.map(jnp.add, grads, micro_grads)
      totals = jax.tree.map(jnp.add, totals, values)
      return (grads, totals), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    shapes = jax.eval_shape(lambda: grad_fn(state.trainable, jax.tree.map(lambda x: x[0],
                                                                          micro_batches), 0)[1])
    totals0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), {**shapes[0], **shapes[1]})
    (grads, totals), _ = jax.lax.scan(
        accumulate, (zeros, totals0), (micro_batches, jnp.arange(num_micro)))
    align_values = {k: v for k, v in totals.items() if k.startswith(_ALIGN_METRICS)}
    metrics = _finish_metrics(totals, align_values, align_coeff)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    # A NaN/inf loss or gradient would poison the params and the Adam moments for good:
    # skip that update (two scalars checked on device, no host sync) and report it.
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    trainable, opt_state = apply_optimizer(train_config, grads, state.opt_state,
                                           state.trainable, finite)
    ema = state.ema
    if ema:
      decay = jnp.asarray(train_config.ema_decay, jnp.float32)
      ema = jax.tree.map(lambda e, w: jnp.where(finite, decay * e + (1 - decay) * w, e),
                         ema, trainable)
    state = state.replace(step=state.step + 1, params=trainable["params"],
                          lora=trainable["lora"], opt_state=opt_state, ema=ema)
    return state, metrics

  return train_step


def make_eval_step(models: Models, experiment: Experiment,
                   action_tokenizer: Optional[ActionTokenizer] = None
                   ) -> Callable[[TrainState, Dict[str, Any], Batch], Metrics]:
  """A pure `eval_step(state, frozen_params, batch) -> metrics` for open-loop validation.

  Deterministic (no LoRA dropout), no update; it measures the weights inference uses (the
  moving average when train.ema_decay > 0). The alignment metrics (loss/align,
  align/cos_sim) are always computed, also for plain SFT runs, so that representation
  drift can be compared across align_coeff values; loss/total uses the run's align_coeff.
  """
  action_tokenizer = action_tokenizer or ActionTokenizer()
  align_coeff = float(experiment.align.align_coeff)

  def eval_step(state: TrainState, frozen_params: Dict[str, Any], batch: Batch) -> Metrics:
    check_batch(batch)
    student = student_weights(experiment, state.inference_trainable, frozen_params["student"],
                              None, deterministic=True)
    sums, align_values = _forward(models, experiment, action_tokenizer, student,
                                  frozen_params, batch, True)
    return _finish_metrics(sums, align_values, align_coeff)

  return eval_step
