"""The training loop end to end on a small tabletop dataset: logs, checkpoints, resume."""

import json
import os

import pytest

from tests.conftest import REPO
from vla_jax.errors import ConfigError
from vla_jax.experiment import load_config
from vla_jax.train import loop

pytestmark = pytest.mark.slow  # end-to-end / multi-process


def _config(small_data, steps, **overrides):
  config = load_config(REPO / "configs" / "align.py", "tiny")
  data_dir, tokenizer = small_data
  config.tokenizer = tokenizer
  config.weights.student, config.weights.teacher = "", ""  # random student and teacher: fast
  config.data.sources[0]["data_dir"] = data_dir
  config.data.shuffle_buffer = 64
  config.train.num_steps = steps
  config.train.batch_size = 4
  config.train.warmup_steps = 0
  # Constant: a cosine schedule depends on num_steps, and the resume test extends a run.
  config.train.schedule = "constant"
  config.log_every, config.checkpoint_every, config.eval_every = 1, 3, 0
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss/total"] for row in map(json.loads, f)}


def test_resumed_run_continues_with_the_same_losses(small_data, tmp_path):
  straight = loop.train(_config(small_data, 6), str(tmp_path / "straight"))
  loop.train(_config(small_data, 3), str(tmp_path / "resumed"))
  resumed = loop.train(_config(small_data, 6), str(tmp_path / "resumed"))
  assert resumed["resumed_from"] == 3 and straight["resumed_from"] == 0
  a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
  for name in ("loss_curves.png", "summary.json", "norm_stats.json"):
    assert os.path.exists(tmp_path / "resumed" / name)
  assert os.listdir(tmp_path / "resumed" / "tensorboard")
  assert straight["checkpoint_steps"] == [3, 6]
  _check_export(tmp_path / "resumed")


def _check_export(workdir):
  """--mode=export of the run reproduces the run's inference params and statistics."""
  import jax
  import numpy as np
  from vla_jax import modeling
  from vla_jax.train import checkpoint
  path = checkpoint.export_latest(str(workdir / "checkpoints"), str(workdir / "export"))
  params, experiment, norm_stats, assets = checkpoint.load_policy_params(path)
  manager = checkpoint.make_manager(str(workdir / "checkpoints"), async_save=False)
  abstract = modeling.abstract_params(modeling.build_models(experiment), experiment)["student"]
  trained = checkpoint.restore_params(manager, abstract)
  jax.tree.map(np.testing.assert_array_equal, params, trained)
  assert assets["source_step"] == 6 and set(norm_stats) == {"tabletop"}
  assert experiment.lora is None


def test_config_errors_before_compiling(small_data, tmp_path):
  with pytest.raises(ConfigError, match="derived"):
    loop.train(_config(small_data, 2, **{"data.global_batch_size": 4}), str(tmp_path))
  with pytest.raises(ConfigError, match="vocab_size"):
    loop.train(_config(small_data, 2, **{"model.llm.vocab_size": 128}), str(tmp_path))
  config = _config(small_data, 2)
  config.data.sources[0]["name"] = "bridge_dataset"
  config.data.sources[0]["data_dir"] = ""
  with pytest.raises(ConfigError, match="needs a data_dir"):
    loop.train(config, str(tmp_path))
