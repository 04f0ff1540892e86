"""`align.align_layers`: several LLM layers aligned at once (the reference code's MultiProjector).

One frozen projector per layer, each its own random init; `loss/align` is the sum of the
per-layer losses; metrics per layer plus the total. A config with only `align_layer` (or
`align_layers=(k,)`) computes exactly what it computed before, with the same parameter
names, and configs recorded before the option existed still parse and resume.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.align import get_config
from tests.train.helpers import ACTION_TOKENIZER, make_batch, small_experiment
from vla_jax import modeling
from vla_jax.errors import ConfigError
from vla_jax.experiment import parse_config
from vla_jax.models import align as align_lib
from vla_jax.train import checkpoint as checkpoint_lib
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib

DEPTH = 2
LAYERS = (1, 2)


def _with_layers(experiment, layers=None, layer=None):
  align = dataclasses.replace(experiment.align, align_layers=layers,
                              align_layer=experiment.align.align_layer if layer is None else layer)
  return dataclasses.replace(experiment, align=align)


def _random_params(models, experiment, seed=0):
  """Student and teacher params drawn with numpy (compiling their init would dominate these
  tests), the projector(s) from the real init: its per-layer independence is under test."""
  abstract = modeling.abstract_params(models, experiment)
  rng = np.random.default_rng(seed)
  draw = lambda spec: jnp.asarray(0.2 * rng.standard_normal(spec.shape).astype(np.float32))
  params = {part: jax.tree.map(draw, abstract[part]) for part in ("student", "teacher")}
  paths = [path for path in traverse_util.flatten_dict(abstract) if path[0] == "projector"]
  projector = modeling.init_params(models, experiment, jax.random.key(seed), only=paths)
  params["projector"] = traverse_util.unflatten_dict(projector)["projector"]
  return params


@functools.lru_cache(maxsize=None)
def _multi():
  """(experiment, models, params) aligning LAYERS of a DEPTH-layer tiny student."""
  experiment = _with_layers(small_experiment(depth=DEPTH), LAYERS)
  models = modeling.build_models(experiment)
  return experiment, models, _random_params(models, experiment)


def _batch():
  return make_batch(0, batch_size=2)


def test_config_checks_name_align_layers():
  for layers, message in (((1, 1), "must not repeat a layer"), ((), "non-empty tuple"),
                          ((1, -2), "layer indices >= 0"), ((True,), "layer indices >= 0"),
                          (8, "non-empty tuple")):
    with pytest.raises(ConfigError, match=rf"align\.align_layers .*{message}"):
      align_lib.AlignConfig(align_layers=layers)
  config = get_config("tiny")
  config.align.align_layers = (1, 9)  # --config.align.align_layers='(1, 9)'
  with pytest.raises(ConfigError, match=r"align\.align_layers=\(1, 9\) but the LLM has only 4 "
                                        r"layers: \[9\] outside \[0, 4\]"):
    parse_config(config)
  config.align.align_layers = (3, 1)
  assert parse_config(config).align.layers == (3, 1)
  # align_layers replaces align_layer, so an out-of-range align_layer is then not read.
  config.align.align_layer = 99
  assert parse_config(config).align.capture == (3, 1)


def test_configs_recorded_before_align_layers_parse_and_resume_unchanged():
  config = get_config("tiny")
  experiment = parse_config(config)
  assert experiment.align.align_layers is None and experiment.align.capture == 2
  saved = checkpoint_lib.experiment_to_config(experiment)
  del saved["align"]["align_layers"]  # what checkpoints recorded before the option
  assert checkpoint_lib.experiment_from_assets({"config": saved}) == experiment
  assert checkpoint_lib.config_differences(saved, checkpoint_lib.experiment_to_config(
      experiment)) == []


def test_projectors_are_one_per_layer_each_its_own_init():
  experiment, _, params = _multi()
  projector = params["projector"]
  assert sorted(projector) == ["layer_1", "layer_2"]
  for name in projector:
    assert sorted(projector[name]) == ["fc1", "fc2", "fc3", "norm"]
  assert not np.allclose(projector["layer_1"]["fc1"]["kernel"],
                         projector["layer_2"]["fc1"]["kernel"])
  assert experiment.align.multi_layer


def test_two_layers_give_the_sum_of_the_single_layer_losses():
  experiment, models, params = _multi()
  batch = _batch()
  args = (batch["images"], batch["tokens"], batch["input_mask"])
  out, total, metrics = jax.jit(lambda p, *a: modeling.aligned_forward(
      models, experiment, p, *a))(params, *args)
  assert isinstance(out["align_hidden"], tuple) and len(out["align_hidden"]) == len(LAYERS)
  teacher = jax.jit(lambda p, images: models.teacher.apply(
      {"params": p}, images, experiment.model.grid, experiment.align.grid_match))(
          params["teacher"], batch["images"])
  losses = []
  for layer, hidden in zip(LAYERS, out["align_hidden"]):
    # Each layer's loss by the one-layer code path, with that layer's projector.
    single = _with_layers(experiment, None, layer).align
    projector = align_lib.build_projector(single, experiment.teacher.width)
    assert isinstance(projector, align_lib.AlignProjector)
    loss, single_metrics = align_lib.alignment_from_hidden(
        single, projector, params["projector"][f"layer_{layer}"], hidden, teacher)
    losses.append(loss)
    np.testing.assert_allclose(metrics[f"loss/align/layer_{layer}"], loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics[f"align/cos_sim/layer_{layer}"],
                               single_metrics["align/cos_sim"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, sum(losses), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss/align"], total)
  assert abs(float(losses[0]) - float(losses[1])) > 1e-4  # two different terms, not one twice
  np.testing.assert_allclose(metrics["align/cos_sim"], np.mean(
      [metrics[f"align/cos_sim/layer_{k}"] for k in LAYERS]), rtol=1e-6)


def test_gradients_of_the_summed_loss_reach_every_aligned_layer():
  experiment, models, params = _multi()
  batch = _batch()

  def loss(llm):  # d loss/align / d the LLM's params (the towers' backward is not needed)
    student = {**params["student"], "llm": llm}
    return modeling.aligned_forward(models, experiment, {**params, "student": student},
                                    batch["images"], batch["tokens"], batch["input_mask"])[1]

  grads = jax.jit(jax.grad(loss))(params["student"]["llm"])
  # Block 0 feeds both aligned layers; block 1 only layer 2, so its gradient comes from
  # the second projector's term.
  for block in ("layers_0", "layers_1"):
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads[block]))) > 0, block
  assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads["final_norm"]))) == 0


def test_one_layer_is_bit_identical_to_the_single_layer_path():
  experiment = small_experiment(depth=DEPTH)  # align_layer=1, align_layers=None
  models = modeling.build_models(experiment)
  params = _random_params(models, experiment)
  # The projector is the single AlignProjector: the same names, the same init as before.
  projector = align_lib.AlignProjector.from_config(experiment.align,
                                                   teacher_dim=experiment.teacher.width)
  assert models.projector == projector
  hidden = jnp.zeros((1, experiment.model.num_visual_tokens, experiment.model.llm.width))
  before = projector.init(jax.random.split(jax.random.key(0), 3)[2], hidden)["params"]
  assert sorted(params["projector"]) == ["fc1", "fc2", "fc3", "norm"]
  jax.tree.map(np.testing.assert_array_equal, params["projector"], before)
  # align_layers=(1,) is the same experiment in all but name: the same modules, capture.
  one = _with_layers(experiment, (1,))
  assert modeling.build_models(one) == models and one.align.capture == 1 == \
      experiment.align.capture
  batch = _batch()
  args = (batch["images"], batch["tokens"], batch["input_mask"])

  def both(p, images, tokens, mask):
    # The computation before align_layers existed, spelled out...
    out = models.student.apply({"params": p["student"]}, images, tokens, mask, align_layer=1)
    teacher = jax.lax.stop_gradient(models.teacher.apply(
        {"params": p["teacher"]}, images, experiment.model.grid, experiment.align.grid_match))
    projected = projector.apply({"params": p["projector"]}, out["align_hidden"])
    before = align_lib.alignment_loss(experiment.align, projected, teacher)[0]
    # ...and today's.
    now_out, now, metrics = modeling.aligned_forward(models, experiment, p, images, tokens, mask)
    return before, now, now_out["align_hidden"], out["align_hidden"], metrics

  before, now, hidden_now, hidden_before, metrics = jax.jit(both)(params, *args)
  np.testing.assert_array_equal(now, before)
  np.testing.assert_array_equal(hidden_now, hidden_before)
  assert sorted(metrics) == ["align/cos_sim", "align/student_norm", "align/teacher_norm",
                             "loss/align"]


def test_eval_step_reports_each_layer_and_the_sum():
  experiment, models, params = _multi()
  train_config = state_lib.TrainConfig(trainable="full", batch_size=4, learning_rate=1e-3)
  state, frozen = state_lib.create_train_state(experiment, train_config, params,
                                               jax.random.key(1))
  step = jax.jit(step_lib.make_eval_step(models, experiment, ACTION_TOKENIZER))
  metrics = step(state, frozen, make_batch(0, batch_size=2))
  assert {"loss/align/layer_1", "loss/align/layer_2", "align/cos_sim/layer_1",
          "align/cos_sim/layer_2", "align/cos_sim"} <= set(metrics)
  np.testing.assert_allclose(metrics["loss/align"], metrics["loss/align/layer_1"]
                             + metrics["loss/align/layer_2"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss/total"], metrics["loss/action"]
                             + experiment.align.align_coeff * metrics["loss/align"], rtol=1e-5)


def test_the_study_probes_every_aligned_layer():
  """`study._probe_layers`: one probe per aligned layer, the first layer's as the headline
  (what the summary and report read), every layer's under "by_layer"."""
  from vla_jax import study  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import probe as probe_lib  # pylint: disable=g-import-not-at-top
  experiment, models, params = _multi()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
  labels = np.arange(12) % 3
  protocol = probe_lib.ProbeConfig(epochs=2)
  result = study._probe_layers(probe_lib, models.student, params["student"], images,  # pylint: disable=protected-access
                               experiment.align.layers, labels, protocol, None)
  assert sorted(result["by_layer"]) == [str(k) for k in sorted(LAYERS)]
  assert {k: v for k, v in result.items() if k != "by_layer"} == result["by_layer"][str(LAYERS[0])]
  for layer in LAYERS:
    expected = probe_lib.probe_features(
        probe_lib.student_features(models.student, params["student"], images, layer),
        labels, protocol)
    assert result["by_layer"][str(layer)] == expected
  single = study._probe_layers(probe_lib, models.student, params["student"], images, (1,),  # pylint: disable=protected-access
                               labels, protocol, None)
  assert "by_layer" not in single and single == result["by_layer"]["1"]
