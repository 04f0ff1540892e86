"""Action and state statistics of a dataset: one vectorised pass, cached as JSON by content hash.

`dataset_statistics` streams the standardised trajectories once (images are never
decoded), concatenates actions [N, A] and states [N, S] and computes mean, std, min,
max, q01, q99 and counts with numpy in one go. The result is cached in
`cache_dir/<name>-<hash>.json`, where the hash covers the dataset's
`dataset_info.json` / `features.json` (shard sizes included), the split's data files
(size, modification time and a hash of their first and last `SAMPLE_BYTES`, so a dataset
rewritten in place with the same metadata is recomputed), the split and the
DatasetSpec plus every transform that changes actions; the log says whether statistics
were computed or read from the cache; the training system copies the
same JSON next to the run and into checkpoint assets. Bad trajectories are counted here:
empty ones are always skipped (count reported), NaN/inf ones are an error unless the
caller opts into skipping them.
"""

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import tensorflow as tf

from vla_jax.actions import NormStats
from vla_jax.data import traj_transforms as tt
from vla_jax.errors import InputError

_FORMAT_VERSION = 1
SAMPLE_BYTES = 1 << 16  # hashed from each end of every data file of the split


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
  """Normalisation statistics of one dataset (after standardisation, before normalisation).

  Attributes:
    action, state: NormStats with [A] / [S] vectors; action.mask False for the gripper.
    num_trajectories, num_frames: counted over kept trajectories.
    num_skipped: {"empty": n, "nonfinite": n} trajectories left out.
    fingerprint: the content hash the cache file is keyed by.
    source: "computed" or "cache" (how this object was obtained).
  """
  action: NormStats
  state: NormStats
  num_trajectories: int
  num_frames: int
  num_skipped: Mapping[str, int]
  fingerprint: str
  source: str = "computed"

  def to_dict(self) -> Dict[str, Any]:
    return {"format_version": _FORMAT_VERSION, "action": self.action.to_dict(),
            "state": self.state.to_dict(), "num_trajectories": self.num_trajectories,
            "num_frames": self.num_frames, "num_skipped": dict(self.num_skipped),
            "fingerprint": self.fingerprint}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], source: str = "cache") -> "DatasetStatistics":
    return cls(action=NormStats.from_dict(data["action"]), state=NormStats.from_dict(data["state"]),
               num_trajectories=int(data["num_trajectories"]), num_frames=int(data["num_frames"]),
               num_skipped=dict(data["num_skipped"]), fingerprint=data["fingerprint"],
               source=source)


def data_files(dataset_dir: str, split: str) -> list:
  """The shards of `split` (slices such as "train[:95%]" read the whole "train" split)."""
  base = str(split).split("[")[0]
  return sorted(tf.io.gfile.glob(os.path.join(dataset_dir, f"*-{base}.*")))


def _update_with_file(digest, path: str) -> None:
  # Size and mtime catch almost every rewrite; the sampled bytes catch a rewrite that
  # kept both (a copy preserving mtimes) without reading whole multi-GB shards.
  info = tf.io.gfile.stat(path)
  digest.update(f"{os.path.basename(path)}:{info.length}:{info.mtime_nsec}".encode())
  with tf.io.gfile.GFile(path, "rb") as f:
    digest.update(f.read(SAMPLE_BYTES))
    if info.length > SAMPLE_BYTES:
      f.seek(max(info.length - SAMPLE_BYTES, SAMPLE_BYTES))
      digest.update(f.read(SAMPLE_BYTES))


def fingerprint(dataset_dir: str, split: str, config: Mapping[str, Any]) -> str:
  """sha256 over the metadata files, the split's data files, the split and the config."""
  digest = hashlib.sha256()
  for name in ("dataset_info.json", "features.json"):
    path = os.path.join(dataset_dir, name)
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, "rb") as f:
        digest.update(f.read())
  for path in data_files(dataset_dir, split):
    _update_with_file(digest, path)
  digest.update(str(split).encode())
  digest.update(json.dumps(config, sort_keys=True, default=str).encode())
  return digest.hexdigest()


def summarize(values: np.ndarray, mask: Optional[np.ndarray] = None) -> NormStats:
  """[N, D] -> NormStats (float64 vectors [D]); an empty array gives zeros."""
  values = np.asarray(values, np.float64)
  if values.shape[0] == 0:
    zeros = np.zeros(values.shape[1])
    return NormStats(zeros, zeros, zeros, zeros, zeros, zeros, mask)
  q01, q99 = np.quantile(values, [0.01, 0.99], axis=0)
  return NormStats(mean=values.mean(0), std=values.std(0), min=values.min(0),
                   max=values.max(0), q01=q01, q99=q99, mask=mask)


def compute_statistics(trajectories: tf.data.Dataset, action_mask, *, skip_nonfinite: bool,
                       fingerprint_: str = "", name: str = "",
                       describe_corruption: Optional[Callable[[], str]] = None
                       ) -> DatasetStatistics:
  """One pass over unfiltered trajectories (images dropped) -> DatasetStatistics.

  Raises InputError on a corrupt shard (naming the shards `describe_corruption()` finds),
  and on NaN/inf trajectories unless skip_nonfinite.
  """
  numeric = trajectories.map(
      lambda t: (t["action"], t["observation"]["state"], t["episode_id"][:1]),
      num_parallel_calls=tf.data.AUTOTUNE).prefetch(8)
  actions, states, bad_ids = [], [], []
  empty = 0
  try:
    for action, state, episode in numeric.as_numpy_iterator():
      if action.shape[0] == 0:
        empty += 1
      elif not (np.isfinite(action).all() and np.isfinite(state).all()):
        bad_ids.append(episode[0].decode())
      else:
        actions.append(action)
        states.append(state)
  except tf.errors.DataLossError as e:
    where = describe_corruption() if describe_corruption else e.message.split("\n")[0]
    raise InputError(f"Dataset {name!r} has corrupt TFRecord data: {where}. Re-download or "
                     "regenerate those shards.") from e
  if bad_ids and not skip_nonfinite:
    raise InputError(f"Dataset {name!r}: {len(bad_ids)} trajectory(ies) contain NaN or inf in "
                     f"actions or states (first: {bad_ids[:3]}). Clean the data, or set "
                     f"skip_bad_episodes=True to leave them out (they are then counted).")
  if not actions:
    raise InputError(f"Dataset {name!r} has no usable trajectory ({empty} empty, "
                     f"{len(bad_ids)} with NaN/inf). Check the split and the data.")
  if empty or bad_ids:
    logging.warning("Dataset %r: skipped %d empty and %d NaN/inf trajectories.", name, empty,
                    len(bad_ids))
  action_values, state_values = np.concatenate(actions), np.concatenate(states)
  return DatasetStatistics(
      action=summarize(action_values, np.asarray(action_mask, bool)),
      state=summarize(state_values), num_trajectories=len(actions),
      num_frames=int(action_values.shape[0]),
      num_skipped={"empty": empty, "nonfinite": len(bad_ids)}, fingerprint=fingerprint_)


def cache_path(cache_dir: str, name: str, key: str) -> str:
  return os.path.join(cache_dir, f"{name}-{key[:16]}.json")


def load_or_compute(cache_dir: str, name: str, key: str, compute) -> DatasetStatistics:
  """Statistics from `cache_dir` when a file with this key exists, else `compute()` and save."""
  path = cache_path(cache_dir, name, key)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      data = json.load(f)
    if data.get("fingerprint") == key and data.get("format_version") == _FORMAT_VERSION:
      logging.info("Statistics of %r read from cache %s (key covers the data files).", name,
                   path)
      return DatasetStatistics.from_dict(data, source="cache")
  logging.info("Statistics of %r computed (no cache entry for this data and config; one "
               "pass, images not decoded); caching them in %s", name, path)
  stats = compute()
  tf.io.gfile.makedirs(cache_dir)
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(stats.to_dict(), f, indent=1)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return stats


def normalize_traj(traj: tt.Traj, stats: DatasetStatistics, mode: str) -> tt.Traj:
  """Normalises action [T, A] and observation/state [T, S] with `stats` (tf, in the pipeline)."""
  out = dict(traj)
  out["action"] = tt.normalize(traj["action"], stats.action.to_dict(), mode)
  observation = dict(traj["observation"])
  observation["state"] = tt.normalize(observation["state"], stats.state.to_dict(), mode)
  out["observation"] = observation
  return out


def unnormalize(values: np.ndarray, stats: NormStats, mode: str) -> np.ndarray:
  """Inverse of the pipeline's normalisation for [..., D] (numpy), e.g. for decoded actions."""
  if mode == "bounds_q99":
    return stats.unnormalize(values)
  return np.where(stats.mask, values * (stats.std + 1e-8) + stats.mean, values)
