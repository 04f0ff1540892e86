"""The study (`--mode=study`, vla_jax/study.py): the smoke preset end to end, each stage's
output feeding the next, resuming, and the report's numbers against the episode records."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO
from vla_jax import study as study_lib
from vla_jax.errors import ConfigError
from vla_jax.eval import sim_eval
from vla_jax.experiment import load_config, parse_config
from vla_jax.sim import bundled
from vla_jax.sim import catalogue as cat
from vla_jax.typed_config import from_mapping


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """The smoke study, run once: (config, study dir, summary, stage seconds)."""
  root = tmp_path_factory.mktemp("study")
  patch = pytest.MonkeyPatch()
  patch.setenv("VLA_JAX_CACHE", str(root / "cache"))  # tokenizer and pretraining
  try:
    config = load_config(REPO / "configs" / "study.py", "smoke")
    with config.unlocked():
      config.data.sources = [dict(config.data.sources[0], data_dir=bundled.bundled_dataset_dir(
          str(root / "data"), num_train=6, num_val=2, progress=False))]
    workdir = str(root / "study")
    summary = study_lib.run_study(config, workdir, "smoke")
    with open(os.path.join(workdir, "study_state.json")) as f:
      seconds = json.load(f)["seconds"]
    yield config, workdir, summary, seconds
  finally:
    patch.undo()


def _results(workdir, method, seed=0):
  return sim_eval.load_results(os.path.join(workdir, "runs", f"{method}_seed{seed}", "eval_sim"))


@pytest.mark.slow  # the smoke study (every stage, a few steps)
def test_smoke_study_writes_every_output(smoke):
  config, workdir, summary, seconds = smoke
  for name in ("report.md", "summary.json", "axes.png", "probe.png", "attention.png",
               "probe.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  assert set(on_disk["in_distribution_success"]) == {"sft", "align", "freeze"}
  assert set(on_disk["axis_means"]) == {"sft_seed0", "align_seed0", "freeze_seed0"}
  for means in on_disk["axis_means"].values():
    assert set(means) == {"semantic", "vision", "execution", "vlthink"}
  assert set(on_disk["p_values"]["align_vs_sft"]) == {"train", "semantic", "vision",
                                                      "execution", "vlthink"}
  assert set(on_disk["probe_accuracy"]) == {"teacher", "pretrained", "sft", "align", "freeze"}
  assert on_disk["seeds"] == {"sft": [0], "align": [0], "freeze": [0]}
  assert on_disk["command"] == "smoke" and on_disk["wall_clock_s"] > 0
  assert on_disk["wall_clock_s"] == pytest.approx(sum(seconds.values()))
  # Every run is evaluated on the same environments and episode seeds.
  seeds = sim_eval.eval_seeds(config.study.eval_episodes)
  for method in ("sft", "align", "freeze"):
    results = _results(workdir, method)
    assert sorted(results["splits"]) == sorted(config.study.eval_splits)
    assert all(r["seeds"] == seeds for r in results["splits"].values())
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| axis | environment | SFT | Align | Freeze |" in report
  assert "| vlthink | vlthink_shape |" in report


@pytest.mark.slow  # the smoke study (every stage, a few steps)
def test_report_numbers_follow_from_episode_records(smoke):
  _, workdir, summary, _ = smoke
  for method in ("sft", "align", "freeze"):
    results = _results(workdir, method)
    train = np.mean(results["splits"]["train"]["success"])
    assert summary["in_distribution_success"][method] == pytest.approx(train)
    for axis in ("semantic", "vision", "execution", "vlthink"):
      rates = [np.mean(r["success"]) for name, r in results["splits"].items()
               if cat.AXES.get(name) == axis]
      assert summary["axis_means"][f"{method}_seed0"][axis] == pytest.approx(np.mean(rates))
  probe = json.load(open(os.path.join(workdir, "probe.json")))["results"]
  assert summary["probe_accuracy"]["align"] == probe["align_seed0"]["test_top1"]


@pytest.mark.slow  # the smoke study (every stage, a few steps)
def test_stages_feed_each_other(smoke):
  """Stage 1's teacher loads through the teacher loader; stage 2's VLM is every run's start
  (the Freeze run still holds its vision towers exactly)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vla_jax import modeling  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.weights import teacher as teacher_weights  # pylint: disable=g-import-not-at-top
  config, workdir, _, _ = smoke
  study = from_mapping(study_lib.StudyConfig, config.study.to_dict(), "study")
  base = study_lib.method_config(config, "align", 0, {})
  weights = study_lib.pretrain_weights(base, study)  # cached: no second pretraining
  experiment = parse_config(base)
  assert weights["teacher"].endswith(".npz") and weights["teacher_format"] == "big_vision"
  teacher = teacher_weights.load_teacher(weights["teacher"], experiment.teacher, "big_vision")
  assert jax.tree_util.tree_leaves(teacher)
  models = modeling.build_models(experiment)
  params = modeling.create_params(models, experiment, weights, jax.random.key(0))
  frozen, _, _, _ = policy_lib.load_checkpoint(os.path.join(workdir, "runs", "freeze_seed0"))
  tuned, _, _, _ = policy_lib.load_checkpoint(os.path.join(workdir, "runs", "sft_seed0"))
  same = jax.tree_util.tree_map(np.array_equal, frozen["siglip"], params["student"]["siglip"])
  assert all(jax.tree_util.tree_leaves(same))
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), tuned["siglip"],
                                 params["student"]["siglip"])
  assert any(jax.tree_util.tree_leaves(moved))  # SFT trains the towers it started from
  step_diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), tuned["llm"],
                                     params["student"]["llm"])
  assert max(jax.tree_util.tree_leaves(step_diff)) < 0.1  # 3 steps from the VLM, not random
  # The smoke VLM stage continues another: it starts where that one ended (its held-out
  # answers before training are the other's after), and that one is cached on its own.
  from vla_jax.train import pretrain, vlm_pretrain  # pylint: disable=g-import-not-at-top
  vlm = from_mapping(vlm_pretrain.VLMPretrainConfig, dict(study.vlm_pretrain))
  setup = from_mapping(pretrain.PretrainConfig, dict(study.pretrain))
  first = pretrain.ensure_pretrained(experiment, setup, parts=(),
                                     vlm_config=vlm.continue_from)["student"]
  assert os.path.exists(first) and first != weights["student"]
  with open(pretrain.metrics_path(first)) as f, \
       open(pretrain.metrics_path(weights["student"])) as g:
    first_metrics, continued_metrics = json.load(f), json.load(g)
  assert continued_metrics["l1_before"] == pytest.approx(first_metrics["l1"], rel=1e-6)
  assert continued_metrics["l1_before"] != pytest.approx(first_metrics["l1_before"], rel=1e-6)


@pytest.mark.slow  # the smoke study (every stage, a few steps)
def test_rerun_skips_finished_stages(smoke):
  config, workdir, summary, seconds = smoke
  again = study_lib.run_study(config, workdir, "smoke again")
  with open(os.path.join(workdir, "study_state.json")) as f:
    state = json.load(f)
  for stage in ("finetune/sft_seed0", "evaluate/align_seed0", "probe"):
    assert stage in seconds
  for stage, value in seconds.items():
    if stage.startswith(("finetune/", "evaluate/")):
      assert state["seconds"][stage] == value, stage  # not run again
  assert again["in_distribution_success"] == summary["in_distribution_success"]
  assert [i["command"] for i in state["invocations"]] == ["smoke", "smoke again"]


def _fake_results(success_by_split):
  splits = {name: {"axis": cat.AXES.get(name, "train"), "seeds": list(range(len(s))),
                   "success": list(map(bool, s)), "rate": float(np.mean(s))}
            for name, s in success_by_split.items()}
  return {"splits": splits}


def test_summarize_pairs_seeds_and_episodes():
  rng = np.random.default_rng(0)
  study = study_lib.StudyConfig(seeds=(0, 1), eval_episodes=8,
                                eval_splits=("train", "carrot", "plate", "tex05"))
  evals, records = {}, {}
  for method, p in (("sft", 0.3), ("align", 0.7), ("freeze", 0.5)):
    for seed in (0, 1):
      records[(method, seed)] = {s: rng.random(8) < p for s in study.eval_splits}
      evals[f"{method}_seed{seed}"] = _fake_results(records[(method, seed)])
  summary = study_lib.summarize(study, evals, {})
  # Semantic: an episode's value is its mean over carrot and plate; pairs over both seeds.
  semantic = {m: np.concatenate([(records[(m, s)]["carrot"] + 0.0 + records[(m, s)]["plate"]) / 2
                                 for s in (0, 1)]) for m in ("sft", "align")}
  diff = semantic["align"] - semantic["sft"]
  expected = stats.wilcoxon(diff, zero_method="wilcox", alternative="greater").pvalue
  assert summary["p_values"]["align_vs_sft"]["semantic"] == pytest.approx(expected)
  assert summary["in_distribution_success"]["align"] == pytest.approx(
      np.mean([records[("align", s)]["train"].mean() for s in (0, 1)]))
  assert summary["per_environment"]["freeze"]["tex05"] == [
      records[("freeze", s)]["tex05"].mean() for s in (0, 1)]
  assert "vlthink" not in summary["p_values"]["align_vs_sft"]  # no such environment run
  report = study_lib.report_markdown({**summary, "command": "x", "wall_clock_s": 60})
  assert "| semantic | carrot |" in report and "±" in report


def test_study_config_rejects_what_it_cannot_run():
  with pytest.raises(ConfigError, match="unknown method 'lora'"):
    study_lib.StudyConfig(methods=("sft", "lora"))
  with pytest.raises(ConfigError, match="must include 'train'"):
    study_lib.StudyConfig(eval_splits=("carrot",))
  # Words as one comma-separated string, as --config.study.methods=sft,align gives them.
  parsed = study_lib.StudyConfig(methods="sft, align", eval_splits="train,carrot")
  assert parsed.methods == ("sft", "align") and parsed.eval_splits == ("train", "carrot")
  assert from_mapping(study_lib.StudyConfig, {"methods": "sft,align"}, "study").methods == (
      "sft", "align")
  # What the command line really delivers: ml_collections keeps the tuple field a tuple.
  config = load_config(REPO / "configs" / "study.py", "smoke")
  config.study.methods = ("sft,align",)
  assert from_mapping(study_lib.StudyConfig, config.study.to_dict(), "study").methods == (
      "sft", "align")
  with pytest.raises(ConfigError, match="unknown method 'lora'"):
    study_lib.StudyConfig(methods="sft,lora")
  with pytest.raises(ConfigError, match="configs/study.py"):
    study_lib.run_study(load_config(REPO / "configs" / "align.py"), "/nonexistent")


@pytest.mark.parametrize("preset", ["siglip_teacher", "siglip_continued"])
def test_siglip_teacher_presets_pretrain_the_teacher_on_captions(preset):
  from vla_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  config = load_config(REPO / "configs" / "study.py", preset)
  study = from_mapping(study_lib.StudyConfig, config.study.to_dict(), "study")
  setup = from_mapping(pretrain.PretrainConfig, dict(study.pretrain), "study.pretrain")
  assert setup.teacher_objective == "siglip"
  if preset == "siglip_teacher":
    assert dict(study.vlm_pretrain) == {}  # the student's pretraining is the default's
  else:  # the vlm_continued preset's VLM stage, the same cache key
    continued = load_config(REPO / "configs" / "study.py", "vlm_continued")
    assert study.vlm_pretrain == from_mapping(
        study_lib.StudyConfig, continued.study.to_dict(), "study").vlm_pretrain


@pytest.mark.parametrize("preset", ["vlm_tasks", "vlm_continued", "siglip_continued"])
def test_vlm_presets_add_captions_and_concepts_to_the_default_vlm_stage(preset):
  from vla_jax.train import pretrain, vlm_pretrain  # pylint: disable=g-import-not-at-top
  config = load_config(REPO / "configs" / "study.py", preset)
  study = from_mapping(study_lib.StudyConfig, config.study.to_dict(), "study")
  vlm = from_mapping(vlm_pretrain.VLMPretrainConfig, dict(study.vlm_pretrain),
                     "study.vlm_pretrain")
  assert vlm.tasks == ("spatial", "caption", "vlthink")
  default = vlm_pretrain.VLMPretrainConfig()
  if preset == "vlm_tasks":  # as many spatial-question steps as the default stage takes
    assert vlm.steps * vlm.probabilities()[0] == pytest.approx(default.steps)
  else:  # on top of the default's VLM, cached
    assert vlm.continue_from == default
  if preset != "siglip_continued":  # the teacher and the towers' pretraining are shared
    assert dict(study.pretrain) == {}
  assert from_mapping(pretrain.PretrainConfig, dict(study.pretrain)).teacher_extra_splits == (
      pretrain.TEACHER_EXTRA_SPLITS)
