"""End to end: train a few steps, then evaluate the checkpoint (run and export) as a policy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.eval import commands
from vla_jax.eval import config as eval_config_lib
from vla_jax.eval import policy as policy_lib
from vla_jax.eval import sim_eval
from vla_jax.experiment import load_config
from vla_jax.sim import bundled
from vla_jax.text import openvla_prompt, train_sentencepiece
from vla_jax.train import checkpoint, loop

pytestmark = pytest.mark.slow  # trains a model


def _config(data_dir, tokenizer):
  config = load_config(REPO / "configs" / "align.py", "tiny")
  config.tokenizer = tokenizer
  config.weights.student, config.weights.teacher = "", ""  # random student and teacher: fast
  config.data.sources[0]["data_dir"] = data_dir
  config.data.shuffle_buffer = 64
  config.data.max_length = 96  # the small test tokenizer needs more ids per prompt
  config.data.proprio_dims = (2, 6)  # height and gripper opening in the prompt
  config.data.action_horizon = 2  # action chunks (the H = 1 policy: tests/serve, test_image_*)
  config.model.llm.depth = 2
  config.align.align_layer = 1
  config.train.num_steps = 2
  config.train.batch_size = 4
  config.train.warmup_steps = 0
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 0
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  data_dir = bundled.bundled_dataset_dir(str(root / "data"), num_train=6, num_val=2,
                                         progress=False)
  prompts = [openvla_prompt(f"put the {o} on the plate") for o in ("red cube", "carrot")]
  tokenizer = train_sentencepiece(prompts * 4, root / "tok.model", vocab_size=300,
                                action_ids=256)
  config = _config(data_dir, str(tokenizer.path))
  workdir = str(root / "workdir")
  loop.train(config, workdir)
  return config, workdir


def test_run_checkpoint_policy_returns_finite_actions(trained):
  _, workdir = trained
  policy = policy_lib.load_policy(workdir)
  assert policy.proprio_dims == (2, 6) and policy.state_stats.dim == 7
  images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
  states = np.array([[0.0, -0.19, 0.1, 0, 0, 0, 1.0]] * 3, np.float32)
  assert policy.action_horizon == 2 and policy.execute_steps == 2
  actions = policy(images, ["put the red cube on the plate"] * 3, states)
  assert actions.shape == (3, 2, 7) and actions.dtype == np.float32  # one chunk per frame
  assert np.isfinite(actions).all()
  np.testing.assert_array_equal(
      policy.predict_chunk(images, ["put the red cube on the plate"] * 3, states), actions)
  first = policy_lib.load_policy(workdir, execute_steps=1)
  np.testing.assert_array_equal(first(images, ["put the red cube on the plate"] * 3, states),
                                actions[:, :1])
  with pytest.raises(ConfigError, match="execute_steps=3"):
    policy_lib.load_policy(workdir, execute_steps=3)
  # Un-normalised with the run's statistics: within the dataset's q01..q99 range.
  stats = policy.norm_stats
  dims = stats.mask
  assert np.all(actions[..., dims] >= stats.q01[dims] - 1e-5)
  assert np.all(actions[..., dims] <= stats.q99[dims] + 1e-5)
  exported = checkpoint.export_latest(os.path.join(workdir, "checkpoints"),
                                      os.path.join(workdir, "export"))
  from_export = policy_lib.load_policy(exported)
  # The export keeps the prompt's layout and the chunk length.
  assert from_export.proprio_dims == (2, 6) and from_export.action_horizon == 2
  np.testing.assert_array_equal(
      from_export(images, ["put the red cube on the plate"] * 3, states), actions)
  with pytest.raises(InputError, match="pass states"):
    from_export(images, ["put the red cube on the plate"] * 3, None)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="neither training checkpoints"):
    policy_lib.load_checkpoint(str(tmp_path))


def test_eval_sim_command_writes_its_folder_and_compares(trained):
  config, workdir = trained
  settings = eval_config_lib.eval_config(config, {"splits": ["carrot"], "seeds": 3, "max_steps": 4,
                                           "strip_episodes": 1})
  summary = commands.run_eval_sim(config, workdir, settings,
                                  compare_with=[f"again={workdir}"])
  out = os.path.join(workdir, "eval_sim")
  for name in ("results.json", "table.md", "success.png", "strips/carrot.png", "compare.md"):
    assert os.path.exists(os.path.join(out, name)), name
  results = json.load(open(os.path.join(out, "results.json")))
  assert len(results["splits"]["carrot"]["success"]) == 3
  assert summary["episodes_per_s"] > 0
  assert "again - workdir" in open(os.path.join(out, "compare.md")).read()


def test_concurrent_evaluation_batches_act_as_one_at_a_time(trained):
  """The VLA policy (jitted decoding, TF preprocessing) called from several threads at once
  takes the same actions: every episode's frames and outcome are those of workers=1."""
  _, workdir = trained
  policy = policy_lib.load_policy(workdir)
  runs = [sim_eval.evaluate(policy, ("carrot",), sim_eval.eval_seeds(4), max_steps=4,
                            batch_size=2, strip_episodes=2, progress=False, workers=w)
          for w in (1, 2)]
  assert runs[0]["splits"]["carrot"]["steps"] == runs[1]["splits"]["carrot"]["steps"]
  assert runs[0]["splits"]["carrot"]["success"] == runs[1]["splits"]["carrot"]["success"]
  frames = [r["frames"]["carrot"] for r in runs]  # the first batch's episodes, every step
  assert frames[0].shape[:2] == (5, 2) and not np.array_equal(frames[0][0], frames[0][-1])
  np.testing.assert_array_equal(frames[0], frames[1])


def test_open_loop_command_reports_accuracy_and_l1_per_dimension(trained):
  config, workdir = trained
  settings = eval_config_lib.eval_config(config, {"open_loop_batches": 2})
  metrics = commands.run_open_loop(config, workdir, settings)
  assert 0.0 <= metrics["token_accuracy"] <= 1.0
  assert len(metrics["l1_per_dim"]) == 7 and np.isfinite(metrics["l1_per_dim"]).all()
  assert metrics["frames"] > 0 and metrics["rows_skipped"] == 0
  assert json.load(open(metrics["path"]))["l1_mean"] == pytest.approx(metrics["l1_mean"])


def test_eval_speed_benchmark_runs_on_a_chunked_policy(trained, tmp_path):
  """`benchmarks/eval_speed.py --smoke` on this run (action chunks of 2, proprio prompt):
  every policy's rate and both decoders' times come back finite and positive."""
  _, workdir = trained
  out = tmp_path / "speed.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/eval_speed.py", "--workdir", workdir, "--smoke",
       "--json", str(out)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report["action_horizon"] == 2
  (row,) = report["rollout"]
  assert row["batch"] == 2 and sorted(row["episodes_per_s"]) == sorted([
      "VLA, KV cache", "VLA, recompute", "scripted expert", "VLA, KV cache, 2 x B at once"])
  assert all(0 < rate < float("inf") for rate in row["episodes_per_s"].values())
  assert row["workers_ratio"] > 0
  (decode,) = report["decode"]
  assert decode["cache_ms"] > 0 and decode["recompute_ms"] > 0
  assert "KV cache / recompute" in result.stdout
