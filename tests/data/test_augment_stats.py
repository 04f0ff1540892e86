"""Image preprocessing (train / eval / serving) and normalisation statistics."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from vla_jax.actions import NormStats
from vla_jax.data import augment, oxe, rlds, stats as stats_lib
from vla_jax.data.pipeline import DataConfig, DataSource, make_dataset, open_source

IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
SEED = tf.constant([3, 7], tf.int64)


def test_preprocess_shapes_and_augmentation_on_off():
  train = augment.preprocess_image(IMAGE, 32, train=True, seed=SEED).numpy()
  again = augment.preprocess_image(IMAGE, 32, train=True, seed=SEED).numpy()
  other = augment.preprocess_image(IMAGE, 32, train=True, seed=SEED + 1).numpy()
  evaluation = augment.preprocess_image(IMAGE, 32, train=False).numpy()
  assert train.shape == evaluation.shape == (32, 32, 3) and train.dtype == np.uint8
  np.testing.assert_array_equal(train, again)  # stateless: same seed, same pixels
  assert np.abs(train.astype(int) - other).mean() > 1
  assert np.abs(train.astype(int) - evaluation).mean() > 1
  off = augment.AugmentConfig(enabled=False)
  plain = augment.preprocess_image(IMAGE, 32, train=True, config=off, seed=SEED).numpy()
  np.testing.assert_array_equal(plain, augment.preprocess_image(IMAGE, 32, train=False,
                                                                config=off).numpy())


def test_eval_centre_crop_is_the_middle_of_the_resized_image():
  # A centred bright square survives the 0.9-area centre crop; the border does not.
  image = np.zeros((100, 100, 3), np.uint8)
  image[2:98, 2:98] = 200
  out = augment.preprocess_image(image, 50, train=False).numpy()
  assert out[0, 0].min() > 150 and out[25, 25].min() > 190


def _config(path, name, stats_dir, **kwargs):
  return DataConfig(sources=[DataSource(name=name, data_dir=str(path))], image_size=40,
                    global_batch_size=4, shuffle_buffer=16, stats_dir=stats_dir, **kwargs)


def test_eval_pipeline_equals_serving(bridge_dir, stats_dir):
  dataset, _ = make_dataset(_config(bridge_dir, "bridge_dataset", stats_dir), train=False)
  batch = next(dataset.as_numpy_iterator())
  # The same frames, decoded as a camera would deliver them, through the serving path.
  builder = rlds.open_builder(bridge_dir)
  traj = next(rlds.trajectory_dataset(builder, oxe.get_spec("bridge_dataset"), "train[:95%]")
              .as_numpy_iterator())
  for row in range(4):
    camera = tf.io.decode_jpeg(traj["observation"]["image_primary"][row]).numpy()
    served = augment.preprocess_for_serving(camera, 40)
    np.testing.assert_array_equal(batch["observation"]["image_primary"][row], served)


def test_statistics_cache_and_json(tabletop_dir, stats_dir):
  config = _config(tabletop_dir, "tabletop", stats_dir)
  first = open_source(config, config.sources[0]).statistics
  second = open_source(config, config.sources[0]).statistics
  assert first.source == "computed" and second.source == "cache"
  np.testing.assert_array_equal(first.action.q99, second.action.q99)
  files = os.listdir(stats_dir)
  assert len(files) == 1 and json.load(open(os.path.join(stats_dir, files[0])))["num_frames"] == \
      first.num_frames
  # A different transform is a different cache entry.
  noops = _config(tabletop_dir, "tabletop", stats_dir, filter_noops=True)
  assert open_source(noops, noops.sources[0]).statistics.source == "computed"
  assert first.action.mask.tolist() == [True] * 6 + [False]


def test_statistics_are_the_numpy_statistics():
  values = np.random.default_rng(1).normal(size=(500, 3)) * [1, 2, 3]
  summary = stats_lib.summarize(values)
  np.testing.assert_allclose(summary.q01, np.quantile(values, 0.01, axis=0))
  np.testing.assert_allclose(summary.std, values.std(0))
  np.testing.assert_allclose(summary.max, values.max(0))


@pytest.mark.parametrize("mode", ["bounds_q99", "normal"])
def test_normalisation_round_trip(mode):
  rng = np.random.default_rng(2)
  values = rng.normal(size=(200, 7)).astype(np.float32)
  values[:, -1] = rng.integers(0, 2, 200)
  stats = stats_lib.summarize(values, [True] * 6 + [False])
  normed = stats_lib.normalize_traj({"action": tf.constant(values),
                                     "observation": {"state": tf.constant(values)}},
                                    stats_lib.DatasetStatistics(stats, stats, 1, 200, {}, ""),
                                    mode)["action"].numpy()
  np.testing.assert_array_equal(normed[:, -1], values[:, -1])  # gripper untouched
  back = stats_lib.unnormalize(normed.astype(np.float64), stats, mode)
  inside = np.all((values >= stats.q01) & (values <= stats.q99), axis=1)
  if mode == "bounds_q99":
    assert normed.min() >= -1 and normed.max() <= 1
    np.testing.assert_allclose(back[inside], values[inside], atol=1e-5)
    # The same numbers as the model side's normalisation (vla_jax.actions).
    np.testing.assert_allclose(normed, NormStats.from_dict(stats.to_dict()).normalize(values),
                               atol=1e-6)
  else:
    np.testing.assert_allclose(back, values, atol=1e-5)
    np.testing.assert_allclose(normed[:, :6].mean(0), 0, atol=1e-5)


def _scale_actions_in_place(path, factor):
  """Rewrites one TFRecord shard with every action times `factor` (metadata untouched)."""
  examples = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
  with tf.io.TFRecordWriter(path) as writer:
    for example in examples:
      action = example.features.feature["steps/action"].float_list.value
      action[:] = [factor * a for a in action]
      writer.write(example.SerializeToString())


def test_statistics_cache_sees_data_rewritten_in_place(tabletop_dir, stats_dir, tmp_path):
  data_dir = shutil.copytree(tabletop_dir, str(tmp_path / "data"))  # the fixture is shared
  config = _config(data_dir, "tabletop", stats_dir)
  first = open_source(config, config.sources[0]).statistics
  metadata = {n: open(os.path.join(data_dir, n), "rb").read()
              for n in ("dataset_info.json", "features.json")}
  shards = stats_lib.data_files(data_dir, "train[:95%]")
  assert shards and all("-train." in s for s in shards)
  for shard in shards:
    _scale_actions_in_place(shard, 100.0)
  assert metadata == {n: open(os.path.join(data_dir, n), "rb").read() for n in metadata}
  second = open_source(config, config.sources[0]).statistics
  assert first.source == "computed" and second.source == "computed"
  mask = first.action.mask
  np.testing.assert_allclose(second.action.q99[mask], 100 * first.action.q99[mask], rtol=1e-4)
