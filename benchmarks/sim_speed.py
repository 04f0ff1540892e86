"""Tabletop environment throughput: env steps per second, render included, jitted, CPU.

  python benchmarks/sim_speed.py [--sizes 1 64 1024] [--repeats 3] [--steps 3] [--no_reference]

For each batch B, three jitted, vmapped step functions (physics + the 64x64 observation)
are compiled and then timed in alternating rounds in this one process, so all see the
same machine load:
  "new"       `rollout.step_batch` (`render.render_scene`: texture tables, windows and an
              arm strip, libm only where a value reaches the image, one colour plane at
              a time; batches above `rollout.SIM_CHUNK` = 64 environments run as a loop
              over chunks of 64);
  "one vmap"  the same step vmapped over the whole batch at once (`chunk=0`, before the
              chunks; the same as "new" at B <= 64, so timed only above it);
  "previous"  the same step rendered by `env.render_v1` (`render.render_scene_v1`, the
              fast path before this one, which rendered the bundled dataset);
  "reference" the same step rendered by `env.render_reference` (every texture family and
              every sprite at every pixel).
All of them draw the same images (tests/sim/test_render.py states the tolerance). Each round runs `--steps`
expert steps; the script prints the median over `--repeats` rounds of B * steps /
seconds for each and the ratios new / previous, new / one vmap and new / reference.
"""

import argparse
import functools
import time

import jax
import numpy as np

from vla_jax.sim import env, expert, rollout


def _step_with(render_fn):
  """`rollout.step_batch` with another renderer."""

  @functools.partial(jax.jit, static_argnames=("image_size",))
  def step(states, actions, image_size: int = 64):

    def one(state, action):
      new, reward = env.advance(state, action)
      obs = {"image": render_fn(new, image_size), "state": env.proprio(new)}
      return new, obs, reward, new.done, {"success": new.success, "held": new.held,
                                          "t": new.t}

    return jax.vmap(one)(states, actions)

  return step


step_previous = _step_with(env.render_v1)
step_reference = _step_with(env.render_reference)


def _round(step_fn, states, act, steps: int, image_size: int) -> float:
  current, start = states, time.perf_counter()
  for _ in range(steps):
    current, obs, _, _, _ = step_fn(current, act(current), image_size)
  jax.block_until_ready(obs)
  return states.t.shape[0] * steps / (time.perf_counter() - start)


def compare(batch: int, split: str, steps: int, repeats: int, image_size: int,
            reference: bool = True) -> dict:
  """{path: median env steps/s} at batch B, measured in alternating rounds."""
  states = rollout.reset_batch(rollout.seed_keys(range(batch)), split)
  act = jax.jit(jax.vmap(expert.expert_action))
  paths = {"new": rollout.step_batch}
  if batch > rollout.SIM_CHUNK:
    paths["one vmap"] = functools.partial(rollout.step_batch, chunk=0)
  paths["previous"] = step_previous
  if reference:
    paths["reference"] = step_reference
  for fn in paths.values():
    jax.block_until_ready(fn(states, act(states), image_size))  # compile
  rates = {name: [] for name in paths}
  for _ in range(repeats):
    for name, fn in paths.items():
      rates[name].append(_round(fn, states, act, steps, image_size))
  return {name: float(np.median(r)) for name, r in rates.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024])
  parser.add_argument("--split", default="train")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--no_reference", action="store_true",
                      help="skip the (slow) reference renderer")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, split {args.split}, image "
        f"{args.image_size}x{args.image_size}, median of {args.repeats} alternating rounds "
        f"of {args.steps} steps; env steps/s")
  for batch in args.sizes:
    r = compare(batch, args.split, args.steps, args.repeats, args.image_size,
                not args.no_reference)
    line = (f"batch {batch:5d}: new {r['new']:8.1f}  previous {r['previous']:8.1f}  "
            f"x{r['new'] / r['previous']:.2f}")
    if "one vmap" in r:
      line += f"  one vmap {r['one vmap']:8.1f}  x{r['new'] / r['one vmap']:.2f}"
    if "reference" in r:
      line += f"  reference {r['reference']:7.1f}  x{r['new'] / r['reference']:.1f}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
