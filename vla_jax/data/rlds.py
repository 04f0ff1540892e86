"""Read one RLDS dataset from disk into standardised trajectories.

`open_builder` finds the dataset folder (the version folder with `dataset_info.json`,
or its parent `data_dir/name/` with the newest version) and opens it with
`tfds.builder_from_directory` (local or `gs://` paths). `resolve_split` maps `train` /
`val` onto the splits the dataset has (a percentage of `train` when there is no `val`),
`host_split` gives each process a disjoint part, and `trajectory_dataset` yields one
standardised trajectory per episode (see `traj_transforms` for the layout) with the
images still encoded, so the expensive decode happens per frame after shuffling.

Quirks handled here: episode boundaries come from the RLDS example, never from
`is_first` / `is_last` (BridgeData has truncated episodes without `is_last`); camera
presence comes from the spec, never from `episode_metadata/has_image_*` (BridgeData's
flags say False for cameras that are present).
"""

import os
import re
from typing import Any, Dict, List, Optional, Tuple

import tensorflow as tf
import tensorflow_datasets as tfds

from vla_jax.data import oxe
from vla_jax.data import traj_transforms as tt
from vla_jax.errors import InputError

_SLICE = re.compile(r"^(.*)\[(\d*):(\d*)\]$")


def find_dataset_dir(data_dir: str, name: Optional[str] = None) -> str:
  """The folder holding `dataset_info.json`: `data_dir` itself or `data_dir/name/<newest>`."""
  data_dir = os.fspath(data_dir)
  candidates = [data_dir]
  if name:
    parent = os.path.join(data_dir, name)
    if tf.io.gfile.isdir(parent):
      versions = sorted((v for v in tf.io.gfile.listdir(parent) if v[:1].isdigit()),
                        key=lambda v: tuple(int(p) for p in re.findall(r"\d+", v)))
      candidates += [os.path.join(parent, v.rstrip("/")) for v in reversed(versions)]
  for path in candidates:
    if tf.io.gfile.exists(os.path.join(path, "dataset_info.json")):
      return path
  raise InputError(
      f"No RLDS dataset found at {data_dir!r}" + (f" (nor {data_dir}/{name}/<version>)" if name
                                                   else "") +
      ": expected a folder with dataset_info.json, features.json and *.tfrecord-* shards. "
      f"Point data_dir at the dataset's version folder (e.g. .../bridge_dataset/1.0.0) or at "
      f"the folder that contains `{name or '<name>'}/<version>/`.")


def open_builder(data_dir: str, name: Optional[str] = None):
  """tfds builder for the RLDS dataset in `data_dir` (see `find_dataset_dir`)."""
  path = find_dataset_dir(data_dir, name)
  try:
    return tfds.builder_from_directory(path)
  except Exception as e:  # tfds raises several types for unreadable metadata.
    raise InputError(f"Cannot open the RLDS dataset at {path}: {type(e).__name__}: {e}. "
                     f"Check that dataset_info.json and features.json are intact.") from e


def resolve_split(builder, split: str, val_fraction: float = 0.05) -> str:
  """`split` as a TFDS split string the dataset has.

  "train"/"val" without a `val` split become "train[:95%]" / "train[95%:]" (for
  val_fraction 0.05). Any other TFDS split string (e.g. "train[:10]") is used as is.
  """
  available = set(builder.info.splits.keys())
  base = split.split("[")[0]
  if base in available:
    if base == "train" and "val" not in available and split == "train" and val_fraction > 0:
      return f"train[:{round(100 * (1 - val_fraction))}%]"
    return split
  if base == "val" and "train" in available and val_fraction > 0:
    return f"train[{round(100 * (1 - val_fraction))}%:]"
  raise InputError(f"Split {split!r} not in dataset {builder.name!r}, which has splits "
                   f"{sorted(available)}; use one of them (or a slice such as 'train[:90%]').")


TFRECORD_FRAMING = 16  # bytes around each record: length, its CRC, data CRC


def _count_records(path: str) -> Tuple[int, str]:
  """(records readable from a TFRecord file, the read error or "")."""
  count = 0
  try:
    for _ in tf.data.TFRecordDataset(path):
      count += 1
  except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
    message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", e.message.split("\n")[0])
    return count, message.strip()
  return count, ""


def unreadable_shards(builder, split: str) -> List[str]:
  """Each shard of `split`'s base split that cannot be read in full, with what is wrong
  (reads every shard: for error messages, not for every run)."""
  info = builder.info.splits[split.split("[")[0]]
  problems = []
  for path, length in zip(info.filepaths, info.shard_lengths):
    count, error = _count_records(os.fspath(path))
    if error or count != length:
      problems.append(f"{os.path.basename(os.fspath(path))} holds {count} readable episodes "
                      f"of {length}" + (f" ({error})" if error else ""))
  return problems


def check_shards(builder, split: str) -> None:
  """InputError naming each missing, empty or truncated shard of `split`'s base split.

  Compares the shard files with `dataset_info.json` (episodes per shard, bytes per split)
  before anything reads them: an empty shard otherwise surfaces as TensorFlow's "Input
  dataset was expected to contain N elements but contained only 0" from deep inside the
  statistics pass. Local datasets only (a cloud bucket would need a stat per shard).
  """
  base = split.split("[")[0]
  info = builder.info.splits[base]
  paths = [os.fspath(p) for p in info.filepaths]
  if not paths or "://" in paths[0]:
    return
  lengths = list(info.shard_lengths)
  problems = []
  sizes = []
  for path, length in zip(paths, lengths):
    if not os.path.exists(path):
      problems.append(f"{os.path.basename(path)} is missing ({length} episodes expected)")
      sizes.append(0)
      continue
    sizes.append(os.path.getsize(path))
    if sizes[-1] == 0 and length > 0:
      problems.append(f"{os.path.basename(path)} is empty (0 bytes; {length} episodes "
                      "expected)")
  expected_bytes = int(info.num_bytes) + TFRECORD_FRAMING * sum(lengths)
  if not problems and info.num_bytes and sum(sizes) != expected_bytes:
    problems = unreadable_shards(builder, split)  # only now: say which shard is cut
    if not problems:
      problems.append(f"its shards hold {sum(sizes)} bytes where dataset_info.json implies "
                      f"{expected_bytes}")
  if problems:
    raise InputError(f"RLDS dataset {builder.data_dir}, split {base!r}: " + "; ".join(problems)
                     + ". Re-download or regenerate those shards (or the dataset).")


def host_split(split: str, process_index: int, process_count: int):
  """This process's disjoint share (by episodes) of `split`."""
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def _feature_at(features, path: str):
  """(feature, shape) of `path` ("observation/state" style) in the step FeaturesDict."""
  node = features
  for part in path.split("/"):
    if not hasattr(node, "keys") or part not in node.keys():
      raise KeyError(part)
    node = node[part]
  return node


def _split_slice(key: str) -> Tuple[str, Optional[slice]]:
  match = _SLICE.match(key)
  if not match:
    return key, None
  start, stop = (int(v) if v else None for v in match.group(2, 3))
  return match.group(1), slice(start, stop)


def _step_paths(spec: oxe.DatasetSpec) -> Dict[str, str]:
  """Every step key the spec reads, as step-level paths, by what it is used for."""
  paths = {}
  for role, key in spec.image_keys:
    paths[f"camera {role!r}"] = f"observation/{key}"
  for key in spec.state_keys:
    paths[f"state {key!r}"] = f"observation/{_split_slice(key)[0]}"
  for key in spec.action_keys:
    paths[f"action {key!r}"] = _split_slice(key)[0]
  paths["language"] = spec.language_key
  return paths


def _width(shape, sliced: Optional[slice]) -> int:
  width = int(shape[-1]) if len(shape) else 1
  return len(range(width)[sliced]) if sliced is not None else width


def check_features(builder, spec: oxe.DatasetSpec) -> None:
  """InputError unless the dataset has every key of `spec` and the action dimension adds up."""
  steps = builder.info.features["steps"].feature
  missing = []
  for use, path in _step_paths(spec).items():
    try:
      _feature_at(steps, path)
    except KeyError:
      missing.append(f"{path} ({use})")
  if missing:
    raise InputError(
        f"Dataset {builder.name!r} at {builder.data_dir} has no feature(s) {missing} that spec "
        f"{spec.name!r} reads. Its step features are: {_describe(steps)}. Fix the keys in the "
        f"DatasetSpec (image_keys / state_keys / action_keys / language_key).")
  width = sum(_width(_feature_at(steps, _split_slice(k)[0]).shape, _split_slice(k)[1])
              for k in spec.action_keys)
  width += 1 if spec.gripper == "none" else 0
  if "pad_rotation" in spec.quirks:
    width = max(width, spec.action_dim)
  if width != spec.action_dim:
    raise InputError(
        f"Dataset {builder.name!r}: spec {spec.name!r} expects {spec.action_dim}-D actions, but "
        f"{list(spec.action_keys)} give {width} dimension(s). Set action_dim={width} in the spec "
        f"or fix action_keys.")


def _describe(features, prefix: str = "") -> str:
  parts = []
  for key in features.keys():
    value = features[key]
    if hasattr(value, "keys"):
      parts.append(_describe(value, f"{prefix}{key}/"))
    else:
      parts.append(f"{prefix}{key} {tuple(value.shape)}")
  return ", ".join(parts)


def _get(steps: Dict[str, Any], key: str) -> tf.Tensor:
  """Leaf at "a/b[i:j]" in the batched steps dict, as [T, ...]."""
  path, sliced = _split_slice(key)
  node = steps
  for part in path.split("/"):
    node = node[part]
  return node if sliced is None else node[..., sliced]


def _as_columns(x: tf.Tensor) -> tf.Tensor:
  """[T] or [T, ...] numeric -> [T, D] float32."""
  x = tf.cast(x, tf.float32)
  return tf.reshape(x, [tf.shape(x)[0], -1]) if x.shape.rank != 1 else x[:, None]


def _decode_zlib(values: tf.Tensor, width: int) -> tf.Tensor:
  """[T] zlib-compressed float32 bytes (kuka) -> [T, width]."""
  raw = tf.map_fn(lambda v: tf.io.decode_raw(tf.io.decode_compressed(v, "ZLIB"), tf.float32),
                  values, fn_output_signature=tf.TensorSpec([None], tf.float32))
  return tf.reshape(raw, [-1, width])


def _language(steps: Dict[str, Any], spec: oxe.DatasetSpec) -> tf.Tensor:
  text = _get(steps, spec.language_key)
  if "language_table_text" in spec.quirks:
    # Unicode code points padded with zeros -> the text before the first NUL.
    encoded = tf.strings.unicode_encode(tf.cast(text, tf.int32), "UTF-8")
    text = tf.strings.split(encoded, "\x00")[:, :1].to_tensor(default_value="")[:, 0]
  return text


def standardize(episode: Dict[str, Any], spec: oxe.DatasetSpec) -> tt.Traj:
  """A raw RLDS episode (steps batched, images undecoded) -> the common trajectory dict."""
  steps = episode["steps"]
  observation = {f"image_{role}": _get(steps, f"observation/{key}")
                 for role, key in spec.image_keys}
  state_parts = []
  for key in spec.state_keys:
    value = _get(steps, f"observation/{key}")
    if "zlib_state" in spec.quirks and value.dtype == tf.string:
      value = _decode_zlib(value, 7 if "pose" in key else 1)
    state_parts.append(_as_columns(value))
  length = tf.shape(steps["action"] if "action" in steps else _get(steps, spec.action_keys[0]))[0]
  observation["state"] = (tf.concat(state_parts, axis=-1) if state_parts
                          else tf.zeros([length, 0], tf.float32))
  action = tf.concat([_as_columns(_get(steps, k)) for k in spec.action_keys], axis=-1)
  traj = {"observation": observation, "action": action,
          "language_instruction": _language(steps, spec),
          "episode_id": tf.fill([length], episode["tfds_id"]),
          "frame_index": tf.range(length, dtype=tf.int32)}
  if "drop_first_step" in spec.quirks:
    traj = tt.drop_first_step(traj)
  traj["action"] = tt.standardize_gripper(traj["action"], spec.gripper, spec.binarize_gripper)
  if "relabel_from_state" in spec.quirks:
    traj = tt.relabel_from_state(traj)
  if "pad_rotation" in spec.quirks:
    traj["action"] = tt.pad_movement(traj["action"], spec.action_dim)
  traj["action"] = tf.ensure_shape(traj["action"], [None, spec.action_dim])
  return traj


def raw_episodes(builder, split, *, shuffle: bool, seed: int) -> tf.data.Dataset:
  """Episodes with steps batched ([T, ...] leaves) and images left encoded."""
  read_config = tfds.ReadConfig(shuffle_seed=seed if shuffle else None, add_tfds_id=True,
                                interleave_cycle_length=4)
  return builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                            decoders={"steps": tfds.decode.SkipDecoding()})


def trajectory_dataset(builder, spec: oxe.DatasetSpec, split, *, shuffle: bool = False,
                       seed: int = 0, drop_bad: bool = True,
                       num_parallel_calls: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
  """Standardised trajectories of one dataset split.

  Args:
    builder: from `open_builder`; `check_features` is run first.
    spec: the dataset's DatasetSpec.
    split: a TFDS split (after `resolve_split` / `host_split`).
    shuffle: shuffle shard order (deterministic under `seed`).
    drop_bad: drop empty trajectories and ones with NaN/inf in actions or states (their
      count is reported by `stats.compute_statistics`, which sees the unfiltered stream).
  Returns:
    tf.data.Dataset of trajectory dicts (see `traj_transforms`).
  """
  check_features(builder, spec)
  ds = raw_episodes(builder, split, shuffle=shuffle, seed=seed)
  ds = ds.map(lambda episode: standardize(episode, spec), num_parallel_calls=num_parallel_calls,
              deterministic=True)
  if drop_bad:
    ds = ds.filter(lambda traj: tf.logical_and(tt.traj_len(traj) > 0, tt.is_finite(traj)))
  return ds
