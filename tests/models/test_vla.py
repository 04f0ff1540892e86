"""The VLA student: presets, visual-token bookkeeping, LoRA on the whole model, bad input,
and that no preset sees a supervised target while predicting it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import lora as lora_lib
from vla_jax.models.vla import VLA, VLA_PRESETS, vla_config
from vla_jax.train import step as step_lib
from vla_jax.weights import vla as vla_weights


@pytest.fixture(scope="module")
def tiny():
  config = vla_config("tiny")
  model = VLA(config)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, 512).at[:, 0].set(1)
  params = jax.jit(model.init)(jax.random.key(2), images, tokens)["params"]
  return config, model, params, images, tokens


def test_outputs_and_visual_positions(tiny):
  config, model, params, images, tokens = tiny
  out = model.apply({"params": params}, images, tokens, align_layer=2, return_all_hidden=True)
  n = config.num_visual_tokens
  assert out["logits"].shape == (2, 6 + n, config.llm.vocab_size)
  np.testing.assert_array_equal(out["visual_positions"], np.arange(1, 1 + n))
  # The captured slice is exactly layer 2's hidden state at the visual positions.
  np.testing.assert_allclose(out["align_hidden"], out["hidden"][2][:, 1:1 + n], atol=1e-6)


def test_uint8_images_equal_float_images(tiny):
  _, model, params, images, tokens = tiny
  as_uint8 = jnp.round(images * 255).astype(jnp.uint8)
  a = model.apply({"params": params}, as_uint8, tokens)["logits"]
  b = model.apply({"params": params}, as_uint8.astype(jnp.float32) / 255, tokens)["logits"]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_lora_merge_equals_unmerged_forward_on_whole_vla(tiny):
  _, model, params, images, tokens = tiny
  config = lora_lib.LoraConfig(rank=4, alpha=8.0,
                               target_regex=r"^(?!.*(lm_head|embedding/kernel|patch_embed))")
  factors = lora_lib.init_lora(jax.random.key(3), params, config)
  # B starts at zero (identity); give it values so the test can fail.
  factors = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(4), x.shape),
                         factors)
  adapted = lora_lib.apply_lora(params, factors, config)
  merged = lora_lib.merge(params, factors, config)
  out_adapted = model.apply({"params": adapted}, images, tokens)["logits"]
  out_merged = model.apply({"params": merged}, images, tokens)["logits"]
  out_base = model.apply({"params": params}, images, tokens)["logits"]
  np.testing.assert_allclose(out_merged, out_adapted, atol=1e-5)
  assert np.abs(out_merged - out_base).max() > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lora_lib.unmerge(merged, factors, config), params)


@pytest.mark.parametrize("shape,match", [((2, 32, 32, 3), "64x64"),
                                         ((2, 64, 64, 4), "RGB"),
                                         ((3, 64, 64, 3), "batch")])
def test_bad_images_are_clear_errors(tiny, shape, match):
  _, model, params, _, tokens = tiny
  with pytest.raises(InputError, match=match):
    model.apply({"params": params}, jnp.zeros(shape), tokens)


def test_presets_and_abstract_params():
  assert set(VLA_PRESETS) >= {"tiny", "openvla_7b", "paligemma_3b"}
  with pytest.raises(ConfigError, match="Unknown VLA preset"):
    vla_config("openvla_13b")
  # The 7B layout is checked without allocating it: parameter count of OpenVLA-7B.
  abstract = vla_weights.abstract_params(vla_config("openvla_7b"))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))
  assert 7.4e9 < count < 7.6e9


# ----------------------------------------------------------------------------- target leaks
def _small(config):
  """A preset at test size: same layout, families and flags, small widths and depths."""
  llm = dataclasses.replace(
      config.llm, vocab_size=320, width=64, depth=2, num_heads=4, mlp_dim=96,
      num_kv_heads=None if config.llm.num_kv_heads is None else 1,
      head_dim=None if config.llm.head_dim is None else 16)
  siglip = dataclasses.replace(config.siglip, width=32, depth=2, mlp_dim=64, num_heads=4,
                               patch_size=8, image_size=32)
  dino = None if config.dino is None else dataclasses.replace(
      config.dino, width=32, depth=2, num_heads=4, mlp_dim=None, patch_size=8, image_size=32)
  return dataclasses.replace(config, llm=llm, siglip=siglip, dino=dino, image_size=32)


def _random_params(model, batch):
  """N(0, 0.1) parameters from the abstract tree (cheaper to build than a jitted init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch["images"], batch["tokens"])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                      shapes["params"])


def _train_batch(config, rng, length=14, targets=5):
  """Two right-padded train rows: BOS + prompt, `targets` supervised ids, padding."""
  tokens = np.zeros((2, length), np.int32)
  input_mask = np.zeros((2, length), bool)
  loss_mask = np.zeros((2, length), bool)
  for row, prompt in enumerate((6, 4)):
    ids = [1] + list(rng.integers(3, config.llm.vocab_size, prompt - 1 + targets))
    tokens[row, :len(ids)] = ids
    input_mask[row, :len(ids)] = True
    loss_mask[row, prompt:len(ids)] = True
  images = rng.integers(0, 256, (2, config.image_size, config.image_size, 3), dtype=np.uint8)
  return {"images": images, "tokens": tokens, "input_mask": input_mask,
          "loss_mask": loss_mask}


@pytest.mark.parametrize("preset", VLA_PRESETS)
def test_train_forward_never_sees_the_target_it_predicts(preset):
  """Changing supervised text token t leaves every logit up to the one predicting t as is.

  Runs the student exactly as the train and eval steps do (`step.student_forward`), for
  every preset's layout (at test size): a prefix-LM student must keep its targets causal.
  One forward pass holds both rows and, per supervised position, a copy of its row with
  that token changed.
  """
  config = _small(vla_config(preset))
  model = VLA(config)
  batch = _train_batch(config, np.random.default_rng(0))
  variants = [(row, t) for row in range(2) for t in np.flatnonzero(batch["loss_mask"][row])]
  rows = [0, 1] + [row for row, _ in variants]
  big = {k: v[rows] for k, v in batch.items()}
  for i, (row, t) in enumerate(variants):
    big["tokens"][2 + i, t] = big["tokens"][2 + i, t] % 300 + 3
  params = _random_params(model, batch)
  logits = np.asarray(jax.jit(functools.partial(step_lib.student_forward, model))(
      params, big)["logits"])
  sequence = step_lib.text_to_sequence_positions(config, batch["tokens"].shape[1])
  for i, (row, t) in enumerate(variants):
    base, changed = logits[row], logits[2 + i]
    seen = np.abs(changed[:sequence[t]] - base[:sequence[t]]).max()
    assert seen == 0.0, (f"{preset}: changing target token {t} (row {row}) moved the logits "
                         f"that predict it or an earlier token (max diff {seen:.2e})")
    assert np.abs(changed[sequence[t]] - base[sequence[t]]).max() > 1e-4  # it is read later


def test_step_loss_is_the_prompt_prefix_loss():
  """The eval step's `loss/action` on `tiny_paligemma` equals the NLL of the targets under
  PaliGemma's own mask (image + prompt bidirectional, targets causal), built here by hand."""
  from configs.align import get_config
  from vla_jax import modeling
  from vla_jax.actions import ActionTokenizer
  from vla_jax.experiment import parse_config
  from vla_jax.models import teacher as teacher_lib
  from vla_jax.train import state as state_lib

  config = get_config("tiny_paligemma")
  config.model = dataclasses.asdict(_small(vla_config("tiny_paligemma")))
  config.teacher = teacher_lib.teacher_config("tiny_siglip", student_grid=4).to_mapping()
  config.align.align_layer = 1
  config.weights.student = config.weights.teacher = ""
  experiment = parse_config(config)
  models = modeling.build_models(experiment)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                        modeling.abstract_params(models, experiment))
  train_config = state_lib.TrainConfig(trainable="full", batch_size=2)
  state, frozen = state_lib.create_train_state(experiment, train_config, params,
                                               jax.random.key(1))
  action_tokenizer = ActionTokenizer(vocab_size=320, n_bins=64)
  batch = _train_batch(experiment.model, np.random.default_rng(1))
  batch["actions"] = np.zeros((2, 5), np.float32)
  metrics = jax.jit(step_lib.make_eval_step(models, experiment, action_tokenizer))(
      state, frozen, batch)

  prompt = np.zeros_like(batch["loss_mask"])
  prompt[0, :6] = prompt[1, :4] = True  # BOS + prompt of each row, nothing else
  out = jax.jit(models.student.apply)({"params": params["student"]}, batch["images"],
                                      batch["tokens"], batch["input_mask"], prefix_mask=prompt)
  logits = step_lib.target_logits(experiment.model, out["logits"])
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                            batch["tokens"][..., None], -1)[..., 0]
  want = nll[batch["loss_mask"]].mean()
  np.testing.assert_allclose(float(metrics["loss/action"]), want, rtol=1e-5)


def test_pipeline_prefix_is_the_inference_prompt(tmp_path):
  """The prefix the step derives from a data-pipeline batch (`batching.tokenize_batch`) is
  exactly the prompt the policy decodes from: BOS, instruction, "▁"; no action id, no EOS."""
  from vla_jax.actions import ActionTokenizer
  from vla_jax.data import batching
  from vla_jax.sim import bundled
  from vla_jax.text import Tokenizer, openvla_inputs

  tokenizer = Tokenizer.from_path(bundled.bundled_tokenizer_path(str(tmp_path)))
  action_tokenizer = ActionTokenizer(vocab_size=tokenizer.vocab_size)
  instructions = np.array([b"put the carrot on the plate", b"put the red cube on the bowl"])
  actions = np.random.default_rng(0).uniform(-1, 1, (2, 1, 7))
  batch, _ = batching.tokenize_batch(instructions, actions, tokenizer, action_tokenizer,
                                     max_length=40, pad_id=tokenizer.vocab_size)
  prefix = np.asarray(step_lib.supervised_prefix_mask(batch["attention_mask"],
                                                      batch["loss_mask"]))
  for row, text in enumerate(instructions):
    prompt, _ = openvla_inputs(tokenizer, text.decode())
    np.testing.assert_array_equal(np.flatnonzero(prefix[row]), np.arange(len(prompt)))
    np.testing.assert_array_equal(batch["tokens"][row, :len(prompt)], prompt)
