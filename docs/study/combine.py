"""Pools study runs made by separate `--mode=study` invocations into one report.

The 6000-step study ran one seed (or method) per session, since each session's machine
starts empty, so its runs live in several study directories. Each run's episode records
are copied here as `docs/study/runs/<method>_seed<k>/results.json`, each directory's
probe results as `probe_seed<k>.json` (or `probe_<name>.json`). This script reads them,
computes the study's numbers with `vla_jax.study.summarize` (the function `--mode=study`
uses: per-environment means, axis means, one-sided paired Wilcoxon tests over
(seed, episode) pairs) and writes `compare.md`, `summary.json`, `axes.png` and
`probe.png` beside it.

Runs of the teacher variant (`configs/study.py:siglip_teacher`, Align with a teacher
pretrained on image-caption pairs) are under `siglip_teacher/runs/align_seed<k>/`; they are
compared with SFT and with the default Align on the seeds they share, in
`siglip_teacher/compare.md` and `siglip_teacher/summary.json`. The same teacher with the
second study's VLM (`configs/study.py:siglip_continued`) is compared the same way with
that study's runs, in `docs/study_vlm_continued/siglip_teacher/`. SFT and Freeze never
read the teacher, so a variant's Align column is set against the base study's SFT and
Freeze of the same seeds (their probes too, where the variant's probe of the pretrained
VLM equals the base study's: same VLM, same probe images).

  python docs/study/combine.py
"""

import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from vla_jax import study as study_lib  # noqa: E402

COMMAND = "python docs/study/combine.py"


def read_runs(folder: str) -> dict:
  evals = {}
  for path in sorted(glob.glob(os.path.join(folder, "runs", "*_seed*", "results.json"))):
    with open(path) as f:
      evals[os.path.basename(os.path.dirname(path))] = json.load(f)
  return evals


def read_probes(folder: str) -> dict:
  probe = {}
  for path in sorted(glob.glob(os.path.join(folder, "probe.json")) +
                     glob.glob(os.path.join(folder, "probe_*.json"))):
    with open(path) as f:
      probe.update(json.load(f)["results"])
  return probe


def pooled(evals: dict, probe: dict) -> dict:
  """`study.summarize` over every run in `evals` (methods x seeds found there)."""
  runs = [re.fullmatch(r"(\w+)_seed(\d+)", name).groups() for name in evals]
  methods = tuple(m for m in study_lib.METHODS if any(m == r[0] for r in runs))
  seeds = tuple(sorted({int(s) for _, s in runs}))
  first = next(iter(evals.values()))
  study = study_lib.StudyConfig(methods=methods, seeds=seeds,
                                eval_splits=tuple(first["splits"]),
                                eval_episodes=len(first["splits"]["train"]["success"]))
  return {"command": COMMAND, "wall_clock_s": 0.0, "runs": sorted(evals),
          **study_lib.summarize(study, evals, probe)}


def recorded_seconds(folder: str) -> dict:
  """Stage seconds of each study directory copied under `folder` (`*study*/study_state.json`)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "*study*", "study_state.json")) +
                     glob.glob(os.path.join(folder, "study_state.json"))):
    with open(path) as f:
      out[os.path.basename(os.path.dirname(path))] = sum(json.load(f)["seconds"].values())
  return out


def write(folder: str, summary: dict, title: str = "") -> str:
  with open(os.path.join(folder, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  study_lib.plot_axes(summary, os.path.join(folder, "axes.png"))
  study_lib.plot_probe(summary, os.path.join(folder, "probe.png"))
  report = study_lib.report_markdown(summary)
  report = report.replace("![axis means](axes.png) ![probe](probe.png) ![attention]"
                          "(attention.png)", "![axis means](axes.png) ![probe](probe.png)")
  if title:
    report = f"{title}\n\n{report}"
  with open(os.path.join(folder, "compare.md"), "w") as f:
    f.write(report)
  return report


def seed_of(name: str) -> int:
  return int(re.search(r"seed(\d+)", name).group(1))


def compare_variant(base_dir: str, variant_dir: str, title: str) -> None:
  """The variant's Align runs in Align's column, the base study's SFT and Freeze beside."""
  variant = read_runs(variant_dir)
  if not variant:
    return
  base = read_runs(base_dir)
  seeds = sorted(seed_of(n) for n in variant)
  # The variant's Align runs take Align's place; SFT (and Freeze) of the same seeds stay.
  shared = {n: r for n, r in base.items()
            if not n.startswith("align_") and seed_of(n) in seeds}
  probe = read_probes(variant_dir)
  base_probe = read_probes(base_dir)
  if "pretrained" in probe and probe["pretrained"] == base_probe.get("pretrained"):
    probe.update({n: r for n, r in base_probe.items() if n in shared})
  summary = pooled({**shared, **variant}, probe)
  summary["wall_clock_s"] = sum(recorded_seconds(variant_dir).values())
  default_align = pooled({n: r for n, r in base.items() if seed_of(n) in seeds}, {})
  summary["default_align_on_these_seeds"] = {
      "in_distribution_success": default_align["in_distribution_success"].get("align"),
      "method_axis_means": default_align["method_axis_means"].get("align")}
  print(write(variant_dir, summary, title))


def main() -> None:
  evals = read_runs(HERE)
  summary = pooled(evals, read_probes(HERE))
  seconds = recorded_seconds(HERE)
  summary["wall_clock_s"] = sum(seconds.values())
  summary["wall_clock_by_invocation"] = {
      **seconds, "note": "stage seconds recorded by the study directories copied here; "
      "seed 0's SFT and Align ran in an earlier session whose stage times were not kept"}
  print(write(HERE, summary))
  compare_variant(HERE, os.path.join(HERE, "siglip_teacher"),
                  "Align with the image-text (SigLIP-style) teacher "
                  "(`configs/study.py:siglip_teacher`) in Align's column; SFT and Freeze are "
                  "the default study's runs of the same seeds.")
  continued = os.path.join(HERE, "..", "study_vlm_continued")
  compare_variant(continued, os.path.join(continued, "siglip_teacher"),
                  "Align with the image-text (SigLIP-style) teacher from the second study's "
                  "VLM (`configs/study.py:siglip_continued`) in Align's column; SFT and Freeze "
                  "are the `vlm_continued` study's runs of the same seeds.")


if __name__ == "__main__":
  main()
