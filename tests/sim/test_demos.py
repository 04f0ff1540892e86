"""Expert demos as RLDS: no-op filter, tfds round trip, and the cached bundled dataset."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vla_jax.sim import bundled, demos


def test_noop_filter_drops_tiny_actions_but_keeps_gripper_changes():
  actions = np.array([[0.02, 0, 0, 0, 0, 0, 1],     # moves: kept
                      [0.005, 0, 0, 0, 0, 0.03, 1],  # tiny: dropped
                      [0, 0, 0, 0, 0, 0.1, 1],       # turns: kept
                      [0, 0, 0, 0, 0, 0, 0],         # closes the gripper: kept
                      [0, 0.001, 0, 0, 0, 0, 0]], np.float32)  # tiny, gripper unchanged
  states = np.zeros((5, 7), np.float32)
  states[:, 6] = [1, 1, 1, 1, 0]
  np.testing.assert_array_equal(demos.keep_steps(actions, states),
                                [True, False, True, True, False])


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  # As many val as train episodes: both splits run the expert with one compiled program.
  return str(root), bundled.bundled_dataset_dir(str(root), num_train=3, num_val=3,
                                                progress=False)


def test_bundled_dataset_reads_back_with_the_contract(small_bundle):
  root, path = small_bundle
  assert path.endswith(os.path.join("tabletop", "1.0.0"))
  assert [p for p in os.listdir(root) if p.startswith(".tmp")] == []
  builder = tfds.builder_from_directory(path)
  assert builder.name == "tabletop"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "val": 3}
  steps_spec = builder.info.features["steps"]
  assert steps_spec["observation"]["image"].shape == (64, 64, 3)
  for episode in builder.as_dataset(split="train"):
    meta = episode["episode_metadata"]
    assert meta["split"].numpy() == b"train" and bool(meta["success"])
    steps = list(episode["steps"])
    images = np.stack([s["observation"]["image"].numpy() for s in steps])
    states = np.stack([s["observation"]["state"].numpy() for s in steps])
    actions = np.stack([s["action"].numpy() for s in steps])
    assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3)
    assert states.dtype == np.float32 and states.shape[1:] == (7,)
    assert actions.dtype == np.float32 and actions.shape[1:] == (7,)
    assert set(np.unique(actions[:, 6])) <= {0.0, 1.0}  # absolute gripper, 1 = open
    assert demos.keep_steps(actions, states).all()  # no-ops were filtered
    assert [bool(s["is_first"]) for s in steps] == [True] + [False] * (len(steps) - 1)
    assert bool(steps[-1]["is_last"]) and bool(steps[-1]["is_terminal"])
    assert float(steps[-1]["reward"]) == 1.0
    text = steps[0]["language_instruction"].numpy().decode()
    assert text.startswith("put the ") and meta["object"].numpy().decode() in text
    assert 5 < len(steps) < 60


def test_bundled_dataset_is_cached_and_env_var_respected(small_bundle, monkeypatch, tmp_path):
  root, path = small_bundle
  info = os.path.join(path, "dataset_info.json")
  before = os.path.getmtime(info)
  assert bundled.bundled_dataset_dir(root, num_train=3, num_val=3) == path
  assert os.path.getmtime(info) == before
  monkeypatch.setenv("VLA_JAX_CACHE", str(tmp_path))
  assert bundled.cache_root() == str(tmp_path)
  monkeypatch.delenv("VLA_JAX_CACHE")
  assert bundled.cache_root().endswith(os.path.join(".cache", "vla_jax"))


@pytest.mark.slow  # a VL-Think layout at another resolution: its own compiled programs
def test_demos_of_an_ood_split(tmp_path):
  path = demos.write_demos(str(tmp_path), {"test": ("vlthink_colour", [5, 6])}, image_size=32,
                           progress=False)
  episodes = list(tfds.builder_from_directory(path).as_dataset(split="test"))
  assert len(episodes) == 2
  for episode in episodes:
    step = next(iter(episode["steps"]))
    assert step["observation"]["image"].shape == (32, 32, 3)
    assert episode["episode_metadata"]["receptacle"].numpy().decode().endswith(" board")
