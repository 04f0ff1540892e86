"""Closed-loop evaluation throughput of a VLA checkpoint: episodes per second on this host.

  python benchmarks/eval_speed.py --workdir workdir [--batches 4 16] [--repeats 3]
      [--max_steps 80] [--split carrot] [--workers 2] [--smoke] [--json FILE]

Three policies run through the same rollout: the checkpoint decoding its H x 7 action
tokens with the KV cache (`greedy_decode`: one prefill and H x 7 - 1 incremental steps per
policy call; H is the run's `data.action_horizon`, 4 for the tiny default, and the H
actions of a chunk are executed before the next call), the same checkpoint decoding by full
recomputation (`use_cache=False`: H x 7 whole forward passes, the decoder before the
cache), and the scripted expert (the simulator alone, no model). A fourth runs the
cached policy as `--mode=eval_sim` does by default (`sim_eval.evaluate`, `eval.workers`):
`--workers` batches of B environments at once, each in its own thread (W x B episodes).
For each batch size B every policy evaluates B full-length episodes (`--max_steps` steps
each; the gripper is never released, so no episode ends early) after one warm-up run that
compiles everything. The repeats interleave the policies, so a busy machine slows all
of them alike; the script prints the median over `--repeats` of episodes/s and policy
steps/s and the ratio of the cached to the full-recompute policy at each B. A last table
times the decoder alone (`greedy_action_tokens` on one batch of B preprocessed frames,
median of 20 interleaved calls), which is what the cache changes. `--smoke` runs one short
repeat at B=2 (the test suite's check that the script works on the current default).
"""

import argparse
import json
import statistics
import time

import jax
import numpy as np

from vla_jax.eval import policy as policy_lib
from vla_jax.eval import sim_eval
from vla_jax.sim import rollout


class _NeverDone:
  """Wraps a policy so every episode runs the full step budget (fair timing)."""

  def __init__(self, policy):
    self.policy = policy
    self.wants_env_state = getattr(policy, "wants_env_state", False)

  def __call__(self, images, instructions, states, **kwargs):
    actions = np.array(self.policy(images, instructions, states, **kwargs))
    actions[..., 6] = 0.0  # never release (every action of a chunk): no early stop
    return actions


def episodes_per_second(policies, split: str, batch: int, max_steps: int, repeats: int):
  """{name: median episodes/s} of each policy at one batch size, repeats interleaved.

  `policies` maps names to (policy, workers): W > 1 rolls out W batches of B at once
  (`sim_eval.evaluate(..., workers=W)`, W x B episodes).
  """
  def run(policy, workers, first_seed):
    seeds = range(first_seed, first_seed + workers * batch)
    if workers == 1:
      rollout.rollout(policy, split, seeds, max_steps=max_steps, progress=False)
    else:
      sim_eval.evaluate(policy, [split], seeds, max_steps=max_steps, batch_size=batch,
                        strip_episodes=0, progress=False, workers=workers)
    return len(seeds)

  for policy, workers in policies.values():  # compile
    run(policy, workers, 0)
  rates = {name: [] for name in policies}
  for repeat in range(repeats):
    for name, (policy, workers) in policies.items():
      start = time.perf_counter()
      episodes = run(policy, workers, 1000 * (repeat + 1))
      rates[name].append(episodes / (time.perf_counter() - start))
  return {name: statistics.median(values) for name, values in rates.items()}


def decode_milliseconds(policy, batch: int, calls: int = 20):
  """{use_cache: median ms} of one `greedy_action_tokens` call (a whole chunk) on B frames."""
  frames = policy.preprocess(np.zeros((batch, 64, 64, 3), np.uint8))
  states = np.zeros((batch, policy.state_stats.dim), np.float32) if policy.proprio_dims else None
  tokens, lengths = policy.prompt_batch(["put the carrot on the plate"] * batch, states)
  decode = lambda use_cache: jax.block_until_ready(policy_lib.greedy_action_tokens(
      policy.model, policy.params, frames, tokens, lengths,
      policy.action_dim * policy.action_horizon, use_cache=use_cache))
  times = {True: [], False: []}
  for use_cache in times:  # compile
    decode(use_cache)
  for _ in range(calls):
    for use_cache in times:
      start = time.perf_counter()
      decode(use_cache)
      times[use_cache].append(1000 * (time.perf_counter() - start))
  return {use_cache: statistics.median(values) for use_cache, values in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir",
                      help="a trained run (default: the default run of vla_jax.main)")
  parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_steps", type=int, default=80)
  parser.add_argument("--split", default="carrot")
  parser.add_argument("--workers", type=int, default=2,
                      help="batches rolled out at once by the eval_sim path (1 or less: skip it)")
  parser.add_argument("--smoke", action="store_true",
                      help="B=2, 8 steps, one repeat, 2 decoder calls: checks the script runs")
  parser.add_argument("--json", default="", help="also write the numbers to this file")
  args = parser.parse_args()
  calls = 20
  if args.smoke:
    args.batches, args.repeats, args.max_steps, calls = [2], 1, 8, 2
  cached = policy_lib.load_policy(args.workdir)
  policies = {
      "VLA, KV cache": (_NeverDone(cached), 1),
      "VLA, recompute": (_NeverDone(policy_lib.load_policy(args.workdir, use_cache=False)), 1),
      "scripted expert": (_NeverDone(rollout.scripted_policy()), 1),
  }
  threaded = f"VLA, KV cache, {args.workers} x B at once"
  if args.workers > 1:
    policies[threaded] = (_NeverDone(cached), args.workers)
  horizon = cached.action_horizon
  print(f"split={args.split} max_steps={args.max_steps} repeats={args.repeats} "
        f"action_horizon={horizon} (medians; policies interleaved within each repeat)")
  report = {"split": args.split, "max_steps": args.max_steps, "repeats": args.repeats,
            "action_horizon": horizon, "rollout": [], "decode": []}
  for batch in args.batches:
    rates = episodes_per_second(policies, args.split, batch, args.max_steps, args.repeats)
    for name, rate in rates.items():
      print(f"{name:28s} B={batch:4d}  {rate:8.3f} episodes/s  "
            f"{rate * args.max_steps:9.1f} steps/s")
    ratio = rates["VLA, KV cache"] / rates["VLA, recompute"]
    print(f"{'':28s} B={batch:4d}  KV cache / recompute: x{ratio:.2f}")
    entry = {"batch": batch, "episodes_per_s": rates, "cache_ratio": ratio}
    if threaded in rates:
      entry["workers_ratio"] = rates[threaded] / rates["VLA, KV cache"]
      print(f"{'':28s} B={batch:4d}  {args.workers} x B at once / one batch: "
            f"x{entry['workers_ratio']:.2f}")
    report["rollout"].append(entry)
  print(f"decoding {horizon} x 7 action tokens alone (greedy_action_tokens, median of "
        f"{calls} calls):")
  for batch in args.batches:
    ms = decode_milliseconds(cached, batch, calls)
    print(f"B={batch:4d}  KV cache {ms[True]:8.2f} ms  recompute {ms[False]:8.2f} ms  "
          f"recompute / KV cache: x{ms[False] / ms[True]:.2f}")
    report["decode"].append({"batch": batch, "cache_ms": ms[True], "recompute_ms": ms[False]})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
