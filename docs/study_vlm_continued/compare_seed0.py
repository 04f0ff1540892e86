"""Seed 0 of several studies side by side: success per environment and axis, per method.

  python docs/study_vlm_continued/compare_seed0.py NAME=summary.json [NAME=summary.json ...]

Each summary.json is a study's (`--mode=study`); the table has one column per method and
study, seed 0 of each (the one seed every study here ran), the axis means below.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vla_jax.sim import catalogue  # noqa: E402

AXES = ("train", "semantic", "vision", "execution", "vlthink")


def main(entries):
  studies = {}
  for entry in entries:
    name, _, path = entry.partition("=")
    with open(path) as f:
      studies[name] = json.load(f)
  columns = [(m, n) for m in ("sft", "align", "freeze") for n, s in studies.items()
             if 0 in s["seeds"].get(m, [])]
  first = studies[columns[0][1]]["per_environment"][columns[0][0]]
  print("| axis | environment | " + " | ".join(f"{m} ({n})" for m, n in columns) + " |")
  print("|" + "---|" * (2 + len(columns)))

  def seed0(method, name, env):
    study = studies[name]
    return study["per_environment"][method][env][study["seeds"][method].index(0)]

  for env in first:
    print(f"| {catalogue.AXES.get(env, 'train')} | {env} | " +
          " | ".join(f"{seed0(m, n, env):.2f}" for m, n in columns) + " |")
  for axis in AXES:
    envs = [e for e in first if catalogue.AXES.get(e, "train") == axis]
    means = [sum(seed0(m, n, e) for e in envs) / len(envs) for m, n in columns]
    print(f"| {axis} | mean | " + " | ".join(f"**{v:.2f}**" for v in means) + " |")


if __name__ == "__main__":
  main(sys.argv[1:])
