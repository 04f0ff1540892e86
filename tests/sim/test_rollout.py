"""Rendering at several resolutions and rollouts of the scripted and random policies."""

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


def test_rollout_scripted_and_random_policies():
  scripted = rollout.rollout(rollout.scripted_policy(), "vlthink_arrow", range(6), frames=True,
                             progress=False)
  assert scripted.success.all() and scripted.frames.shape[1:] == (6, 64, 64, 3)
  assert all("arrow pointing" in text for text in scripted.instructions)
  randomly = rollout.rollout(rollout.random_policy(0), "train", range(6), max_steps=20,
                             progress=False)
  assert randomly.success_rate < 0.5 and (randomly.steps == 20).all()
