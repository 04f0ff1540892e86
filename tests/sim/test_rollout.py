"""Rendering at several resolutions and rollouts of the random and scripted policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.sim import env, rollout


@pytest.mark.parametrize("size", [64, 224])
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
