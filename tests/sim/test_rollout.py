"""Rendering at several resolutions and rollouts of the random and scripted policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.errors import InputError
from vla_jax.sim import env, rollout


@pytest.mark.parametrize("size", [64, pytest.param(224, marks=pytest.mark.slow)])  # 224: 8 s
def test_render_any_resolution_shows_the_effector(size):
  state = env.reset(jax.random.key(0), "train")
  image = np.asarray(jax.jit(env.render, static_argnums=1)(state, size))
  assert image.shape == (size, size, 3) and image.dtype == np.uint8
  assert image.std() > 5
  moved = state._replace(ee=state.ee + jnp.array([0.12, 0.0, 0.0]))
  other = np.asarray(jax.jit(env.render, static_argnums=1)(moved, size))
  changed = np.abs(other.astype(int) - image.astype(int)).sum(-1) > 30
  cols = np.flatnonzero(changed.any(0)) / size
  # The effector left x = 0 (column 0.5) and appeared near x = 0.12 m.
  assert changed.mean() > 0.005 and cols.min() < 0.5 < cols.max()


def test_random_policy_runs_to_the_step_limit():
  # Three environments of one layout, as in tests/eval/test_sim_eval.py: the same programs.
  randomly = rollout.rollout(rollout.random_policy(0), "train", range(3), max_steps=20,
                             progress=False)
  assert randomly.success_rate < 0.5 and (randomly.steps == 20).all()


@pytest.mark.slow  # up to 80 steps on a VL-Think layout (its own compiled env programs)
def test_scripted_policy_solves_a_vlthink_split():
  # Unmarked, tests/eval/test_sim_eval.py rolls the expert out on two splits for 20 steps
  # and checks each episode against the in-jit expert's success.
  scripted = rollout.rollout(rollout.scripted_policy(), "vlthink_arrow", range(3), frames=True,
                             progress=False)
  assert scripted.success.all() and scripted.frames.shape[1:] == (3, 64, 64, 3)
  assert all("arrow pointing" in text for text in scripted.instructions)


class _ChunkPolicy:
  """Returns chunks of K random actions and remembers every action it returned."""

  def __init__(self, k: int):
    self.k, self.calls, self.actions = k, 0, []
    self._rng = np.random.default_rng(1)

  def __call__(self, images, instructions, states):
    del instructions, states
    self.calls += 1
    chunk = self._rng.uniform(env.ACTION_LOW, env.ACTION_HIGH,
                              (images.shape[0], self.k, 7)).astype(np.float32)
    self.actions.extend(chunk.transpose(1, 0, 2))
    return chunk


def test_rollout_executes_action_chunks_open_loop():
  chunked = _ChunkPolicy(3)
  result = rollout.rollout(chunked, "train", range(3), max_steps=7, progress=False,
                           frames=True)
  # 7 steps from chunks of 3: three calls, the last chunk cut after its first action.
  assert chunked.calls == 3 and (result.steps == 7).all() and len(result.frames) == 8

  # The same actions one per call give the same episode, frame for frame.
  replay = iter(chunked.actions[:7])
  stepwise = rollout.rollout(lambda images, texts, states: next(replay), "train", range(3),
                             max_steps=7, progress=False, frames=True)
  np.testing.assert_array_equal(stepwise.frames, result.frames)


class _LookingChunkPolicy:
  """Chunks of K actions that depend on the frame seen (a policy that looks), with noise."""

  def __init__(self, k: int):
    self.k, self.seen = k, []
    self._rng = np.random.default_rng(2)

  def __call__(self, images, instructions, states):
    del instructions
    self.seen.append((images.copy(), states.copy()))
    brightness = images.reshape(len(images), -1).mean(-1) / 255.0
    chunk = self._rng.uniform(env.ACTION_LOW, env.ACTION_HIGH,
                              (images.shape[0], self.k, 7)).astype(np.float32)
    chunk[..., 0] = 0.05 * (brightness[:, None] - 0.5)
    chunk[..., 6] = self._rng.integers(0, 2, chunk.shape[:2])
    return chunk


@pytest.mark.slow  # 11 s; the fast path runs step_chunk_batch in the test below
def test_a_chunk_runs_in_one_call_as_step_by_step():
  """Without frames a chunk's K steps run as one program that renders once; every frame
  the policy sees and every outcome equal the step-by-step rollout (which frames=True
  uses, to record each frame)."""
  fast, stepwise = _LookingChunkPolicy(4), _LookingChunkPolicy(4)
  result = rollout.rollout(fast, "train", range(3), max_steps=10, progress=False)
  reference = rollout.rollout(stepwise, "train", range(3), max_steps=10, progress=False,
                              frames=True)
  assert len(fast.seen) == len(stepwise.seen) == 3  # 4 + 4 + 2 steps
  for (images, states), (ref_images, ref_states) in zip(fast.seen, stepwise.seen):
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(states, ref_states)
  np.testing.assert_array_equal(result.steps, reference.steps)
  np.testing.assert_array_equal(result.success, reference.success)


def test_an_episode_that_ends_inside_a_chunk_stays_ended():
  # The shapes of the test above (3 environments, 10 steps, chunks of 4): in the full
  # suite, its programs.
  states = rollout.reset_batch(rollout.seed_keys(np.arange(3)), "train", max_steps=10)
  actions = jnp.zeros((4, 3, 7), jnp.float32)
  for _ in range(3):  # 12 steps: the episodes end at 10, inside the last chunk
    states, obs, done = rollout.step_chunk_batch(states, actions)
  assert np.asarray(done).all() and (np.asarray(states.t) == 10).all()
  assert obs["image"].shape == (3, 64, 64, 3)


@pytest.mark.parametrize("shape", [(3, 0, 7), (2, 3, 7), (3, 2, 6)])
def test_rollout_refuses_malformed_chunks(shape):
  bad = lambda images, texts, states: np.zeros(shape, np.float32)
  with pytest.raises(InputError, match="chunk|shape"):
    rollout.rollout(bad, "train", range(3), max_steps=2, progress=False)


def test_dart_noise_perturbs_states_but_records_the_experts_action():
  keys = rollout.seed_keys(range(4))
  clean_final, clean = rollout.expert_episodes(keys, "train", 40, 64, False)
  again_final, again = rollout.expert_episodes(keys, "train", 40, 64, False, noise_std=0.0)
  np.testing.assert_array_equal(clean["state"], again["state"])  # 0 = the plain expert
  final, noisy = rollout.expert_episodes(keys, "train", 40, 64, False, noise_std=0.01)
  assert not np.allclose(noisy["state"], clean["state"])
  # Each recorded action is the expert's for the state it was recorded in ...
  expert = jax.jit(jax.vmap(jax.vmap(rollout.expert.expert_action)))(noisy["env_state"])
  np.testing.assert_array_equal(np.asarray(expert), noisy["action"])
  # ... while the executed one was not: the next state is off the clean action's target.
  moved = noisy["state"][:, 1:, :3] - noisy["state"][:, :-1, :3]
  commanded = np.clip(noisy["action"][:, :-1, :3], -env.MAX_TRANSLATION, env.MAX_TRANSLATION)
  active = noisy["active"][:, 1:]
  assert np.abs(moved - commanded)[active].max() > 1e-3
  assert bool(np.asarray(clean_final.success).all()) and bool(np.asarray(again_final.success).all())
