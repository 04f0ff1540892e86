"""The fused train step: SFT equivalence, frozen parts, LoRA, accumulation, alignment."""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train.helpers import ACTION_TOKENIZER, make_batch, small_experiment
from tests.train.helpers import _config, _run, _with_coeff, jitted_train_step
from vla_jax import modeling
from vla_jax.errors import ConfigError, InputError
from vla_jax.models import lora as lora_lib
from vla_jax.models.vla import vla_config
from vla_jax.train import checkpoint as checkpoint_lib
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib


@pytest.fixture(scope="module")
def setup(tiny_setup):
  return tiny_setup


def test_text_to_sequence_positions():
  openvla, paligemma = vla_config("tiny"), vla_config("tiny_paligemma")
  n = openvla.num_visual_tokens
  np.testing.assert_array_equal(step_lib.text_to_sequence_positions(openvla, 4),
                                [0, 1 + n, 2 + n, 3 + n])
  np.testing.assert_array_equal(step_lib.text_to_sequence_positions(paligemma, 3),
                                [n, 1 + n, 2 + n])
  # Logits whose value is their sequence index: text token t is predicted at seq(t) - 1.
  logits = jnp.broadcast_to(jnp.arange(4 + n, dtype=jnp.float32)[None, :, None], (1, 4 + n, 2))
  picked = step_lib.target_logits(openvla, logits)[0, :, 0]
  np.testing.assert_array_equal(picked, [0, n, n + 1, n + 2])


def test_action_metrics_of_perfect_logits():
  experiment = small_experiment()
  config = experiment.model
  batch = make_batch(3)
  tokens = batch["tokens"]
  length = tokens.shape[1]
  # Logits that put all mass on the true next token at every sequence position.
  seq = step_lib.text_to_sequence_positions(config, length)
  logits = np.zeros((tokens.shape[0], length + config.num_visual_tokens, 384), np.float32)
  for b in range(tokens.shape[0]):
    for t in range(1, length):
      logits[b, seq[t] - 1, tokens[b, t]] = 30.0
  sums = step_lib._action_sums(config, ACTION_TOKENIZER, jnp.asarray(logits),
                               jax.tree.map(jnp.asarray, batch))
  assert float(sums["correct"]) == float(sums["num_action_tokens"]) == 4 * 3
  expected_l1 = np.abs(ACTION_TOKENIZER.decode(ACTION_TOKENIZER.encode(batch["actions"]))
                       - batch["actions"]).sum()
  np.testing.assert_allclose(float(sums["l1_sum"]), expected_l1, rtol=1e-5)
  assert float(sums["nll_sum"]) < 1e-6 * 20


def _plain_sft_update(models, experiment, params, batch, train_config):
  """An SFT step written from scratch: CE on the targets, clip, AdamW, one update."""
  n = experiment.model.num_visual_tokens

  rows, cols = np.nonzero(batch["loss_mask"])
  predicted_at = cols + n - 1  # text t >= 1 sits at t + n and is predicted one step earlier
  targets = batch["tokens"][rows, cols]

  def loss_fn(student):
    logits = models.student.apply({"params": student}, batch["images"], batch["tokens"],
                                  batch["input_mask"])["logits"]
    log_probs = jax.nn.log_softmax(logits[rows, predicted_at], axis=-1)
    return -jnp.mean(log_probs[np.arange(len(rows)), targets])

  tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm),
                   optax.adamw(train_config.learning_rate, eps=train_config.adam_eps,
                               weight_decay=train_config.weight_decay))

  def update(student):  # one jit: run eagerly, the optimiser compiles hundreds of tiny ops
    loss, grads = jax.value_and_grad(loss_fn)(student)
    updates, _ = tx.update(grads, tx.init(student), student)
    return loss, optax.apply_updates(student, updates)

  return jax.jit(update)(params["student"])


def test_align_coeff_zero_equals_plain_sft(setup):
  experiment, models, params = setup
  sft = _with_coeff(experiment, 0.0)
  # A large Adam epsilon makes the first update ~ -lr * g / (|g| + eps), linear in the
  # gradient, so tiny gradients do not turn into +-lr sign flips.
  config = _config(weight_decay=0.01, grad_clip_norm=0.5, learning_rate=1.0, adam_eps=1.0)
  batch = make_batch(0)
  state, _, history = _run(sft, models, params, config, [batch])
  assert "loss/align" not in history[0] and "align/cos_sim" not in history[0]
  loss, updated = _plain_sft_update(models, sft, params, batch, config)
  np.testing.assert_allclose(history[0]["loss/action"], loss, rtol=1e-5)
  np.testing.assert_allclose(history[0]["loss/total"], loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, updated)


def test_frozen_parts_get_no_update(setup):
  experiment, models, params = setup
  config = _config(trainable="freeze_vision", freeze_projector=True)
  state, frozen, _ = _run(experiment, models, params, config, [make_batch(0), make_batch(1)])
  assert set(state.params) == {"llm"} and set(frozen["student"]) == {"siglip", "dino",
                                                                      "projector"}
  student = state_lib.student_params(state, frozen, None)
  for part in ("siglip", "dino", "projector"):
    jax.tree.map(np.testing.assert_array_equal, student[part], params["student"][part])
  for part in ("teacher", "projector"):
    jax.tree.map(np.testing.assert_array_equal, frozen[part], params[part])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), student["llm"],
                         params["student"]["llm"])
  assert all(jax.tree.leaves(changed))


def test_lora_trains_only_factors(setup):
  _, models, params = setup
  experiment = small_experiment(lora=True)
  config = _config(trainable="lora")
  state, frozen, history = _run(experiment, models, params, config,
                                [make_batch(0), make_batch(1)])
  assert state.params == {} and state.lora
  jax.tree.map(np.testing.assert_array_equal, frozen["student"], params["student"])
  assert all(float(jnp.abs(f["b"]).max()) > 0 for f in state.lora.values())
  assert np.isfinite(history[-1]["loss/total"])
  with pytest.raises(ConfigError, match="train.trainable"):
    state_lib.create_train_state(experiment, _config(trainable="full"), params, jax.random.key(0))


# The looped Llama case in the quick loop; scanned layers and Gemma in the full suite.
@pytest.mark.parametrize("preset,scan", [("tiny", False),
                                         pytest.param("tiny", True, marks=pytest.mark.slow),
                                         pytest.param("tiny_paligemma", True,
                                                      marks=pytest.mark.slow)])
def test_in_layer_lora_equals_materialised_lora(preset, scan):
  """x @ W + s (x @ A) @ B inside the layers == W + s A @ B as a pytree (dropout included).

  Every linear kernel of the student is adapted (LLM blocks, looped or scanned, the
  DenseGeneral attention of the towers, the projector); two steps, so the second sees
  nonzero B.
  """
  base = small_experiment(preset, lora=True, scan=scan)
  lora = dataclasses.replace(base.lora, dropout=0.25)
  in_layer = dataclasses.replace(base, lora=dataclasses.replace(lora, in_layer=True))
  pytree = dataclasses.replace(base, lora=dataclasses.replace(lora, in_layer=False))
  models = modeling.build_models(in_layer)
  params = modeling.init_params(models, in_layer, jax.random.key(0))
  # Adam epsilon 1: updates ~ -lr * g, so float rounding is not amplified into sign flips.
  config = _config(trainable="lora", learning_rate=0.1, adam_eps=1.0)
  batches = [make_batch(0), make_batch(1)]
  results = [_run(e, models, params, config, batches) for e in (in_layer, pytree)]
  (state_a, _, history_a), (state_b, _, history_b) = results
  assert len(state_a.lora) > 10  # towers, projector and LLM kernels
  assert any("llm/layers/" in path for path in state_a.lora) == scan
  for metrics_a, metrics_b in zip(history_a, history_b):
    for key in ("loss/total", "loss/action", "loss/align", "grad_norm"):
      np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state_a.lora, state_b.lora)


def test_in_layer_lora_refuses_what_it_cannot_adapt():
  """A kernel that is not a Dense layer's, or in_axes the layer does not contract: refused."""
  experiment = small_experiment(lora=True)
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))
  factors = lora_lib.init_lora(jax.random.key(1), params["student"], experiment.lora)
  path = "llm/layers_0/attn/q_proj/kernel"
  factors_tree = lora_lib.layer_factors({path: factors[path]}, experiment.lora)
  batch = make_batch(0)
  bad_axes = dataclasses.replace(experiment.lora, in_axes=((r"q_proj", (1,)),))
  with pytest.raises(ConfigError, match="in_axes"):
    step_lib.student_forward(models.student, params["student"], batch,
                             lora=(bad_axes, factors_tree))
  with pytest.raises(ConfigError, match="in_layer=False"):
    lora_lib.layer_factors({"llm/embedder/input_embedding": factors[path]}, experiment.lora)
  # Factors for a module the forward never calls would be silently ignored: refused.
  stray = {"llm": {"no_such_layer": factors_tree["llm"]["layers_0"]["attn"]["q_proj"]}}
  with pytest.raises(ConfigError, match="no_such_layer"):
    step_lib.student_forward(models.student, params["student"], batch,
                             lora=(experiment.lora, stray))


def test_lora_runs_recorded_before_in_layer_resume_unchanged():
  """A LoRA run saved before `lora.in_layer` existed resumes (in the layers, the default),
  and switching the option is not 'another experiment': the function is the same."""
  experiment = small_experiment(lora=True)
  assert experiment.lora.in_layer
  saved = checkpoint_lib.experiment_to_config(experiment)
  del saved["lora"]["in_layer"]
  assert checkpoint_lib.experiment_from_assets({"config": saved}) == experiment
  assert checkpoint_lib.config_differences(saved, checkpoint_lib.experiment_to_config(
      experiment)) == []
  materialised = dataclasses.replace(
      experiment, lora=dataclasses.replace(experiment.lora, in_layer=False))
  assert checkpoint_lib.config_differences(
      checkpoint_lib.experiment_to_config(experiment),
      checkpoint_lib.experiment_to_config(materialised)) == []


def test_schedule_and_config_validation():
  config = state_lib.TrainConfig(schedule="warmup_cosine", warmup_steps=10, num_steps=100,
                                 learning_rate=1.0, end_lr_factor=0.1)
  schedule = state_lib.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  with pytest.raises(ConfigError, match="train.batch_size"):
    state_lib.TrainConfig(batch_size=6, grad_accum_steps=4)
  with pytest.raises(ConfigError, match="train.trainable"):
    state_lib.TrainConfig(trainable="everything")
  with pytest.raises(ConfigError, match="train.remat_policy"):
    state_lib.TrainConfig(remat_policy="all")


def test_bad_batch_is_rejected(setup):
  batch = make_batch(0)
  with pytest.raises(InputError, match="missing"):
    step_lib.check_batch({k: v for k, v in batch.items() if k != "actions"})
  with pytest.raises(InputError, match="grad_accum_steps"):
    step_lib.check_batch(batch, 3)


def test_train_overrides_set_dtype_and_remat(setup):
  experiment = setup[0]
  changed = state_lib.apply_train_overrides(
      experiment, state_lib.TrainConfig(compute_dtype="bfloat16", remat_policy="dots_saveable"))
  assert changed.model.llm.dtype == "bfloat16" and changed.model.llm.remat
  assert changed.model.siglip.dtype == changed.teacher.vit.dtype == "bfloat16"


def test_nonfinite_step_skips_the_update(setup):
  experiment, models, params = setup
  config = _config()  # the step test_align_training trains with: compiled once per process
  state, frozen = state_lib.create_train_state(experiment, config, params, jax.random.key(1))
  train_step = jitted_train_step(models, experiment, config)
  good, metrics = train_step(state, frozen, make_batch(0))
  assert float(metrics["nonfinite"]) == 0.0 and int(good.step) == 1
  # One NaN weight makes the loss NaN: the step must count it and leave state untouched.
  leaves, treedef = jax.tree.flatten(good.params)
  poisoned = good.replace(params=jax.tree.unflatten(
      treedef, [leaves[0] * jnp.nan] + leaves[1:]))
  after, metrics = train_step(poisoned, frozen, make_batch(1))
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss/total"]))
  assert int(after.step) == 2
  jax.tree.map(np.testing.assert_array_equal, after.params, poisoned.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, poisoned.opt_state)


@pytest.mark.parametrize("overrides", [
    dict(),  # the defaults: clip 1.0, constant schedule, no weight decay
    dict(grad_clip_norm=0.0, weight_decay=0.01, schedule="warmup_cosine", warmup_steps=2,
         num_steps=10),
    dict(grad_clip_norm=0.05, weight_decay=0.1, warmup_steps=2, learning_rate=0.01)])
def test_apply_optimizer_is_optax_update_or_nothing(overrides):
  """The step's fused update equals make_optimizer's optax update + apply_updates over
  several steps (clipping on and off, weight decay, schedules), and a non-finite step
  returns params and optimizer state bit for bit."""
  config = state_lib.TrainConfig(**overrides)
  optimizer = state_lib.make_optimizer(config)
  params = {"params": {"w": jax.random.normal(jax.random.key(0), (6, 3)),
                       "norm": jnp.linspace(0.5, 1.5, 3)}, "lora": {}}
  apply = jax.jit(state_lib.apply_optimizer, static_argnums=0)
  reference, reference_state = params, optimizer.init(params)
  ours, our_state = params, optimizer.init(params)
  for i in range(4):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i + 1), x.shape), params)
    updates, reference_state = optimizer.update(grads, reference_state, reference)
    reference = optax.apply_updates(reference, updates)
    ours, our_state = apply(config, grads, our_state, ours, jnp.bool_(True))
    assert jax.tree.structure(our_state) == jax.tree.structure(reference_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 (ours, our_state), (reference, reference_state))
  nan_grads = jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan), params)
  kept, kept_state = apply(config, nan_grads, our_state, ours, jnp.bool_(False))
  jax.tree.map(np.testing.assert_array_equal, (kept, kept_state), (ours, our_state))
  with pytest.raises(ValueError, match="not make_optimizer's state"):
    state_lib.apply_optimizer(config, grads, optax.adam(1e-3).init(params), params,
                              jnp.bool_(True))


def test_donated_update_does_not_copy_the_optimizer_state():
  """Updating donated params and moments in place needs no copy of them (the skip's
  select used to make XLA copy every Adam moment first, 8 % of a full fine-tuning step)."""
  config = state_lib.TrainConfig(weight_decay=0.01)
  params = {"params": {f"w{i}": jnp.ones((64, 32)) for i in range(4)}, "lora": {}}
  opt_state = state_lib.make_optimizer(config).init(params)

  def update(params, opt_state, grads):
    finite = jnp.isfinite(optax.tree.norm(grads))
    return state_lib.apply_optimizer(config, grads, opt_state, params, finite)

  hlo = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, params).compile()
  copied = [line for line in hlo.as_text().splitlines()
            if " copy(" in line and "[64,32]" in line]
  assert not copied, f"{len(copied)} moment-sized copies, e.g. {copied[0].strip()[:160]}"
