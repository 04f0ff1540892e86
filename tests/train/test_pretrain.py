"""Vision pretraining on renders: it learns to locate, and its files load where they belong."""

import dataclasses

import jax
import numpy as np
import pytest

from configs.align import get_config
from vla_jax import modeling
from vla_jax.errors import CheckpointError
from vla_jax.experiment import parse_config
from vla_jax.models import vla as vla_lib
from vla_jax.sim import render
from vla_jax.train import pretrain

pytestmark = pytest.mark.slow  # renders and trains for a few minutes

SMALL = pretrain.PretrainConfig(splits=("train", "carrot"), episodes_per_split=24,
                                frames_per_episode=4, steps=80, batch_size=16,
                                learning_rate=2e-3, warmup_steps=10)


@pytest.fixture(scope="module")
def experiment():
  return parse_config(get_config("tiny"))


@pytest.fixture(scope="module")
def built(experiment, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("cache"))
  return cache, pretrain.ensure_pretrained(experiment, SMALL, cache, progress=False)


def test_labels_are_where_the_renderer_draws_them():
  data = pretrain.render_keypoint_data(dataclasses.replace(
      SMALL, splits=("train",), episodes_per_split=4), 64)
  assert data["images"].shape[1:] == (64, 64, 3) and data["keypoints"].shape[1:] == (4, 2)
  assert (data["keypoints"] > 0).all() and (data["keypoints"] < 1).all()
  # The effector's orange wrist (render: colour (0.9, 0.45, 0.1)) is drawn at its keypoint.
  images = data["images"].astype(int)
  orange = (images[..., 0] > 170) & (images[..., 1] > 70) & (images[..., 1] < 160) & (
      images[..., 2] < 90)
  rows, cols = np.mgrid[:64, :64]
  for image_orange, (u, v) in zip(orange, data["keypoints"][:, 2] * 64):
    distance = np.hypot(cols + 0.5 - u, rows + 0.5 - v)[image_orange]
    assert distance.size and distance.min() < 2.5
  # The effector's ground point is below it in the image (the camera looks down at the table).
  assert (data["keypoints"][:, 3, 1] > data["keypoints"][:, 2, 1]).all()
  np.testing.assert_allclose(render.project(np.zeros(3, np.float32)), [0.5, 0.58], atol=1e-6)


def test_pretraining_learns_to_locate_on_held_out_renders(experiment):
  data = pretrain.render_keypoint_data(SMALL, 64)
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))["student"]
  vision = {k: params[k] for k in pretrain.STUDENT_VISION}
  encode = lambda p, images: models.student.apply({"params": {**params, **p}}, images,
                                                  method=vla_lib.VLA.encode_images)
  _, before = pretrain.pretrain_tokens(encode, vision, data, experiment.model.grid,
                                       dataclasses.replace(SMALL, steps=1, warmup_steps=0),
                                       progress=False)
  _, after = pretrain.pretrain_tokens(encode, vision, data, experiment.model.grid, SMALL,
                                      progress=False)
  assert after["cross_entropy"] < 0.7 * before["cross_entropy"]
  assert after["patch_accuracy"] > before["patch_accuracy"] + 0.2


def test_pretrained_files_load_as_teacher_and_student_towers(experiment, built):
  cache, paths = built
  assert paths == pretrain.ensure_pretrained(experiment, SMALL, cache, progress=False)
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(1))
  weights = {"student": "", "teacher": paths["teacher"], "teacher_format": "big_vision",
             "student_vision": paths["student_vision"]}
  loaded = modeling.create_params(models, experiment, weights, jax.random.key(1))
  vision = pretrain.load_student_vision(paths["student_vision"], experiment)
  for part in pretrain.STUDENT_VISION:
    jax.tree.map(np.testing.assert_array_equal, loaded["student"][part], vision[part])
  jax.tree.map(np.testing.assert_array_equal, loaded["student"]["llm"], params["student"]["llm"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), loaded["teacher"], params["teacher"])
  assert all(jax.tree.leaves(changed))


def test_student_vision_made_for_other_towers_is_refused(built):
  _, paths = built
  config = get_config("tiny")
  config.model.siglip.mlp_dim = 256
  with pytest.raises(CheckpointError, match="siglip"):
    pretrain.load_student_vision(paths["student_vision"], parse_config(config))
