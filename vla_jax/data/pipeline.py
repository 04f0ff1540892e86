"""From a typed data config to host batches: the entry point the training system calls.

`make_dataset(config)` builds, for every source, standardised trajectories (rlds.py,
oxe.py) with their statistics (stats.py), normalises, filters and chunks them
(traj_transforms.py), flattens them to frames, mixes the sources (mixture.py), shuffles
undecoded frames, numbers each frame, decodes and preprocesses its images
(augment.py, the same function serving uses) and batches per host: by default every
host reads the one global frame stream and keeps its rows of each global batch, so the
hosts' batches together are exactly the batch of a single-process run
(`host_sharding="global"`; "episodes" gives each host its own episodes instead, see
DataConfig). `make_iterator` wraps it in a `DataIterator` that adds OpenVLA
prompt/action tokens (batching.py) and records its position: the order is a pure function of the seed, and each frame's
augmentation a pure function of the seed and the frame's number, so resuming at batch
n (`state()` -> `make_iterator(config, state=...)`) skips n host batches of undecoded
frames and then yields exactly what the uninterrupted run would have.

Batch layout (B = host batch, H = action_horizon, W = window_size, S = image_size):
  observation/image_<role>  uint8 [B, S, S, 3]   ([B, W, S, S, 3] when W > 1)
  observation/state         float32 [B, D_state] ([B, W, D_state], plus pad_mask [B, W])
  action                    float32 [B, H, A] normalised; action_pad_mask bool [B, H]
  language_instruction      bytes [B]; episode_id bytes [B]; frame_index, dataset_index int32 [B]
  tokens, loss_mask, attention_mask  [B, max_length] when `tokenizer` is set
"""

import dataclasses
import logging
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import jax
import tensorflow as tf

from vla_jax.actions import ActionTokenizer
from vla_jax.data import augment as augment_lib
from vla_jax.data import batching
from vla_jax.data import mixture
from vla_jax.data import oxe
from vla_jax.data import rlds
from vla_jax.data import stats as stats_lib
from vla_jax.data import traj_transforms as tt
from vla_jax.errors import InputError
from vla_jax.typed_config import from_mapping, require, require_positive_ints

# TensorFlow is only the input pipeline: keep it off the accelerators JAX uses.
tf.config.set_visible_devices([], "GPU")

NORMALIZATION_MODES = ("bounds_q99", "normal")
HOST_SHARDING_MODES = ("global", "episodes")


@dataclasses.dataclass(frozen=True)
class DataSource:
  """One dataset of the mixture.

  Attributes:
    name: registry name (vla_jax.data.oxe), e.g. "bridge_dataset", "tabletop".
    data_dir: the dataset's version folder, or a folder holding `name/<version>/`.
    weight: relative sampling weight in the mixture.
    split: "train", "val" (a tail of train when the dataset has no val) or a TFDS split.
  """
  name: str
  data_dir: str
  weight: float = 1.0
  split: str = "train"

  def __post_init__(self):
    oxe.get_spec(self.name)  # unknown names fail here, with the list of known ones.
    require(isinstance(self.weight, (int, float)) and self.weight >= 0,
            f"data.sources[{self.name}].weight must be >= 0, got {self.weight!r}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The input pipeline. Validated on construction; `from_mapping(DataConfig, dict)` works.

  Attributes:
    sources: DataSource entries (mappings are accepted).
    image_size: square side of the model input (224 for OpenVLA).
    image_roles: cameras to emit, e.g. ("primary",) or ("primary", "wrist").
    augment: AugmentConfig (or mapping); train-time augmentation / eval centre crop.
    global_batch_size: frames per step over all hosts.
    host_sharding: how hosts share the data. "global": every host reads the whole
      stream in the order a single process would (same seed) and keeps its own
      host_batch rows of each global batch, decoding only those: a run on N hosts sees
      exactly the batches of a run on one, but each host reads (not decodes) every
      frame. "episodes": each host reads a disjoint 1/N of the episodes (reading scales
      with the hosts; the batches then depend on the number of hosts).
    shuffle_buffer: frame-level shuffle buffer (undecoded frames, see mixture.py).
    shuffle_ram_budget_mb: cap the shuffle buffer to this much host RAM (None = no cap).
    balance_weights: multiply source weights by their frame counts.
    normalization: "bounds_q99" (OpenVLA, clipped to [-1, 1]) or "normal".
    action_horizon: H actions per frame (1 for OpenVLA).
    window_size: W observation frames per sample (1 = no window axis).
    filter_noops: drop steps that barely move (translation < noop_translation and
      rotation < noop_rotation, gripper unchanged), as the paper.
    val_fraction: share of `train` used as `val` when the dataset has no val split.
    skip_bad_episodes: leave out NaN/inf trajectories (counted) instead of raising.
    seed: decides file order, mixing, shuffling and augmentation.
    stats_dir: where statistics JSON files are cached.
    tokenizer: path of the Llama-2 tokenizer; None = no tokens in the batch.
    max_length: padded token length.
    pad_id: padding id (None: the tokenizer's, else its vocab size, OpenVLA's <PAD>).
    proprio_dims: state dimensions written into each prompt as number tokens
      (batching.py); () = OpenVLA's image-and-instruction prompt. The tabletop state is
      (x, y, z, roll, pitch, yaw, gripper), so (2, 6) gives height and gripper opening.
    num_parallel_calls: tf.data parallelism (-1 = AUTOTUNE).
    tf_ram_budget_mb: tf.data autotune RAM budget (None = tf.data's default).
  """
  sources: Tuple[Any, ...]
  image_size: int = 224
  image_roles: Tuple[str, ...] = ("primary",)
  augment: Any = augment_lib.AugmentConfig()
  global_batch_size: int = 8
  host_sharding: str = "global"
  shuffle_buffer: int = 10_000
  shuffle_ram_budget_mb: Optional[float] = None
  balance_weights: bool = False
  normalization: str = "bounds_q99"
  action_horizon: int = 1
  window_size: int = 1
  filter_noops: bool = False
  noop_translation: float = 0.01
  noop_rotation: float = 0.06
  val_fraction: float = 0.05
  skip_bad_episodes: bool = False
  seed: int = 0
  stats_dir: str = os.path.join("~", ".cache", "vla_jax", "stats")
  tokenizer: Optional[str] = None
  max_length: int = 64
  pad_id: Optional[int] = None
  proprio_dims: Tuple[int, ...] = ()
  num_parallel_calls: int = -1
  tf_ram_budget_mb: Optional[int] = None

  def __post_init__(self):
    sources = tuple(s if isinstance(s, DataSource) else from_mapping(
        DataSource, s, f"data.sources[{i}]") for i, s in enumerate(self.sources))
    require(len(sources) > 0, "data.sources is empty; name at least one dataset.")
    object.__setattr__(self, "sources", sources)
    if not isinstance(self.augment, augment_lib.AugmentConfig):
      object.__setattr__(self, "augment", from_mapping(augment_lib.AugmentConfig, self.augment,
                                                       "data.augment"))
    object.__setattr__(self, "image_roles", tuple(self.image_roles))
    object.__setattr__(self, "proprio_dims", tuple(self.proprio_dims))
    require(all(isinstance(d, int) and d >= 0 for d in self.proprio_dims)
            and len(set(self.proprio_dims)) == len(self.proprio_dims),
            f"data.proprio_dims must be distinct state indices >= 0, got {self.proprio_dims}.")
    require_positive_ints(self, ("image_size", "global_batch_size", "shuffle_buffer",
                                 "action_horizon", "window_size", "max_length"), "data")
    require(self.host_sharding in HOST_SHARDING_MODES, f"data.host_sharding must be one of "
            f"{HOST_SHARDING_MODES}, got {self.host_sharding!r}.")
    require(self.normalization in NORMALIZATION_MODES, f"data.normalization must be one of "
            f"{NORMALIZATION_MODES}, got {self.normalization!r}.")
    require(0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got "
            f"{self.val_fraction}.")
    dims = {s.name: oxe.get_spec(s.name).action_dim for s in sources}
    require(len(set(dims.values())) == 1, f"data.sources must share one action dimension, "
            f"got {dims}.")
    for source in sources:
      cameras = oxe.get_spec(source.name).cameras
      missing = [r for r in self.image_roles if r not in cameras]
      require(not missing, f"data.image_roles {missing} are not cameras of {source.name!r} "
              f"(it has {sorted(cameras)}); choose roles every source has.")


# --------------------------------------------------------------------------------------
# Per-source trajectories.
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Source:
  source: DataSource
  spec: oxe.DatasetSpec
  builder: Any
  split: str
  statistics: stats_lib.DatasetStatistics


def _transforms_key(config: DataConfig, spec: oxe.DatasetSpec) -> Dict[str, Any]:
  return {"spec": dataclasses.asdict(spec), "filter_noops": config.filter_noops,
          "noop": (config.noop_translation, config.noop_rotation),
          "skip_bad_episodes": config.skip_bad_episodes}


def _maybe_filter_noops(config: DataConfig, ds: tf.data.Dataset) -> tf.data.Dataset:
  if not config.filter_noops:
    return ds
  return ds.map(lambda t: tt.filter_noops(t, config.noop_translation, config.noop_rotation),
                num_parallel_calls=config.num_parallel_calls, deterministic=True)


def open_source(config: DataConfig, source: DataSource) -> _Source:
  """Opens one source, checks its features and gets its statistics (cached)."""
  spec = oxe.get_spec(source.name)
  builder = rlds.open_builder(source.data_dir, source.name)
  rlds.check_features(builder, spec)
  split = rlds.resolve_split(builder, source.split, config.val_fraction)
  rlds.check_shards(builder, split)
  key = stats_lib.fingerprint(builder.data_dir, split, _transforms_key(config, spec))

  def compute():
    trajectories = _maybe_filter_noops(
        config, rlds.trajectory_dataset(builder, spec, split, drop_bad=False))
    return stats_lib.compute_statistics(trajectories, spec.action_mask,
                                        skip_nonfinite=config.skip_bad_episodes,
                                        fingerprint_=key, name=source.name,
                                        describe_corruption=lambda: "; ".join(
                                            rlds.unreadable_shards(builder, split)))

  statistics = stats_lib.load_or_compute(os.path.expanduser(config.stats_dir), source.name, key,
                                         compute)
  return _Source(source, spec, builder, split, statistics)


def _frames(config: DataConfig, src: _Source, index: int, state_dim: int, *, train: bool,
            process_index: int, process_count: int) -> tf.data.Dataset:
  """Undecoded, normalised frames of one source (infinite when train)."""
  split = rlds.host_split(src.split, process_index, process_count)
  ds = rlds.trajectory_dataset(src.builder, src.spec, split, shuffle=train,
                               seed=config.seed + index, drop_bad=True,
                               num_parallel_calls=config.num_parallel_calls)
  if train:
    ds = ds.repeat()
  ds = _maybe_filter_noops(config, ds)

  def to_common(traj):
    traj = stats_lib.normalize_traj(traj, src.statistics, config.normalization)
    observation = {f"image_{role}": traj["observation"][f"image_{role}"]
                   for role in config.image_roles}
    state = traj["observation"]["state"]
    # Sources with smaller states are zero-padded so that every source has one structure.
    observation["state"] = tf.pad(state, [[0, 0], [0, state_dim - state.shape[-1]]])
    traj = dict(traj, observation=observation)
    traj = tt.chunk_actions(traj, config.action_horizon)
    if config.window_size > 1:
      traj = tt.window_observations(traj, config.window_size)
    traj["dataset_index"] = tf.fill([tt.traj_len(traj)], index)
    return traj

  ds = ds.map(to_common, num_parallel_calls=config.num_parallel_calls, deterministic=True)
  return ds.flat_map(tf.data.Dataset.from_tensor_slices)


def _preprocess_frame(config: DataConfig, train: bool):
  """(frame number, undecoded frame) -> frame with uint8 images; seeded by the number."""

  def fn(number, frame):
    observation = dict(frame["observation"])
    for offset, role in enumerate(config.image_roles):
      seed = tf.stack([tf.cast(config.seed, tf.int64) * 1000 + offset, number])
      image = observation[f"image_{role}"]
      process = lambda x: augment_lib.preprocess_image(x, config.image_size, train=train,
                                                       config=config.augment, seed=seed)
      if config.window_size > 1:
        image = tf.map_fn(process, image, fn_output_signature=tf.uint8)
      else:
        image = process(image)
      observation[f"image_{role}"] = image
    return dict(frame, observation=observation)

  return fn


def make_dataset(config: DataConfig, *, train: bool = True, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, start_frame: int = 0
                 ) -> Tuple[tf.data.Dataset, Dict[str, Any]]:
  """Host batches as a tf.data.Dataset, plus info (statistics, weights, buffer size).

  Args:
    config: DataConfig.
    train: infinite, shuffled, augmented stream (True) or one ordered pass with the
      eval centre crop (False; the last partial batch is kept).
    process_index, process_count: this host and the number of hosts (default: jax's).
    start_frame: resume position in frames of this host (see DataIterator): the frame
      stream does not depend on the batch size, so a run resumed with another batch size
      continues where it stopped (on as many hosts as the saving run).
  Returns:
    (dataset of dict batches, {"statistics": {name: DatasetStatistics}, "weights": [D],
     "host_batch_size": int, "shuffle_buffer": int, "frame_bytes": float}).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  host_batch = mixture.host_batch_size(config.global_batch_size, process_count)
  # "global": every host builds the single-process stream and filters it (below).
  by_episodes = config.host_sharding == "episodes"
  sources = [open_source(config, s) for s in config.sources]
  state_dim = max(s.statistics.state.dim for s in sources)
  frames = [_frames(config, s, i, state_dim, train=train,
                    process_index=process_index if by_episodes else 0,
                    process_count=process_count if by_episodes else 1)
            for i, s in enumerate(sources)]
  weights = mixture.mixture_weights([s.source.weight for s in sources],
                                    [s.statistics.num_frames for s in sources],
                                    config.balance_weights)
  if len(frames) == 1:
    ds = frames[0]
  else:
    ds = tf.data.Dataset.sample_from_datasets(frames, weights.tolist(), seed=config.seed,
                                              stop_on_empty_dataset=False)
  info = {"statistics": {s.source.name: s.statistics for s in sources},
          "weights": weights, "host_batch_size": host_batch, "shuffle_buffer": 0,
          "frame_bytes": 0.0, "splits": [(s.builder, s.split) for s in sources]}
  if train:
    info["frame_bytes"] = mixture.frame_bytes(ds)
    info["shuffle_buffer"] = mixture.shuffle_buffer_entries(
        config.shuffle_buffer, info["frame_bytes"], config.shuffle_ram_budget_mb)
    ds = ds.shuffle(info["shuffle_buffer"], seed=config.seed)
  if by_episodes or process_count == 1:
    ds = ds.enumerate().skip(start_frame)
  else:
    # Frame numbers (augmentation seeds) are those of the global stream; rows are counted
    # from the resume point, so batch boundaries stay where the saving run had them.
    skip = start_frame * process_count
    ds = ds.enumerate().skip(skip).filter(
        lambda number, _: (number - skip) % config.global_batch_size // host_batch
        == process_index)
  ds = ds.map(_preprocess_frame(config, train), num_parallel_calls=config.num_parallel_calls,
              deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=train).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  if config.tf_ram_budget_mb:
    options.autotune.ram_budget = int(config.tf_ram_budget_mb) * 2**20
  return ds.with_options(options), info


class DataIterator:
  """Host batches as numpy dicts (with tokens when configured) and a resumable position.

  `state()` is a small JSON-able dict; `make_iterator(config, state=...)` continues
  with the batch the original iterator would have produced next.
  """

  def __init__(self, config: DataConfig, *, train: bool = True,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               state: Optional[Mapping[str, Any]] = None):
    self.config = config
    self.batches = 0
    self.host_frames = 0  # frames this host has consumed: the resume position
    if state is not None:
      if int(state["seed"]) != config.seed:
        raise InputError(f"Iterator state was saved with seed {state['seed']}, the config has "
                         f"seed {config.seed}; resume with the same data seed.")
      self.batches = int(state["batches"])
      saved_batch = int(state.get("global_batch_size", config.global_batch_size))
      count = jax.process_count() if process_count is None else process_count
      # States written before frames were recorded: their batches had this run's size.
      self.host_frames = int(state.get("host_frames", self.batches * mixture.host_batch_size(
          config.global_batch_size, count)))
      if saved_batch != config.global_batch_size:
        logging.info("Resuming the data stream at frame %d of this host: it was saved with "
                     "batch size %d, this run uses %d.", self.host_frames, saved_batch,
                     config.global_batch_size)
    self.dataset, self.info = make_dataset(config, train=train, process_index=process_index,
                                           process_count=process_count,
                                           start_frame=self.host_frames)
    self._iterator = self.dataset.as_numpy_iterator()
    self.num_truncated = 0
    state_dim = max(s.state.dim for s in self.info["statistics"].values())
    if config.proprio_dims and max(config.proprio_dims) >= state_dim:
      raise InputError(f"data.proprio_dims={config.proprio_dims} but the datasets' states "
                       f"have {state_dim} dimensions; choose indices below {state_dim}.")
    self._tokenizer = None
    if config.tokenizer:
      from vla_jax.text import Tokenizer  # pylint: disable=g-import-not-at-top
      self._tokenizer = Tokenizer.from_path(config.tokenizer)
      self._action_tokenizer = ActionTokenizer(vocab_size=self._tokenizer.vocab_size)
      self._pad_id = (config.pad_id if config.pad_id is not None else
                      self._tokenizer.pad_id if self._tokenizer.pad_id is not None else
                      self._tokenizer.vocab_size)

  def state(self) -> Dict[str, int]:
    """{"seed", "batches", "host_frames", "global_batch_size"}: the position in frames, so
    a resumed run may use another batch size."""
    return {"seed": self.config.seed, "batches": self.batches, "host_frames": self.host_frames,
            "global_batch_size": self.config.global_batch_size}

  def __iter__(self) -> Iterator[Dict[str, Any]]:
    return self

  def __next__(self) -> Dict[str, Any]:
    try:
      batch = next(self._iterator)
    except tf.errors.DataLossError as e:
      bad = [f"{builder.data_dir}: {problem}" for builder, split in self.info["splits"]
             for problem in rlds.unreadable_shards(builder, split)]
      raise InputError("Corrupt TFRecord data while reading: " + ("; ".join(bad) or
                       e.message.split("\n")[0]) + ". Re-download or regenerate those shards."
                       ) from e
    except tf.errors.InvalidArgumentError as e:
      raise InputError(f"Bad data while reading: {e.message}") from e
    self.batches += 1
    self.host_frames += len(batch["action"])
    if self._tokenizer is not None:
      states = batch["observation"]["state"]
      tokens, truncated = batching.tokenize_batch(
          batch["language_instruction"], batch["action"], self._tokenizer,
          self._action_tokenizer, self.config.max_length, self._pad_id,
          states=states[:, -1] if states.ndim == 3 else states,  # the current frame's
          state_dims=self.config.proprio_dims)
      if truncated:
        self.num_truncated += truncated
        logging.warning("%d prompt(s) in this batch exceed max_length=%d and were cut (%d so "
                        "far); raise data.max_length.", truncated, self.config.max_length,
                        self.num_truncated)
      batch.update(tokens)
    return batch


def make_iterator(config: DataConfig, *, train: bool = True,
                  state: Optional[Mapping[str, Any]] = None, **kwargs) -> DataIterator:
  """`DataIterator(config, ...)`: the training system's entry point."""
  return DataIterator(config, train=train, state=state, **kwargs)
