"""The tabletop environment: determinism, batching, expert, splits, inputs, rendering."""

import jax
import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.sim import catalogue as cat
from vla_jax.sim import env, expert, rollout


def _equal_trees(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_reset_is_deterministic_given_the_key():
  first = rollout.reset_batch(rollout.seed_keys([3, 4]), "multi_plate")
  again = rollout.reset_batch(rollout.seed_keys([3, 4]), "multi_plate")
  assert _equal_trees(first, again)
  assert not np.array_equal(first.obj_xy[0], first.obj_xy[1]) or \
      not np.array_equal(first.rec_id[0], first.rec_id[1])


@pytest.mark.slow  # 16 s (two compiled batch sizes); the fast path keeps the expert's rollouts
def test_vmapped_step_equals_looped_step():
  keys = rollout.seed_keys([0, 1, 2])
  batch = rollout.reset_batch(keys, "train")
  singles = [jax.tree.map(lambda x: x[i:i + 1], batch) for i in range(3)]
  act = jax.jit(jax.vmap(expert.expert_action))
  for _ in range(6):
    batch, obs, reward, done, _ = rollout.step_batch(batch, act(batch), 32)
    outs = []
    for i, single in enumerate(singles):
      singles[i], single_obs, _, _, _ = rollout.step_batch(single, act(single), 32)
      outs.append(single_obs)
  for i in range(3):
    np.testing.assert_array_equal(obs["image"][i], outs[i]["image"][0])
    np.testing.assert_allclose(obs["state"][i], outs[i]["state"][0], rtol=0, atol=1e-6)
  assert float(np.abs(obs["state"][:, :3] - env.EE_START).max()) > 0.05  # it moved


@pytest.mark.slow
def test_chunked_step_equals_one_vmap():
  """`step_batch` renders large batches `chunk` environments at a time (`SIM_CHUNK`):
  3 environments in chunks of 2 (a full chunk and a remainder) step and render exactly as
  one vmap over all 3 (the default call at this size, compiled for the test above)."""
  batch = rollout.reset_batch(rollout.seed_keys([0, 1, 2]), "train")
  act = jax.jit(jax.vmap(expert.expert_action))
  whole = chunked = batch
  for _ in range(2):
    whole, whole_obs, whole_reward, _, _ = rollout.step_batch(whole, act(whole), 32)
    chunked, obs, reward, _, _ = rollout.step_batch(chunked, act(chunked), 32, chunk=2)
    jax.tree.map(np.testing.assert_array_equal, chunked, whole)
    jax.tree.map(np.testing.assert_array_equal, obs, whole_obs)
    np.testing.assert_array_equal(reward, whole_reward)


# Slow: every layout compiles its own env programs (tests/sim/test_rollout.py and
# tests/eval/test_sim_eval.py run the expert unmarked).
@pytest.mark.slow
def test_expert_solves_every_split():
  rates = {name: rollout.expert_success(name, range(16)).mean() for name in cat.SPLITS}
  assert all(rate >= 0.95 for rate in rates.values()), rates


def test_expert_recovers_when_the_object_moves():
  final, traj = rollout.expert_episodes(rollout.seed_keys(range(8)), "pos_change_to",
                                        render=False)
  start = rollout.reset_batch(rollout.seed_keys(range(8)), "pos_change_to")
  moved = np.linalg.norm(np.asarray(traj["env_state"].obj_xy[:, 6, 0] - start.obj_xy[:, 0]),
                         axis=-1)
  assert np.all(moved > 0.03) and np.all(final.success)


def test_unseen_content_is_disjoint_from_training():
  train = cat.SPLITS["train"]
  train_objects = {cat.OBJECTS[i] for i in train.objects}
  for name in ("carrot", "multi_carrot"):
    unseen = {cat.OBJECTS[i] for i in cat.SPLITS[name].objects}
    assert not unseen & train_objects
    assert not {o.name for o in unseen} & {o.name for o in train_objects}
    assert not {o.shape for o in unseen} & {o.shape for o in train_objects}
  for name in ("plate", "multi_plate"):
    assert not set(cat.SPLITS[name].receptacles) & set(train.receptacles)
    names = {cat.RECEPTACLES[i].name for i in cat.SPLITS[name].receptacles}
    assert "plate" not in names and len(names) == 16
  vision = cat.SPLITS["vision_img"]
  seen_textures = set(train.tables) | set(train.backgrounds)
  assert not (set(vision.tables) | set(vision.backgrounds)) & seen_textures
  assert not set(cat.BLEND_TEXTURES) & seen_textures
  assert not {cat.TEMPLATES[i] for i in cat.SPLITS["instruct"].templates} & \
      {cat.TEMPLATES[i] for i in train.templates}
  assert len(cat.SPLITS["instruct"].templates) == 16 and len(cat.SPLITS["carrot"].objects) == 9
  # Unseen positions and yaws never hit the training grid.
  states = rollout.reset_batch(rollout.seed_keys(range(64)), "position")
  grid = cat.object_grid()
  distance = np.linalg.norm(np.asarray(states.obj_xy[:, 0])[:, None] - grid[None], axis=-1)
  assert distance.min() > 0.05
  yaw_gap = np.abs(env.wrap_angle(np.asarray(states.obj_yaw[:, 0])[:, None] -
                                  np.array(cat.OBJECT_GRID_YAW)[None], np.pi))
  assert yaw_gap.min() > 0.2


def test_split_catalogue_and_axes():
  paper = {"carrot", "instruct", "multi_carrot", "multi_plate", "plate", "vision_img",
           "tex03", "tex05", "whole03", "whole05", "position", "ee_pose", "pos_change_to"}
  assert paper <= set(cat.AXES) and set(cat.AXES) == set(cat.SPLITS) - {"train"}
  assert {cat.AXES[s] for s in cat.AXES} == {"semantic", "vision", "execution", "vlthink"}
  sizes = {f: len(cat.VLTHINK[f].items) for f in cat.VLTHINK}
  assert sizes["shape"] == 13 and sizes["colour"] == 8 and sizes["arrow"] == 4
  assert sizes["parity"] == 8 and len(sizes) >= 6


def test_bad_split_names_are_rejected():
  with pytest.raises(ConfigError, match="Known splits: train, carrot"):
    cat.get_split("carrots")
  with pytest.raises(ConfigError, match="Unknown tabletop split"):
    rollout.rollout(rollout.random_policy(0), "nope", [0])


def test_bad_actions_are_rejected():
  with pytest.raises(InputError, match=r"shape \(7,\)"):
    env.check_action(np.zeros(6))
  with pytest.raises(InputError, match="NaN"):
    env.check_action(np.array([0, 0, np.nan, 0, 0, 0, 1.0]))
  with pytest.raises(InputError, match=r"shape \(2, 7\)"):
    env.check_action(np.zeros((3, 7)), batch=2)
  nan_policy = lambda images, texts, states: np.full((len(texts), 7), np.nan)
  with pytest.raises(InputError):
    rollout.rollout(nan_policy, "train", [0, 1], max_steps=3, progress=False)


def test_instructions_follow_the_split():
  states = rollout.reset_batch(rollout.seed_keys(range(8)), "instruct")
  texts = env.instructions("instruct", states)
  assert not any(t.startswith("put the ") and " on the " in t and
                 t == cat.TEMPLATES[0].format(object=t.split("put the ")[1].split(" on the ")[0],
                                              receptacle="plate") for t in texts)
  parity = rollout.reset_batch(rollout.seed_keys(range(16)), "vlthink_parity")
  for i, text in enumerate(env.instructions("vlthink_parity", parity)):
    digits = np.asarray(parity.rec_id[i]) + 1
    target = int(digits[int(parity.target_rec[i])])
    assert ("odd" in text) == (target % 2 == 1)
    assert sum(d % 2 == target % 2 for d in digits) == 1  # exactly one board matches


def _grasp_at(obj_name: str, obj_yaw: float, ee_yaw: float) -> bool:
  """Whether closing the gripper right on top of `obj_name` grasps it."""
  state = env.reset(jax.random.key(0), "train")
  obj = [o.name for o in cat.OBJECTS].index(obj_name)
  state = state._replace(obj_id=state.obj_id.at[0].set(obj), obj_yaw=state.obj_yaw.at[0].set(
      obj_yaw), ee=np.array([*np.asarray(state.obj_xy[0]), 0.015], np.float32),
      ee_yaw=np.float32(ee_yaw))
  state, _ = env.advance(state, np.array([0, 0, 0, 0, 0, 0, 0], np.float32))
  return int(state.held) == 0


@pytest.mark.parametrize("obj_name", ["red cube", "carrot", "green nut"])
def test_any_yaw_grasps_by_default(obj_name):
  """The camera cannot show a 5-px object's yaw, so the default grasp does not need it."""
  assert not env.GRASP_NEEDS_YAW
  assert _grasp_at(obj_name, 0.4, 0.4 + np.pi / 4) and _grasp_at(obj_name, 0.4, 1.9)


@pytest.mark.parametrize("obj_name,offset,aligned", [
    ("yellow ball", 1.1, True),  # a disc: any yaw
    ("red cube", np.pi / 2, True),  # a square: every pi / 2
    ("red cube", np.pi / 4, False),
    ("green nut", np.pi / 3, True),  # a hexagon: every pi / 3
    ("carrot", np.pi, True),  # elongated: every pi only
    ("carrot", np.pi / 2, False),
])
def test_yaw_alignment_follows_the_objects_symmetry(obj_name, offset, aligned):
  obj = np.int32([o.name for o in cat.OBJECTS].index(obj_name))
  for ee_yaw in (0.4 + offset, 0.4 + offset + 0.8 * env.GRASP_YAW_TOL):
    assert bool(env.yaw_aligned(np.float32(0.4), np.float32(ee_yaw), obj)) == aligned


def test_expert_never_turns_when_any_yaw_grasps():
  _, traj = rollout.expert_episodes(rollout.seed_keys(range(64)), "train", render=False)
  assert (np.asarray(traj["action"][:, :, 5]) == 0).all()
