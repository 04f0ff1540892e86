"""Fixtures of the data tests: small RLDS datasets in the tabletop layout, written once."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vla_jax.data import oxe
from vla_jax.data.writer import write_rlds

METADATA = {"seed": tfds.features.Scalar(dtype=np.int64)}


def tabletop_episode(index: int, length: int, *, image_value: int | None = None):
  """One episode in the tabletop contract: 64x64 JPEG, state/action float32[7], gripper in [0, 1]."""
  rng = np.random.default_rng(index)
  ramp = np.linspace(0, 255, 64, dtype=np.float32)
  steps = []
  for t in range(length):
    shade = (37 * index + 11 * t) % 256 if image_value is None else image_value
    image = np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1),
                      np.full((64, 64), shade, np.float32)], -1).astype(np.uint8)
    action = rng.normal(scale=0.05, size=7).astype(np.float32)
    action[-1] = float(t < length // 2)  # absolute gripper, 1 = open
    steps.append({"observation": {"image": image,
                                  "state": rng.normal(size=7).astype(np.float32)},
                  "action": action, "language_instruction": f"put object {index % 4} on the plate",
                  "is_first": t == 0, "is_last": t == length - 1,
                  "is_terminal": t == length - 1, "reward": float(t == length - 1),
                  "discount": 1.0})
  return {"steps": steps, "episode_metadata": {"seed": index}}


def write_tabletop(data_dir, name="tabletop", episodes=None, val=None):
  episodes = episodes if episodes is not None else [
      tabletop_episode(i, 6 + i % 5) for i in range(12)]
  splits = {"train": lambda: episodes}
  if val is not None:
    splits["val"] = lambda: val
  return write_rlds(str(data_dir), name, splits, metadata_features=METADATA)


@pytest.fixture(scope="session")
def tabletop_dir(tmp_path_factory):
  """The tabletop-layout dataset (12 train episodes of 6..10 steps, no val split)."""
  return write_tabletop(tmp_path_factory.mktemp("tabletop"))


@pytest.fixture(scope="session")
def custom_dir(tmp_path_factory):
  """A second dataset registered as configuration only ("my_tabletop")."""
  oxe.register(dataclasses.replace(oxe.get_spec("tabletop"), name="my_tabletop"),
               overwrite=True)
  episodes = [tabletop_episode(100 + i, 8) for i in range(6)]
  return write_tabletop(tmp_path_factory.mktemp("custom"), "my_tabletop", episodes,
                        val=[tabletop_episode(200, 8)])


@pytest.fixture(scope="session")
def bridge_dir(shared_data):
  return str(shared_data / "bridge_dataset" / "1.0.0")


@pytest.fixture()
def stats_dir(tmp_path):
  return str(tmp_path / "stats")
