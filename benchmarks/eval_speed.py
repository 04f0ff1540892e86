"""Closed-loop evaluation throughput of a VLA checkpoint: episodes per second on this host.

  python benchmarks/eval_speed.py --workdir workdir [--batches 4 16] [--repeats 3]
      [--max_steps 80] [--split carrot]

For each batch size B it evaluates B full-length episodes (every episode runs `--max_steps`
steps: the policy acts 7 greedy forward passes per step, no KV cache) after one warm-up
run that compiles everything, and prints the median over `--repeats` of episodes / s and
policy steps / s, plus the ratio to the first batch size. The scripted expert through the
same path is the simulator-only reference (no model).
"""

import argparse
import statistics
import time

import numpy as np

from vla_jax.eval import policy as policy_lib
from vla_jax.sim import rollout


def episodes_per_second(policy, split: str, batch: int, max_steps: int, repeats: int) -> float:
  rollout.rollout(policy, split, range(batch), max_steps=max_steps, progress=False)  # compile
  rates = []
  for repeat in range(repeats):
    seeds = range(1000 * (repeat + 1), 1000 * (repeat + 1) + batch)
    start = time.perf_counter()
    rollout.rollout(policy, split, seeds, max_steps=max_steps, progress=False)
    rates.append(batch / (time.perf_counter() - start))
  return statistics.median(rates)


class _NeverDone:
  """Wraps a policy so every episode runs the full step budget (fair timing)."""

  def __init__(self, policy):
    self.policy = policy
    self.wants_env_state = getattr(policy, "wants_env_state", False)

  def __call__(self, images, instructions, states, **kwargs):
    actions = np.array(self.policy(images, instructions, states, **kwargs))
    actions[:, 6] = 0.0  # never release: the object is never placed, no early stop
    return actions


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir",
                      help="a trained run (default: the default run of vla_jax.main)")
  parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_steps", type=int, default=80)
  parser.add_argument("--split", default="carrot")
  args = parser.parse_args()
  policies = {"tiny VLA": policy_lib.load_policy(args.workdir),
              "scripted expert": rollout.scripted_policy()}
  print(f"split={args.split} max_steps={args.max_steps} repeats={args.repeats}")
  for name, policy in policies.items():
    base = None
    for batch in args.batches:
      rate = episodes_per_second(_NeverDone(policy), args.split, batch, args.max_steps,
                                 args.repeats)
      base = base or rate
      print(f"{name:16s} B={batch:4d}  {rate:8.3f} episodes/s  "
            f"{rate * args.max_steps:9.1f} steps/s  x{rate / base:.2f} vs B={args.batches[0]}")


if __name__ == "__main__":
  main()
