"""The closed-loop evaluator, checked with policies whose success rates are known."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vla_jax.errors import ConfigError, InputError
from vla_jax.eval import sim_eval
from vla_jax.sim import rollout

# Two axes of one scene layout (one object, one receptacle): every split runs the same
# compiled env programs (tests/sim/test_rollout.py rolls out a VL-Think layout).
SPLITS = ("carrot", "tex03")
SEEDS = tuple(range(6))
STEPS = 20  # short enough that the expert fails some episodes: a mixed known rate
BATCH = 3  # one batch shape for every call, so the rollout compiles once


@pytest.fixture(scope="module")
def scripted_results():
  return sim_eval.evaluate(rollout.scripted_policy(), SPLITS, SEEDS, max_steps=STEPS,
                           batch_size=BATCH, progress=False)


def test_wilson_interval_matches_textbook_values():
  low, high = sim_eval.wilson_interval(5, 10)
  assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
  low, high = sim_eval.wilson_interval(0, 10)
  assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
  assert sim_eval.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_wilcoxon_on_known_inputs():
  # Five positive differences of distinct size: exact one-sided p = 1 / 2^5.
  assert sim_eval.paired_wilcoxon([0] * 5, [1, 2, 3, 4, 5]) == pytest.approx(1 / 32)
  assert sim_eval.paired_wilcoxon([1, 2, 3, 4, 5], [0] * 5) == pytest.approx(1.0)
  assert sim_eval.paired_wilcoxon([1, 0, 1], [1, 0, 1]) == 1.0


def test_scripted_policy_scores_its_known_success(scripted_results):
  for split in SPLITS:
    known = rollout.expert_success(split, SEEDS, max_steps=STEPS)
    row = scripted_results["splits"][split]
    np.testing.assert_array_equal(row["success"], known)
    assert row["rate"] == pytest.approx(known.mean())
    assert row["ci95"][0] <= row["rate"] <= row["ci95"][1]
    assert 0 < known.mean() < 1  # the test would not notice a constant result otherwise
  assert scripted_results["splits"]["carrot"]["axis"] == "semantic"
  assert scripted_results["splits"]["tex03"]["axis"] == "vision"
  assert scripted_results["axes"]["vision"] == scripted_results["splits"]["tex03"]["rate"]


def test_concurrent_batches_give_the_same_results(scripted_results):
  # Two batches per split, three at once: results land in their split's seed order.
  parallel = sim_eval.evaluate(rollout.scripted_policy(), SPLITS, SEEDS, max_steps=STEPS,
                               batch_size=BATCH, progress=False, workers=3)
  for split in SPLITS:
    for key in ("success", "steps", "instructions", "seeds"):
      assert parallel["splits"][split][key] == scripted_results["splits"][split][key]
    np.testing.assert_array_equal(parallel["frames"][split], scripted_results["frames"][split])
  with pytest.raises(ConfigError, match="workers must be >= 1"):
    sim_eval.evaluate(rollout.scripted_policy(), SPLITS, SEEDS, workers=0, progress=False)


def test_random_policy_scores_near_zero_and_is_reproducible():
  first = sim_eval.evaluate(rollout.random_policy(3), SPLITS, SEEDS, max_steps=STEPS,
                            batch_size=BATCH, progress=False, strip_episodes=0)
  second = sim_eval.evaluate(rollout.random_policy(3), SPLITS, SEEDS, max_steps=STEPS,
                             batch_size=BATCH, progress=False, strip_episodes=0)
  for split in SPLITS:
    assert first["splits"][split]["rate"] <= 1 / 6
    assert first["splits"][split]["success"] == second["splits"][split]["success"]
    assert first["splits"][split]["steps"] == second["splits"][split]["steps"]


def test_report_files_are_written(scripted_results, tmp_path):
  # Plots are drawn without pyplot: a notebook's backend (inline plots) is left alone.
  import matplotlib  # pylint: disable=g-import-not-at-top
  before = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    paths = sim_eval.write_report(scripted_results, str(tmp_path))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
  table = open(paths["table"]).read()
  for split in SPLITS:
    assert f"| {split} |" in table
  assert "| **semantic** | mean |" in table
  saved = json.load(open(paths["json"]))
  assert saved["splits"]["carrot"]["success"] == scripted_results["splits"]["carrot"]["success"]
  assert Image.open(paths["plot"]).size[0] > 100
  assert sorted(os.path.basename(p) for p in paths["strips"]) == sorted(f"{s}.png" for s in SPLITS)
  strip = np.asarray(Image.open(paths["strips"][0]))
  assert strip.shape[0] == 2 * 64  # two episodes, one row each


def _fake(successes):
  return {"splits": {name: {"axis": axis, "seeds": list(range(len(s))), "success": s}
                     for name, (axis, s) in successes.items()}}


def test_compare_pairs_seeds_and_tests_one_sided():
  base = _fake({"carrot": ("semantic", [0, 0, 0, 0, 0, 0]),
                "tex03": ("vision", [1, 1, 0, 0, 1, 0])})
  better = _fake({"carrot": ("semantic", [1, 1, 1, 1, 1, 1]),
                  "tex03": ("vision", [1, 1, 0, 0, 1, 0])})
  comparison = sim_eval.compare({"sft": base, "align": better})
  rows = {r["split"]: r for r in comparison["rows"]}
  assert rows["carrot"]["diff"]["align"] == pytest.approx(1.0)
  assert rows["carrot"]["p"]["align"] == pytest.approx(1 / 64)  # six +1 differences
  assert rows["tex03"]["diff"]["align"] == 0.0 and rows["tex03"]["p"]["align"] == 1.0
  table = sim_eval.comparison_table(comparison)
  assert "align - sft" in table and "| semantic | carrot | 0.00 | 1.00 | +1.00 |" in table
  with pytest.raises(InputError):
    sim_eval.compare({"only": base})


def test_unknown_split_is_a_config_error():
  with pytest.raises(ConfigError, match="Known splits"):
    sim_eval.evaluate(rollout.random_policy(), ["nope"], [0], progress=False)


def test_a_second_seed_set_is_disjoint_from_the_default_one():
  default = sim_eval.eval_seeds(32)
  second = sim_eval.eval_seeds(64, first=100)
  assert len(second) == 64 and not set(default) & set(second)
  assert sim_eval.eval_seeds(8) == default[:8]  # the default set is a prefix: shared seeds
  with pytest.raises(ConfigError, match="must be >= 0"):
    sim_eval.eval_seeds(4, first=-1)
