"""Pools study runs made by separate `--mode=study` invocations into one report.

The 6000-step study ran one seed per session (each session's machine starts empty), so
its runs live in several places: `docs/study_6k/runs/<method>_seed<k>/results.json`
(copied from each study directory). This script reads every such file, computes the
study's numbers with `vla_jax.study.summarize` (the function `--mode=study` uses: the
same per-environment means, axis means and one-sided paired Wilcoxon tests over
(seed, episode) pairs) and writes `compare.md` and `summary.json` beside it. Probes are
taken from each study directory's `probe.json` when it was copied here as
`probe_seed<k>.json`.

  python docs/study_6k/combine.py
"""

import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from vla_jax import study as study_lib  # noqa: E402


def main() -> None:
  evals = {}
  for path in sorted(glob.glob(os.path.join(HERE, "runs", "*_seed*", "results.json"))):
    name = os.path.basename(os.path.dirname(path))
    with open(path) as f:
      evals[name] = json.load(f)
  runs = [re.fullmatch(r"(\w+)_seed(\d+)", name).groups() for name in evals]
  methods = tuple(m for m in study_lib.METHODS if any(m == r[0] for r in runs))
  seeds = tuple(sorted({int(s) for _, s in runs}))
  splits = tuple(next(iter(evals.values()))["splits"])
  probe = {}
  for path in sorted(glob.glob(os.path.join(HERE, "probe_seed*.json"))):
    with open(path) as f:
      probe.update(json.load(f)["results"])
  study = study_lib.StudyConfig(methods=methods, seeds=seeds, eval_splits=splits,
                                eval_episodes=len(evals[f"{methods[0]}_seed{seeds[0]}"]
                                                  ["splits"]["train"]["success"]))
  summary = {"command": "python docs/study_6k/combine.py", "wall_clock_s": 0.0,
             "runs": sorted(evals), **study_lib.summarize(study, evals, probe)}
  with open(os.path.join(HERE, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  report = study_lib.report_markdown(summary)
  report = report.replace("![axis means](axes.png) ![probe](probe.png) ![attention]"
                          "(attention.png)", "")
  with open(os.path.join(HERE, "compare.md"), "w") as f:
    f.write(report)
  print(report)


if __name__ == "__main__":
  main()
