"""Tabletop environment throughput: env steps per second, render included, jitted, CPU.

  python benchmarks/sim_speed.py [--sizes 1 64 1024] [--repeats 5] [--steps 10]

Each measurement runs `--steps` jitted, vmapped `env.step` calls (physics + rendering of
the 64x64 observation) on a batch of B environments after one warm-up call, and prints
the median over `--repeats` runs of B * steps / seconds, and the ratio to batch 1.
"""

import argparse
import time

import jax
import numpy as np

from vla_jax.sim import expert, rollout


def steps_per_second(batch: int, steps: int, repeats: int, image_size: int) -> float:
  states = rollout.reset_batch(rollout.seed_keys(range(batch)), "train")
  act = jax.jit(jax.vmap(expert.expert_action))
  jax.block_until_ready(rollout.step_batch(states, act(states), image_size))  # compile
  rates = []
  for _ in range(repeats):
    current = states
    start = time.perf_counter()
    for _ in range(steps):
      current, obs, _, _, _ = rollout.step_batch(current, act(current), image_size)
    jax.block_until_ready(obs)
    rates.append(batch * steps / (time.perf_counter() - start))
  return float(np.median(rates))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--image_size", type=int, default=64)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, image {args.image_size}x{args.image_size}")
  base = None
  for batch in args.sizes:
    rate = steps_per_second(batch, args.steps, args.repeats, args.image_size)
    base = base or rate
    print(f"batch {batch:5d}: {rate:10.1f} env steps/s (median of {args.repeats}), "
          f"x{rate / base:.1f} vs batch {args.sizes[0]}")


if __name__ == "__main__":
  main()
