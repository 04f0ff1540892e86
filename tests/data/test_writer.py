"""write_rlds produces RLDS that tfds.builder_from_directory reads back exactly."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vla_jax.data.writer import openx_step_features, write_rlds
from vla_jax.errors import InputError


def _episode(index, length=4):
  rng = np.random.default_rng(index)
  ramp = np.linspace(0, 255, 64, dtype=np.float32)
  image = np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1),
                    np.full((64, 64), 40.0 * index)], axis=-1).astype(np.uint8)
  steps = [{"observation": {"image": image,
                            "state": rng.normal(size=7).astype(np.float32)},
            "action": rng.normal(size=7).astype(np.float32),
            "language_instruction": f"put object {index} on the plate",
            "is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
            "reward": float(t == length - 1), "discount": 1.0} for t in range(length)]
  return {"steps": steps, "episode_metadata": {"seed": index}}


def test_round_trip(tmp_path):
  episodes = {"train": [_episode(i) for i in range(3)], "val": [_episode(10)]}
  path = write_rlds(str(tmp_path), "toy_rlds", {k: (lambda v=v: v) for k, v in episodes.items()},
                    metadata_features={"seed": tfds.features.Scalar(dtype=np.int64)})
  builder = tfds.builder_from_directory(path)
  assert builder.info.splits["train"].num_examples == 3
  read = list(builder.as_dataset(split="train"))
  assert sorted(int(e["episode_metadata"]["seed"]) for e in read) == [0, 1, 2]
  for episode in read:
    original = episodes["train"][int(episode["episode_metadata"]["seed"])]
    steps = list(episode["steps"])
    assert len(steps) == 4 and bool(steps[-1]["is_last"]) and bool(steps[0]["is_first"])
    np.testing.assert_array_equal(steps[1]["action"], original["steps"][1]["action"])
    assert steps[0]["language_instruction"].numpy().decode() == \
        original["steps"][0]["language_instruction"]
    # JPEG is lossy; the image must still be close.
    diff = np.abs(steps[2]["observation"]["image"].numpy().astype(int) -
                  original["steps"][2]["observation"]["image"].astype(int))
    assert steps[2]["observation"]["image"].shape == (64, 64, 3) and diff.mean() < 3


def test_refuses_to_overwrite_and_bad_names(tmp_path):
  splits = {"train": lambda: [_episode(0)]}
  write_rlds(str(tmp_path), "toy_rlds", splits,
             metadata_features={"seed": tfds.features.Scalar(dtype=np.int64)})
  with pytest.raises(InputError, match="already exists"):
    write_rlds(str(tmp_path), "toy_rlds", splits)
  with pytest.raises(InputError, match="snake_case"):
    write_rlds(str(tmp_path), "Toy-RLDS", splits)
  assert openx_step_features(image_keys=("image_0", "image_1"))["observation"].keys() == {
      "image_0", "image_1", "state"}
