"""The fast renderer (`render.render_scene`) draws exactly what `render_reference` draws."""

import functools

import jax
import numpy as np
import pytest

from vla_jax.sim import catalogue as cat
from vla_jax.sim import env, render, rollout


@functools.partial(jax.jit, static_argnames=("image_size", "reference"))
def _render(states, image_size, reference):
  fn = env.render_reference if reference else env.render
  return jax.vmap(lambda s: fn(s, image_size))(states)


def _expert_states(split, seeds, every):
  """EnvStates [N] along expert episodes (objects lifted, carried, dropped)."""
  _, traj = rollout.expert_episodes(rollout.seed_keys(seeds), split, render=False)
  return jax.tree.map(lambda x: x[:, ::every].reshape((-1,) + x.shape[2:]), traj["env_state"])


# The training split in the quick loop; the others (their own layouts and textures) in
# the full suite.
@pytest.mark.parametrize("split", [s if s == "train" else pytest.param(s, marks=pytest.mark.slow)
                                   for s in cat.SPLITS])
def test_fast_render_is_bit_identical_on_every_split(split):
  states = _expert_states(split, range(4), 9)
  fast = np.asarray(_render(states, 64, False))
  reference = np.asarray(_render(states, 64, True))
  np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("size", [24, 96])
def test_fast_render_is_bit_identical_at_other_resolutions(size):
  states = _expert_states("multi_plate", range(2), 13)
  np.testing.assert_array_equal(np.asarray(_render(states, size, False)),
                                np.asarray(_render(states, size, True)))


def test_windows_hold_sprites_at_the_image_border():
  """Objects pushed to the table corners and lifted still render identically."""
  states = _expert_states("train", range(2), 20)
  corners = np.array([[-0.215, -0.215], [0.215, 0.215], [-0.215, 0.215], [0.215, -0.215]],
                     np.float32)
  n = states.obj_xy.shape[0]
  xy = np.asarray(states.obj_xy).copy()
  xy[:, 0] = corners[np.arange(n) % 4]
  states = states._replace(obj_xy=xy, obj_z=np.full(states.obj_z.shape, 0.15, np.float32))
  np.testing.assert_array_equal(np.asarray(_render(states, 64, False)),
                                np.asarray(_render(states, 64, True)))


def test_texture_tables_hold_every_texture():
  table, wall = render.texture_tables(32)
  assert table.shape == wall.shape == (len(cat.TEXTURES), 32, 32, 3)
  assert table.dtype == np.float32 and 0 <= table.min() and table.max() <= 1
