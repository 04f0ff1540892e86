"""Converted (Orbax) checkpoints: round trip, config guard, no half-written output."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import CheckpointError
from vla_jax.models import vit as vit_lib
from vla_jax.weights import convert


def _params(config):
  abstract = vit_lib.abstract_params(config)
  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype)
                                   for k, a in zip(keys, leaves)])


CONFIG = vit_lib.vit_config("mu/16", image_size=32)


def test_round_trip_and_meta(tmp_path):
  params = _params(CONFIG)
  path = convert.save_converted(str(tmp_path / "ckpt"), params, CONFIG, source="x.npz",
                                fmt="big_vision")
  assert not os.path.exists(path + ".partial")
  restored, meta = convert.load_converted(path, CONFIG, vit_lib.abstract_params(CONFIG))
  assert meta["source"] == "x.npz" and meta["config"]["width"] == CONFIG.width
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_bfloat16_export_restores_into_float32(tmp_path):
  params = _params(CONFIG)
  path = convert.save_converted(str(tmp_path / "bf16"), params, CONFIG, dtype="bfloat16")
  restored, _ = convert.load_converted(path, CONFIG, vit_lib.abstract_params(CONFIG))
  leaf = restored["embedding"]["kernel"]
  assert leaf.dtype == jnp.float32
  np.testing.assert_allclose(leaf, params["embedding"]["kernel"], rtol=1e-2, atol=1e-2)


def test_refuses_other_config_and_existing_output(tmp_path):
  path = convert.save_converted(str(tmp_path / "c"), _params(CONFIG), CONFIG)
  other = dataclasses.replace(CONFIG, depth=3)
  with pytest.raises(CheckpointError, match="differing keys: \\['depth'\\]"):
    convert.load_converted(path, other, vit_lib.abstract_params(other))
  with pytest.raises(CheckpointError, match="already exists"):
    convert.save_converted(path, _params(CONFIG), CONFIG)
  with pytest.raises(CheckpointError, match="not a converted checkpoint"):
    convert.read_meta(str(tmp_path))


def test_stale_partial_directory_does_not_block(tmp_path):
  stale = tmp_path / "c.partial"
  stale.mkdir()
  (stale / "junk").write_text("from a crashed conversion")
  path = convert.save_converted(str(tmp_path / "c"), _params(CONFIG), CONFIG)
  assert os.path.isdir(path) and not stale.exists()


def test_teacher_conversions_record_the_experiment_layout_and_older_ones_still_load(tmp_path):
  from vla_jax.models import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  teacher = teacher_lib.TeacherConfig(kind="siglip", tower=CONFIG)
  params = {"tower": _params(CONFIG)}
  abstract = {"tower": vit_lib.abstract_params(CONFIG)}
  path = convert.save_converted(str(tmp_path / "t"), params, teacher)
  assert convert.read_meta(path)["config"] == {"kind": "siglip", "layer": None,
                                               "vit": dataclasses.asdict(CONFIG)}
  convert.load_converted(path, teacher, abstract)
  # Before the teacher registry a conversion recorded {kind, vit, dino: None, layer}.
  meta = {"format_version": convert.FORMAT_VERSION, "config_type": "TeacherConfig",
          "source": "", "format": "big_vision",
          "config": {"kind": "siglip", "vit": dataclasses.asdict(CONFIG), "dino": None,
                     "layer": None}}
  old = convert.write_params(str(tmp_path / "old"), params, {"meta": meta})
  restored, _ = convert.load_converted(old, teacher, abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
