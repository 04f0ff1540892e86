"""The frozen teacher returns patch features on the student's grid, or says why it cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import align as align_lib
from vla_jax.models import vit as vit_lib
from vla_jax.models.teacher import Teacher, teacher_config


@pytest.mark.parametrize("name", ["tiny_siglip", "tiny_dinov2", "tiny_radio", "tiny_dinov3",
                                  "tiny_siglip2"])
def test_resize_input_gives_student_grid(name):
  config = teacher_config(name, student_grid=4)
  teacher = Teacher(config)
  images = jax.random.uniform(jax.random.key(0), (2, 24, 24, 3))  # any size: resized inside
  params = teacher.init(jax.random.key(1), images, 4)["params"]
  features = teacher.apply({"params": params}, images, 4)
  assert features.shape == (2, 16, config.width) and features.dtype == jnp.float32
  assert np.isfinite(np.asarray(features)).all()


def test_features_equal_the_tower_on_normalised_resized_input():
  config = teacher_config("tiny_siglip", student_grid=4)
  teacher = Teacher(config)
  images = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3))
  params = teacher.init(jax.random.key(1), images, 4)["params"]
  _, out = vit_lib.ViT(config.vit).apply({"params": params["tower"]}, images * 2 - 1)
  np.testing.assert_allclose(teacher.apply({"params": params}, images, 4), out["encoded"],
                             atol=1e-5)


def test_resample_features_mode():
  config = teacher_config("tiny_siglip", student_grid=8)  # 64 px -> 8x8 patches
  teacher = Teacher(config)
  images = jax.random.uniform(jax.random.key(0), (1, 64, 64, 3))
  params = teacher.init(jax.random.key(1), images, 8)["params"]
  features = teacher.apply({"params": params}, images, 4, "resample_features")
  assert features.shape == (1, 16, config.width)


def test_grid_mismatch_errors_name_the_fix():
  config = teacher_config("tiny_siglip", student_grid=8)
  teacher = Teacher(config)
  images = jnp.zeros((1, 64, 64, 3))
  params = teacher.init(jax.random.key(1), images, 8)["params"]
  with pytest.raises(InputError, match="grid_match='resample_features'"):
    teacher.apply({"params": params}, images, 4)
  with pytest.raises(InputError, match=r"\[B, H, W, 3\]"):
    teacher.apply({"params": params}, jnp.zeros((1, 64, 64)), 8)
  with pytest.raises(ConfigError, match="Unknown teacher preset"):
    teacher_config("radio")


def test_teacher_input_size_matches_paper_examples():
  assert align_lib.teacher_input_size(16, 14) == 224
  assert align_lib.teacher_input_size(16, 16) == 256
