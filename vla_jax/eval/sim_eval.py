"""Closed-loop evaluation on the tabletop benchmark: success per split, Table 1, comparisons.

`evaluate(policy, splits, seeds)` rolls a `Policy` out on every requested split (by
default every OOD split of the paper plus the VL-Think suite), all seeds of a split as one
batch of environments (`sim.rollout`, vmapped and jitted), and returns per-split success
with a 95 % Wilson interval, the mean per axis (semantic, vision, execution, vlthink) and a
few episodes' frames; `workers` batches are rolled out at once, each in its own thread
(results do not depend on it). `write_report` turns that into `results.json`, `table.md` (the
paper's Table 1 layout: axis / environment / success), `success.png` and rollout strips.
`compare({name: results})` pairs two or more checkpoints over their shared seeds: paired
differences and a one-sided paired Wilcoxon signed-rank test (`scipy.stats.wilcoxon`).
"""

import concurrent.futures
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tqdm

from vla_jax.errors import ConfigError, InputError
from vla_jax.eval.config import EVAL_SPLITS
from vla_jax.sim import catalogue as cat
from vla_jax.sim import rollout as rollout_lib

AXIS_ORDER = ("semantic", "vision", "execution", "vlthink")
# Evaluation episodes start at this seed, so that no episode repeats the initial state of a
# demonstration (the bundled dataset's train seeds are 0.., its val seeds 1_000_000..).
EVAL_SEED_OFFSET = 2_000_000
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple:
  """Wilson score interval (low, high) of a binomial proportion; (0, 1) without trials."""
  if trials <= 0:
    return 0.0, 1.0
  p = successes / trials
  denominator = 1 + z * z / trials
  centre = (p + z * z / (2 * trials)) / denominator
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
  # The bounds at 0 and n successes are exactly 0 and 1 (rounding would leave ~1e-17).
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == trials else min(1.0, centre + half)
  return low, high


def _check_splits(splits: Sequence[str]) -> List[str]:
  for name in splits:
    cat.get_split(name)  # ConfigError listing the known names
  if not splits:
    raise ConfigError(f"no splits to evaluate; pass names from {', '.join(EVAL_SPLITS)}.")
  return list(splits)


def eval_seeds(count: int, first: int = 0) -> List[int]:
  """The seeds of `count` evaluation episodes per split (shared by every checkpoint).

  `first` > 0 skips the first `first` of them: a second, disjoint set of episodes (to
  report on seeds that no choice of recipe was ever looked at on).
  """
  if first < 0:
    raise ConfigError(f"the first evaluation seed index must be >= 0, got {first}.")
  return list(range(EVAL_SEED_OFFSET + first, EVAL_SEED_OFFSET + first + count))


def evaluate(policy: rollout_lib.Policy, splits: Sequence[str] = EVAL_SPLITS,
             seeds: Sequence[int] = tuple(eval_seeds(16)), *, max_steps: int = 80,
             image_size: int = 64, batch_size: Optional[int] = None, strip_episodes: int = 2,
             progress: bool = True, workers: int = 1) -> Dict[str, Any]:
  """Rolls `policy` out on each split for each seed.

  Args:
    policy: a `sim.rollout.Policy`.
    splits: split names (`sim.catalogue.SPLITS`).
    seeds: episode seeds, shared by all splits (so checkpoints pair up seed by seed);
      `eval_seeds(n)` gives n seeds disjoint from every demonstration's.
    max_steps: episode limit (the paper: 80).
    image_size: rendered image side (the policy preprocesses to its own resolution).
    batch_size: environments per batch (default: all seeds of a split at once).
    strip_episodes: keep the frames of the first K episodes of each split.
    workers: batches rolled out at once, each by its own thread. The policy's jitted calls
      release the GIL, and XLA:CPU runs one small decoding call on less than two cores:
      two concurrent batches of 16 decode 1.6x the rows per second of one. Batches are
      the same whatever the number of workers, and so are the results.
  Returns:
    {"splits": {name: {"axis", "seeds" [n], "success" [n] bool list, "steps" [n],
     "instructions" [n], "rate", "ci95" [low, high]}}, "axes": {axis: mean rate},
     "episodes", "seconds", "episodes_per_s", "frames": {name: uint8 [T+1, K, S, S, 3]}}.
  """
  splits = _check_splits(splits)
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise InputError("evaluate() needs at least one seed.")
  batch_size = batch_size or len(seeds)
  chunks = [(name, seeds[i:i + batch_size]) for name in splits
            for i in range(0, len(seeds), batch_size)]
  if int(workers) < 1:
    raise ConfigError(f"eval workers must be >= 1 (batches rolled out at once), got {workers}.")

  def run(index):
    name, chunk = chunks[index]
    first_of_split = index == 0 or chunks[index - 1][0] != name
    return rollout_lib.rollout(policy, name, chunk, max_steps=max_steps,
                               image_size=image_size,
                               frames=strip_episodes > 0 and first_of_split, progress=False)

  results_by_chunk: Dict[int, rollout_lib.RolloutResult] = {}
  start = time.perf_counter()
  bar = tqdm.tqdm(total=len(splits) * len(seeds), desc="eval_sim", unit="episode",
                  disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=int(workers)) as pool:
    futures = {pool.submit(run, i): i for i in range(len(chunks))}
    try:
      for future in concurrent.futures.as_completed(futures):
        result = future.result()
        results_by_chunk[futures[future]] = result
        bar.update(len(result.seeds))
        bar.set_postfix(split=result.split, success=f"{result.success_rate:.2f}")
    except BaseException:
      for future in futures:  # do not start batches nobody will read
        future.cancel()
      raise
  bar.close()
  seconds = time.perf_counter() - start
  outcomes: Dict[str, List[rollout_lib.RolloutResult]] = {name: [] for name in splits}
  for index, (name, _) in enumerate(chunks):
    outcomes[name].append(results_by_chunk[index])

  per_split, frames = {}, {}
  for name, results in outcomes.items():
    success = np.concatenate([r.success for r in results]).astype(bool)
    per_split[name] = {
        "axis": cat.AXES.get(name, "train"),
        "seeds": seeds,
        "success": success.tolist(),
        "steps": np.concatenate([r.steps for r in results]).astype(int).tolist(),
        "instructions": [t for r in results for t in r.instructions],
        "rate": float(success.mean()),
        "ci95": list(wilson_interval(int(success.sum()), len(success))),
    }
    if results[0].frames is not None:
      frames[name] = results[0].frames[:, :strip_episodes]
  axes = {}
  for axis in AXIS_ORDER + ("train",):
    rates = [v["rate"] for v in per_split.values() if v["axis"] == axis]
    if rates:
      axes[axis] = float(np.mean(rates))
  episodes = len(splits) * len(seeds)
  return {"splits": per_split, "axes": axes, "episodes": episodes, "seconds": seconds,
          "episodes_per_s": episodes / seconds, "max_steps": max_steps, "frames": frames}


def _ordered(splits: Mapping[str, Any]) -> List[str]:
  rank = {axis: i for i, axis in enumerate(AXIS_ORDER + ("train",))}
  return sorted(splits, key=lambda n: (rank.get(splits[n]["axis"], 99), list(splits).index(n)))


def results_table(results: Mapping[str, Any]) -> str:
  """Markdown in the paper's Table 1 layout: axis | environment | success [95 % CI]."""
  splits = results["splits"]
  lines = ["| axis | environment | success | 95 % CI |", "|---|---|---|---|"]
  for name in _ordered(splits):
    row = splits[name]
    lines.append(f"| {row['axis']} | {name} | {row['rate']:.2f} | "
                 f"[{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] |")
  for axis, mean in results["axes"].items():
    lines.append(f"| **{axis}** | mean | **{mean:.2f}** | |")
  return "\n".join(lines) + "\n"


def plot_success(results: Mapping[str, Any], path: str, title: str = "") -> str:
  """Bar chart of success per split with 95 % Wilson intervals, coloured by axis."""
  # A Figure without pyplot: no global backend switch (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  splits = results["splits"]
  names = _ordered(splits)
  rates = np.array([splits[n]["rate"] for n in names])
  low = np.array([splits[n]["ci95"][0] for n in names])
  high = np.array([splits[n]["ci95"][1] for n in names])
  palette = {"semantic": "tab:blue", "vision": "tab:orange", "execution": "tab:green",
             "vlthink": "tab:purple", "train": "tab:grey"}
  fig = Figure(figsize=(max(6, 0.45 * len(names)), 3.2))
  ax = fig.subplots()
  ax.bar(range(len(names)), rates, yerr=np.clip([rates - low, high - rates], 0, 1), capsize=2,
         color=[palette.get(splits[n]["axis"], "tab:grey") for n in names])
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("success")
  ax.set_title(title or "success per environment (95 % Wilson CI)", fontsize=10)
  handles = [Rectangle((0, 0), 1, 1, color=palette[a]) for a in palette
             if any(splits[n]["axis"] == a for n in names)]
  ax.legend(handles, [a for a in palette if any(splits[n]["axis"] == a for n in names)],
            fontsize=7, ncol=5, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def rollout_strip(frames: np.ndarray, path: str, columns: int = 8) -> str:
  """PNG of episodes as rows of `columns` evenly spaced frames; frames [T+1, K, S, S, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  times = np.linspace(0, frames.shape[0] - 1, min(columns, frames.shape[0])).round().astype(int)
  rows = [np.concatenate(list(frames[times, k]), axis=1) for k in range(frames.shape[1])]
  Image.fromarray(np.concatenate(rows, axis=0)).save(path)
  return path


def write_report(results: Mapping[str, Any], out_dir: str, title: str = "") -> Dict[str, Any]:
  """Writes results.json, table.md, success.png and strips/<split>.png under `out_dir`."""
  os.makedirs(os.path.join(out_dir, "strips"), exist_ok=True)
  paths = {"json": os.path.join(out_dir, "results.json"),
           "table": os.path.join(out_dir, "table.md"),
           "plot": plot_success(results, os.path.join(out_dir, "success.png"), title)}
  with open(paths["json"], "w") as f:
    json.dump({k: v for k, v in results.items() if k != "frames"}, f, indent=1)
  with open(paths["table"], "w") as f:
    f.write(results_table(results))
  paths["strips"] = [rollout_strip(frames, os.path.join(out_dir, "strips", f"{name}.png"))
                     for name, frames in results.get("frames", {}).items()]
  return paths


def load_results(path: str) -> Dict[str, Any]:
  """Reads a results.json (or the folder holding one)."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.json")
  if not os.path.exists(path):
    raise InputError(f"no evaluation results at {path}; run --mode=eval_sim on that workdir "
                     "first.")
  with open(path) as f:
    return json.load(f)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> float:
  """One-sided p-value of the paired Wilcoxon signed-rank test that b > a.

  Zero differences are dropped (Wilcoxon's convention); without any non-zero difference
  there is no evidence either way and the p-value is 1.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  diff = np.asarray(b, np.float64) - np.asarray(a, np.float64)
  if diff.shape != np.shape(a) or not np.any(diff != 0):
    return 1.0
  return float(stats.wilcoxon(diff, zero_method="wilcox", alternative="greater").pvalue)


def _shared(results: Mapping[str, Mapping[str, Any]], split: str):
  """Success per checkpoint over the seeds every checkpoint evaluated: {name: [n]}, seeds."""
  seed_sets = [dict(zip(r["splits"][split]["seeds"], r["splits"][split]["success"]))
               for r in results.values()]
  seeds = sorted(set.intersection(*(set(s) for s in seed_sets)))
  return {name: np.array([s[k] for k in seeds], float)
          for name, s in zip(results, seed_sets)}, seeds


def compare(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """Paired comparison of checkpoints against the first one (the baseline).

  Args:
    results: {checkpoint name: `evaluate` output or loaded results.json}, >= 2 entries.
  Returns:
    {"baseline", "rows": [{"split", "axis", "rates": {name: r}, "diff": {name: r - base},
     "p": {name: one-sided Wilcoxon p over shared seeds}}], "axes": same per axis, where a
     seed's value is its mean success over the axis' splits}.
  """
  if len(results) < 2:
    raise InputError(f"compare() needs two or more checkpoints, got {list(results)}.")
  names = list(results)
  base = names[0]
  common = [s for s in results[base]["splits"] if all(s in r["splits"] for r in results.values())]
  if not common:
    raise InputError("the checkpoints were evaluated on no common split; evaluate them on the "
                     "same splits.")
  rows, per_seed = [], {}
  for split in common:
    values, seeds = _shared(results, split)
    axis = results[base]["splits"][split]["axis"]
    for name in names:
      per_seed.setdefault(axis, {}).setdefault(name, []).append(values[name])
    rows.append(_row(split, axis, values, base, len(seeds)))
  axes = []
  for axis, by_name in per_seed.items():
    if len({len(v) for vs in by_name.values() for v in vs}) != 1:
      continue  # splits of this axis were run on different seed sets: no per-seed pairing
    axes.append(_row("mean", axis, {n: np.mean(v, axis=0) for n, v in by_name.items()}, base,
                     len(by_name[base][0])))
  return {"baseline": base, "names": names, "rows": rows, "axes": axes}


def _row(split, axis, values, base, n):
  return {"split": split, "axis": axis, "n": n,
          "rates": {k: float(np.mean(v)) for k, v in values.items()},
          "diff": {k: float(np.mean(v) - np.mean(values[base])) for k, v in values.items()
                   if k != base},
          "p": {k: paired_wilcoxon(values[base], v) for k, v in values.items() if k != base}}


def comparison_table(comparison: Mapping[str, Any]) -> str:
  """Markdown: axis | environment | success per checkpoint | diff and p vs the baseline."""
  names, base = comparison["names"], comparison["baseline"]
  others = [n for n in names if n != base]
  header = (["axis", "environment"] + names + [f"{n} - {base}" for n in others] +
            [f"p ({n} > {base})" for n in others])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in comparison["rows"] + comparison["axes"]:
    bold = "**" if row["split"] == "mean" else ""
    cells = [f"{bold}{row['axis']}{bold}", row["split"]]
    cells += [f"{row['rates'][n]:.2f}" for n in names]
    cells += [f"{row['diff'][n]:+.2f}" for n in others]
    cells += [f"{row['p'][n]:.3g}" for n in others]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
