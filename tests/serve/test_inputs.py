"""Requests of either protocol -> checked queries; every bad request is a clear InputError."""

import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.serve import inputs

IMAGE = np.zeros((32, 48, 3), np.uint8)
LIBERO = inputs.ObservationKeys()


def _obs(**overrides):
  obs = {"observation/image": IMAGE, "observation/state": np.zeros(8, np.float32),
         "prompt": "put the carrot on the plate"}
  obs.update(overrides)
  return {k: v for k, v in obs.items() if v is not None}


def test_libero_observation_becomes_a_query_without_state_for_a_stateless_policy():
  query = inputs.parse_observation(_obs(), LIBERO, state_dim=None)
  assert query.image is IMAGE and query.prompt == "put the carrot on the plate"
  assert query.state is None and query.unnorm_key == ""


def test_droid_keys_concatenate_joints_and_gripper():
  keys = inputs.observation_keys("droid")
  obs = {"observation/exterior_image_1_left": IMAGE, "observation/wrist_image_left": IMAGE,
         "observation/joint_position": np.arange(7.0), "observation/gripper_position": [0.5],
         "prompt": "pick up the cube"}
  query = inputs.parse_observation(obs, keys, state_dim=8)
  np.testing.assert_array_equal(query.state, [0, 1, 2, 3, 4, 5, 6, 0.5])


def test_custom_and_nested_keys():
  keys = inputs.observation_keys("image=images/cam_high,state=qpos,prompt=task")
  assert keys == inputs.ObservationKeys("images/cam_high", ("qpos",), "task")
  obs = {"images": {"cam_high": IMAGE}, "qpos": np.ones(7), "task": "open the drawer"}
  assert inputs.parse_observation(obs, keys, state_dim=7).state.shape == (7,)
  with pytest.raises(ConfigError, match="expected a preset"):
    inputs.observation_keys("camera=x")


@pytest.mark.parametrize("overrides, match", [
    ({"observation/image": None}, r"no image under 'observation/image' \(its keys: "
                                  r"\['observation/state', 'prompt'\]\).*--serve_obs_keys"),
    ({"prompt": None}, "no prompt under 'prompt'"),
    ({"observation/image": IMAGE.astype(np.float32)}, r"must be uint8 .* got float32"),
    ({"observation/image": np.zeros((3, 32, 32), np.uint8)}, r"channels first\?"),
    ({"observation/image": np.zeros((32, 32), np.uint8)}, r"got shape \[32, 32\]"),
    ({"observation/image": IMAGE.tolist()}, "got a list"),
    ({"observation/state": np.array([0.0, np.nan])}, "NaN or inf"),
    ({"prompt": b"\xff\xfe"}, "not valid UTF-8"),
    ({"prompt": "caf\udce9"}, "not valid UTF-8 text"),
    ({"prompt": "   "}, "is empty"),
    ({"prompt": "x" * 600}, "600 characters; the server takes at most 512"),
    ({"prompt": 7}, "must be a string, got int"),
])
def test_bad_observations_say_what_is_wrong(overrides, match):
  with pytest.raises(InputError, match=match):
    inputs.parse_observation(_obs(**overrides), LIBERO, state_dim=None)


def test_state_of_the_wrong_size_or_missing_when_the_policy_reads_it():
  with pytest.raises(InputError, match="has 8 values; this policy reads a robot state of 7"):
    inputs.parse_observation(_obs(), LIBERO, state_dim=7)
  with pytest.raises(InputError, match="no robot state under 'observation/state'"):
    inputs.parse_observation(_obs(**{"observation/state": None}), LIBERO, state_dim=7)


def test_openvla_payload_and_its_errors():
  query = inputs.parse_act_payload({"image": IMAGE, "instruction": "do something",
                                    "unnorm_key": "bridge_orig"}, ["bridge_orig"], None)
  assert query.unnorm_key == "bridge_orig" and query.state is None
  with pytest.raises(InputError, match=r"unnorm_key 'fractal' is not in this checkpoint; it "
                                       r"has statistics for \['bridge_orig', 'tabletop'\]"):
    inputs.parse_act_payload({"image": IMAGE, "instruction": "x", "unnorm_key": "fractal"},
                             ["tabletop", "bridge_orig"], None)
  with pytest.raises(InputError, match="no instruction"):
    inputs.parse_act_payload({"image": IMAGE}, [], None)
  with pytest.raises(InputError, match=r"unknown keys \['prompt'\]"):
    inputs.parse_act_payload({"image": IMAGE, "prompt": "x"}, [], None)
  with pytest.raises(InputError, match="JSON object"):
    inputs.parse_act_payload([IMAGE], [], None)
