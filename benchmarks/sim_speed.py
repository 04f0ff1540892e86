"""Tabletop environment throughput: env steps per second, render included, jitted, CPU.

  python benchmarks/sim_speed.py [--sizes 1 64 1024] [--repeats 3] [--steps 3]

For each batch B, two jitted, vmapped step functions (physics + the 64x64 observation)
are compiled and then timed in alternating rounds in this one process, so both see the
same machine load: "new" is `rollout.step_batch` (`render.render_scene`: texture tables,
windowed sprites), "old" the same step rendered by `env.render_reference` (every texture
family and every sprite at every pixel; bit-identical images, tests/sim/test_render.py).
Each round runs `--steps` expert steps; the script prints the median over `--repeats`
rounds of B * steps / seconds for both and the ratio new / old.
"""

import argparse
import functools
import time

import jax
import numpy as np

from vla_jax.sim import env, expert, rollout


@functools.partial(jax.jit, static_argnames=("image_size",))
def step_reference(states, actions, image_size: int = 64):
  """`rollout.step_batch` with the reference renderer (the previous implementation)."""

  def one(state, action):
    new, reward = env._advance(state, action)  # pylint: disable=protected-access
    obs = {"image": env.render_reference(new, image_size), "state": env.proprio(new)}
    return new, obs, reward, new.done, {"success": new.success, "held": new.held, "t": new.t}

  return jax.vmap(one)(states, actions)


def _round(step_fn, states, act, steps: int, image_size: int) -> float:
  current, start = states, time.perf_counter()
  for _ in range(steps):
    current, obs, _, _, _ = step_fn(current, act(current), image_size)
  jax.block_until_ready(obs)
  return states.t.shape[0] * steps / (time.perf_counter() - start)


def compare(batch: int, split: str, steps: int, repeats: int, image_size: int):
  """(old, new) median env steps/s at batch B, measured in alternating rounds."""
  states = rollout.reset_batch(rollout.seed_keys(range(batch)), split)
  act = jax.jit(jax.vmap(expert.expert_action))
  paths = {"old": step_reference, "new": rollout.step_batch}
  for fn in paths.values():
    jax.block_until_ready(fn(states, act(states), image_size))  # compile
  rates = {name: [] for name in paths}
  for _ in range(repeats):
    for name, fn in paths.items():
      rates[name].append(_round(fn, states, act, steps, image_size))
  return float(np.median(rates["old"])), float(np.median(rates["new"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024])
  parser.add_argument("--split", default="train")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=64)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, split {args.split}, image "
        f"{args.image_size}x{args.image_size}, median of {args.repeats} alternating rounds "
        f"of {args.steps} steps")
  for batch in args.sizes:
    old, new = compare(batch, args.split, args.steps, args.repeats, args.image_size)
    print(f"batch {batch:5d}: old {old:9.1f}  new {new:9.1f} env steps/s  "
          f"x{new / old:.1f}", flush=True)


if __name__ == "__main__":
  main()
