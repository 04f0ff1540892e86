"""Trajectory transforms: gripper conventions, no-op filtering, chunking, windows."""

import numpy as np
import tensorflow as tf

from vla_jax.data import traj_transforms as tt


def _traj(actions, states=None):
  actions = np.asarray(actions, np.float32)
  length = actions.shape[0]
  states = np.arange(length * 7, dtype=np.float32).reshape(length, 7) if states is None else states
  return {"observation": {"image_primary": tf.constant([f"img{t}".encode() for t in range(length)]),
                          "state": tf.constant(states, tf.float32)},
          "action": tf.constant(actions), "frame_index": tf.range(length)}


def test_binarize_takes_the_next_settled_value():
  gripper = tf.constant([1.0, 0.6, 0.3, 0.0, 0.0, 0.5, 0.97, 0.7])
  np.testing.assert_array_equal(tt.binarize_gripper(gripper).numpy(),
                                [1, 0, 0, 0, 0, 1, 1, 1])


def test_relative_gripper_becomes_absolute():
  # RT-1: +1 close, -1 open, 0 keep; before the first command the gripper is open.
  gripper = tf.constant([0.0, 0.0, 1.0, 0.0, -1.0, 0.0])
  np.testing.assert_array_equal(tt.relative_to_absolute_gripper(gripper).numpy(),
                                [1, 1, 0, 0, 1, 1])


def test_standardize_gripper_encodings():
  action = tf.constant([[0.1, -1.0], [0.2, 1.0]])
  np.testing.assert_array_equal(
      tt.standardize_gripper(action, "absolute_closed1", False).numpy()[:, -1], [1, 0])
  none = tt.standardize_gripper(action[:, :1], "none", False).numpy()
  assert none.shape == (2, 2) and (none[:, -1] == 1).all()
  padded = tt.pad_movement(tf.constant([[0.5, 0.25, 1.0]]), 7).numpy()
  np.testing.assert_array_equal(padded, [[0.5, 0.25, 0, 0, 0, 0, 1.0]])


def test_filter_noops_keeps_moves_and_gripper_changes():
  actions = [[0.0] * 6 + [1.0],           # still: dropped
             [0.02, 0, 0, 0, 0, 0, 1.0],   # translates: kept
             [0.0] * 6 + [0.0],            # gripper changes: kept
             [0, 0, 0, 0.1, 0, 0, 0.0],    # rotates: kept
             [0.001] * 6 + [0.0]]          # tiny: dropped
  out = tt.filter_noops(_traj(actions))
  np.testing.assert_array_equal(out["frame_index"].numpy(), [1, 2, 3])
  assert out["observation"]["image_primary"].numpy().tolist() == [b"img1", b"img2", b"img3"]


def test_drop_first_and_relabel_from_state():
  states = np.cumsum(np.ones((4, 7), np.float32), 0) * np.arange(1, 8)
  traj = tt.relabel_from_state(tt.drop_first_step(_traj(np.zeros((4, 7)), states)))
  assert traj["action"].shape == (2, 7)
  np.testing.assert_allclose(traj["action"].numpy()[:, :6], np.diff(states[1:], axis=0)[:, :6])
  np.testing.assert_array_equal(traj["frame_index"].numpy(), [1, 2])


def test_chunk_and_window_shapes_and_masks():
  traj = _traj(np.arange(4 * 7).reshape(4, 7))
  chunked = tt.chunk_actions(traj, 3)
  assert chunked["action"].shape == (4, 3, 7)
  np.testing.assert_array_equal(chunked["action"].numpy()[2, :, 0], [14, 21, 21])
  np.testing.assert_array_equal(chunked["action_pad_mask"].numpy()[2], [True, True, False])
  windowed = tt.window_observations(traj, 2)
  assert windowed["observation"]["state"].shape == (4, 2, 7)
  assert windowed["observation"]["image_primary"].numpy()[0].tolist() == [b"img0", b"img0"]
  assert windowed["observation"]["image_primary"].numpy()[3].tolist() == [b"img2", b"img3"]
  np.testing.assert_array_equal(windowed["observation"]["pad_mask"].numpy()[:2],
                                [[False, True], [True, True]])


def test_a_nan_gripper_stays_nan_instead_of_taking_the_next_settled_value():
  action = tf.constant([[0.1, 1.0], [0.2, float("nan")], [0.3, 0.0], [0.4, 0.0]])
  gripper = tt.standardize_gripper(action, "absolute", True).numpy()[:, -1]
  assert np.isnan(gripper[1]), gripper  # was 0.0, copied from step 2
  np.testing.assert_array_equal(gripper[[0, 2, 3]], [1.0, 0.0, 0.0])
  standardized = tf.concat([action[:, :1], tf.constant(gripper)[:, None]], -1)
  assert not tt.is_finite(_traj(standardized.numpy()))  # refused / skipped downstream
