"""Pure trajectory-level transforms on tf tensors: gripper conventions, no-ops, chunks, windows.

A trajectory is a dict whose leaves all share the leading time axis T:
  observation/image_<role>  [T] string (encoded JPEG/PNG; decoded later, per frame)
  observation/state         [T, S] float32
  action                    [T, A] float32, gripper last (absolute, 1 = open)
  language_instruction      [T] string
  episode_id                [T] string, frame_index [T] int32
Every function takes such a dict and returns a new one (nothing is mutated), so they
compose in `tf.data.Dataset.map` before frames are flattened. Time-axis operations
(slicing, masking, gathering) are applied to every leaf together, which keeps the
leaves aligned by construction.
"""

from typing import Any, Dict

import tensorflow as tf

Traj = Dict[str, Any]


def map_time(traj: Traj, fn) -> Traj:
  """Applies `fn(leaf [T, ...]) -> [T', ...]` to every leaf of the trajectory."""
  return tf.nest.map_structure(fn, traj)


def traj_len(traj: Traj) -> tf.Tensor:
  return tf.shape(traj["action"])[0]


def drop_first_step(traj: Traj) -> Traj:
  """[T, ...] -> [T - 1, ...]: BridgeData V2's first step carries an all-zero action."""
  return map_time(traj, lambda x: x[1:])


def relabel_from_state(traj: Traj) -> Traj:
  """[T] -> [T - 1]: movement action = reached state - current state (bridge, as OpenVLA).

  action[t, :6] = state[t + 1, :6] - state[t, :6]; the last step has no next state and
  is dropped. The gripper column is kept.
  """
  state, action = traj["observation"]["state"], traj["action"]
  movement = state[1:, :6] - state[:-1, :6]
  out = map_time(traj, lambda x: x[:-1])
  out["action"] = tf.concat([movement, action[:-1, 6:]], axis=-1)
  return out


def binarize_gripper(gripper: tf.Tensor, open_at: float = 0.95,
                     closed_at: float = 0.05) -> tf.Tensor:
  """[T] in [0, 1] -> [T] in {0, 1}: intermediate values take the next settled value.

  As OpenVLA: a gripper in transit is labelled with the state it reaches; trailing
  intermediate values are rounded.
  """
  gripper = tf.cast(gripper, tf.float32)
  is_open = gripper > open_at
  is_closed = gripper < closed_at
  settled = tf.where(is_open, 1.0, tf.where(is_closed, 0.0, -1.0))

  def step(carry, value):
    return tf.where(value < 0, carry, value)

  last = tf.round(gripper[-1:])
  initial = tf.reshape(tf.where(tf.size(gripper) > 0, tf.reduce_sum(last), 1.0), [])
  return tf.reverse(tf.scan(step, tf.reverse(settled, [0]), initializer=initial), [0])


def relative_to_absolute_gripper(gripper: tf.Tensor) -> tf.Tensor:
  """[T] RT-1 style {-1 open, +1 close, 0 keep} -> [T] absolute {1 open, 0 closed}.

  Before the first command the gripper is assumed to be in the state opposite to it
  (a first "close" means it started open).
  """
  gripper = tf.cast(gripper, tf.float32)
  command = tf.where(gripper < -0.1, 1.0, tf.where(gripper > 0.1, 0.0, -1.0))
  nonzero = tf.boolean_mask(command, command >= 0)
  start = tf.where(tf.size(nonzero) > 0, 1.0 - tf.reduce_sum(nonzero[:1]), 1.0)

  def step(carry, value):
    return tf.where(value < 0, carry, value)

  return tf.scan(step, command, initializer=start)


def standardize_gripper(action: tf.Tensor, encoding: str, binarize: bool) -> tf.Tensor:
  """[T, A] raw -> [T, A'] with the last column absolute, 1 = open (see oxe.GRIPPER_ENCODINGS)."""
  if encoding == "none":
    return tf.concat([action, tf.ones_like(action[:, :1])], axis=-1)
  movement, gripper = action[:, :-1], action[:, -1]
  if encoding == "relative":
    gripper = relative_to_absolute_gripper(gripper)
  elif encoding == "absolute_closed1":
    gripper = 1.0 - tf.clip_by_value(gripper, 0.0, 1.0)
  else:
    gripper = tf.clip_by_value(gripper, 0.0, 1.0)
  if binarize:
    # A NaN/inf opening would otherwise take the next settled value, silently; kept
    # non-finite, the trajectory is refused or skipped like one with a NaN state
    # (data.skip_bad_episodes).
    raw = gripper
    gripper = binarize_gripper(tf.where(tf.math.is_finite(raw), raw, 0.5))
    gripper = tf.where(tf.math.is_finite(raw), gripper, raw)
  return tf.concat([movement, gripper[:, None]], axis=-1)


def pad_movement(action: tf.Tensor, action_dim: int) -> tf.Tensor:
  """[T, A] -> [T, action_dim]: zeros inserted before the gripper (jaco, language_table)."""
  missing = action_dim - action.shape[-1]
  if missing <= 0:
    return action
  zeros = tf.zeros([tf.shape(action)[0], missing], action.dtype)
  return tf.concat([action[:, :-1], zeros, action[:, -1:]], axis=-1)


def filter_noops(traj: Traj, translation_below: float = 0.01,
                 rotation_below: float = 0.06) -> Traj:
  """[T] -> [T'] without steps that barely move (the paper's filter).

  A step is a no-op when |action[:3]| < translation_below and |action[3:6]| <
  rotation_below and the gripper does not change from the previous step.
  """
  action = traj["action"]
  moves = tf.logical_or(tf.norm(action[:, :3], axis=-1) >= translation_below,
                        tf.norm(action[:, 3:6], axis=-1) >= rotation_below)
  gripper = action[:, -1]
  previous = tf.concat([gripper[:1], gripper[:-1]], axis=0)
  keep = tf.logical_or(moves, tf.not_equal(gripper, previous))
  return map_time(traj, lambda x: tf.boolean_mask(x, keep))


def chunk_actions(traj: Traj, horizon: int) -> Traj:
  """action [T, A] -> [T, H, A] (actions t..t+H-1) and action_pad_mask [T, H].

  Past the end the last action is repeated and the pad mask is False. H = 1 is
  OpenVLA's single-step target.
  """
  length = traj_len(traj)
  index = tf.range(length)[:, None] + tf.range(horizon)[None, :]
  out = dict(traj)
  out["action"] = tf.gather(traj["action"], tf.minimum(index, length - 1))
  out["action_pad_mask"] = index < length
  return out


def window_observations(traj: Traj, window: int) -> Traj:
  """observation leaves [T, ...] -> [T, W, ...] (frames t-W+1..t) and observation/pad_mask [T, W].

  Before the first step the first frame is repeated and the pad mask is False.
  """
  length = traj_len(traj)
  index = tf.range(length)[:, None] + tf.range(-(window - 1), 1)[None, :]
  observation = {key: tf.gather(value, tf.maximum(index, 0))
                 for key, value in traj["observation"].items()}
  observation["pad_mask"] = index >= 0
  out = dict(traj)
  out["observation"] = observation
  return out


def is_finite(traj: Traj) -> tf.Tensor:
  """Scalar bool: every action and state value is finite."""
  return tf.logical_and(tf.reduce_all(tf.math.is_finite(traj["action"])),
                        tf.reduce_all(tf.math.is_finite(traj["observation"]["state"])))


def normalize(x: tf.Tensor, stats: Dict[str, Any], mode: str) -> tf.Tensor:
  """[..., D] -> [..., D] normalised where stats["mask"]; the same formulas as vla_jax.actions.

  bounds_q99: clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) (OpenVLA's default).
  normal:     (x - mean) / (std + 1e-8).
  """
  mask = tf.constant(stats["mask"], tf.bool)
  if mode == "bounds_q99":
    q01 = tf.constant(stats["q01"], x.dtype)
    q99 = tf.constant(stats["q99"], x.dtype)
    out = tf.clip_by_value(2.0 * (x - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0)
  elif mode == "normal":
    mean = tf.constant(stats["mean"], x.dtype)
    std = tf.constant(stats["std"], x.dtype)
    out = (x - mean) / (std + 1e-8)
  else:
    raise ValueError(f"normalization mode {mode!r} is not 'bounds_q99' or 'normal'")
  return tf.where(mask, out, x)
