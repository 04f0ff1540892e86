"""Reading RLDS: the Bridge sample with its quirks, the tabletop layout, splits, hosts, bad inputs."""

import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests.data.conftest import tabletop_episode, write_tabletop
from vla_jax.data import oxe, rlds
from vla_jax.data.pipeline import DataConfig, DataSource, make_dataset, make_iterator
from vla_jax.errors import ConfigError, InputError


def _trajectories(path, name, split="train", **kwargs):
  builder = rlds.open_builder(path, name)
  return list(rlds.trajectory_dataset(builder, oxe.get_spec(name), split, **kwargs)
              .as_numpy_iterator())


def _raw_steps(path, split="train"):
  """{tfds_id: (actions [T, 7], states [T, 7], is_last [T])} straight from tfds."""
  builder = tfds.builder_from_directory(path)
  out = {}
  read = tfds.ReadConfig(add_tfds_id=True)
  for episode in builder.as_dataset(split=split, read_config=read):
    steps = list(episode["steps"].as_numpy_iterator())
    out[episode["tfds_id"].numpy().decode()] = (
        np.stack([s["action"] for s in steps]),
        np.stack([s["observation"]["state"] for s in steps]),
        np.array([s["is_last"] for s in steps]))
  return out


def test_bridge_reads_with_its_quirks(bridge_dir):
  raw = _raw_steps(bridge_dir)
  # The sample's episodes are truncated: no step says is_last.
  assert not any(is_last.any() for _, _, is_last in raw.values())
  trajs = _trajectories(bridge_dir, "bridge_dataset")
  assert len(trajs) == len(raw)
  builder = tfds.builder_from_directory(bridge_dir)
  metadata = next(iter(builder.as_dataset(split="train")))["episode_metadata"]
  assert not bool(metadata["has_image_0"])  # the flag says no camera ...
  for traj in trajs:
    actions, states, _ = raw[traj["episode_id"][0].decode()]
    length = actions.shape[0] - 2  # first step dropped, last has no next state
    assert traj["action"].shape == (length, 7) and traj["action"].dtype == np.float32
    assert traj["observation"]["state"].shape == (length, 7)
    np.testing.assert_array_equal(traj["frame_index"], np.arange(1, length + 1))
    # Movement relabelled from the reached state, gripper binarised to {0, 1}.
    np.testing.assert_allclose(traj["action"][:, :6], np.diff(states[1:], axis=0)[:, :6],
                               atol=1e-6)
    assert set(np.unique(traj["action"][:, 6])) <= {0.0, 1.0}
    # ... yet the images are there (encoded, non-trivial JPEGs).
    image = tf.io.decode_jpeg(traj["observation"]["image_primary"][0]).numpy()
    assert image.shape == (64, 64, 3) and image.std() > 5


def test_tabletop_layout_reads_exactly(tabletop_dir):
  raw = _raw_steps(tabletop_dir)
  trajs = _trajectories(tabletop_dir, "tabletop")
  assert sorted(t["episode_id"][0].decode() for t in trajs) == sorted(raw)
  for traj in trajs:
    actions, states, _ = raw[traj["episode_id"][0].decode()]
    np.testing.assert_array_equal(traj["action"], actions)
    np.testing.assert_array_equal(traj["observation"]["state"], states)
    assert traj["language_instruction"][0].startswith(b"put object")


def test_splits_fall_back_to_percentages(tabletop_dir, custom_dir):
  builder = rlds.open_builder(tabletop_dir)
  assert rlds.resolve_split(builder, "train", 0.25) == "train[:75%]"
  assert rlds.resolve_split(builder, "val", 0.25) == "train[75%:]"
  train = _trajectories(tabletop_dir, "tabletop", "train[:75%]")
  val = _trajectories(tabletop_dir, "tabletop", "train[75%:]")
  assert len(train) == 9 and len(val) == 3
  assert not {t["episode_id"][0] for t in train} & {t["episode_id"][0] for t in val}
  with_val = rlds.open_builder(custom_dir)
  assert rlds.resolve_split(with_val, "val") == "val"
  with pytest.raises(InputError, match="splits"):
    rlds.resolve_split(with_val, "test")


def test_hosts_read_disjoint_shards(tabletop_dir):
  seen = []
  for host in range(3):
    split = rlds.host_split("train", host, 3)
    seen.append({t["episode_id"][0] for t in _trajectories(tabletop_dir, "tabletop", split)})
  assert all(len(s) == 4 for s in seen)
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def _config(path, name="tabletop", **kwargs):
  return DataConfig(sources=[DataSource(name=name, data_dir=str(path))], image_size=32,
                    global_batch_size=4, shuffle_buffer=16, **kwargs)


def test_missing_directory_and_unknown_name(tmp_path):
  with pytest.raises(InputError, match="No RLDS dataset found.*dataset_info.json"):
    make_dataset(_config(tmp_path / "nowhere", stats_dir=str(tmp_path)))
  with pytest.raises(ConfigError, match="Unknown dataset 'brige_dataset'.*bridge_dataset.*register"):
    DataSource(name="brige_dataset", data_dir=str(tmp_path))


def test_missing_key_and_wrong_action_dim(tabletop_dir):
  builder = rlds.open_builder(tabletop_dir)
  spec = oxe.get_spec("tabletop")
  wrong_key = oxe.DatasetSpec(name="t", image_keys={"primary": "rgb"}, state_dim=7)
  with pytest.raises(InputError, match=r"observation/rgb \(camera 'primary'\).*observation/image"):
    rlds.check_features(builder, wrong_key)
  wrong_dim = oxe.DatasetSpec(name="t", image_keys=spec.image_keys, action_dim=8)
  with pytest.raises(InputError, match="expects 8-D actions.*give 7"):
    rlds.check_features(builder, wrong_dim)


def test_corrupt_shard_is_a_clear_error(bridge_dir, tmp_path):
  copy = tmp_path / "bridge_dataset" / "1.0.0"
  shutil.copytree(bridge_dir, copy)
  shard = copy / "bridge_dataset-train.tfrecord-00000-of-00001"
  shard.chmod(0o644)
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  # Found before anything reads the data, naming the shard and how much of it is left.
  with pytest.raises(InputError, match=r"split 'train': bridge_dataset-train.tfrecord-00000-"
                     r"of-00001 holds \d+ readable episodes of 25 \(.*truncated record"):
    make_dataset(_config(copy, "bridge_dataset", stats_dir=str(tmp_path / "s")))
  shard.write_bytes(b"")
  with pytest.raises(InputError, match=r"tfrecord-00000-of-00001 is empty \(0 bytes; 25 "
                     r"episodes expected\)\. Re-download"):
    make_dataset(_config(copy, "bridge_dataset", stats_dir=str(tmp_path / "s")))
  shard.unlink()
  with pytest.raises(InputError, match=r"tfrecord-00000-of-00001 is missing"):
    make_dataset(_config(copy, "bridge_dataset", stats_dir=str(tmp_path / "s")))


def test_corruption_found_while_reading_names_the_shard(bridge_dir, tmp_path):
  """A flipped byte keeps the shard's size: the CRC fails mid-stream, and the error says
  which shard and how far it reads (found by reading every shard once the error is there)
  instead of TensorFlow's bare DataLossError."""
  copy = tmp_path / "bridge_dataset" / "1.0.0"
  shutil.copytree(bridge_dir, copy)
  config = _config(copy, "bridge_dataset", stats_dir=str(tmp_path / "s"))
  make_dataset(config)  # statistics computed (and cached) while the data is intact
  shard = copy / "bridge_dataset-train.tfrecord-00000-of-00001"
  shard.chmod(0o644)
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  # The statistics cache sees the changed file and reads it again: that pass fails first.
  with pytest.raises(InputError, match=r"bridge_dataset-train.tfrecord-00000-of-00001 holds "
                     r"\d+ readable episodes of 25 \(corrupted record at \d+\)"):
    iterator = make_iterator(config, train=False)
    for _ in range(100):
      next(iterator)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  """4 good episodes, one with NaN actions, one empty."""
  episodes = [tabletop_episode(i, 6) for i in range(4)]
  nan = tabletop_episode(4, 6)
  nan["steps"][2]["action"][1] = np.nan
  empty = {"steps": [], "episode_metadata": {"seed": 5}}
  return write_tabletop(tmp_path_factory.mktemp("bad"), episodes=episodes + [nan, empty])


def test_nan_actions_raise_unless_skipped_and_empty_episodes_are_counted(bad_dir, tmp_path):
  with pytest.raises(InputError, match="1 trajectory.*NaN or inf.*skip_bad_episodes"):
    make_dataset(_config(bad_dir, stats_dir=str(tmp_path), val_fraction=0.0))
  dataset, info = make_dataset(_config(bad_dir, stats_dir=str(tmp_path), val_fraction=0.0,
                                       skip_bad_episodes=True), train=False)
  stats = info["statistics"]["tabletop"]
  assert stats.num_skipped == {"empty": 1, "nonfinite": 1}
  assert stats.num_trajectories == 4 and stats.num_frames == 24
  frames = sum(len(b["frame_index"]) for b in dataset.as_numpy_iterator())
  assert frames == 24
