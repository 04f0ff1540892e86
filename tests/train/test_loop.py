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
  for name in ("loss_curves.png", "summary.json", "norm_stats.json", "run_config.json"):
    assert os.path.exists(tmp_path / "resumed" / name)
  _check_run_config(tmp_path / "resumed")
  assert os.listdir(tmp_path / "resumed" / "tensorboard")
  assert straight["checkpoint_steps"] == [3, 6]
  _check_export(tmp_path / "resumed")


def _check_run_config(workdir):
  """workdir/run_config.json and the checkpoint's assets hold every section, as parsed."""
  from vla_jax.train import checkpoint
  with open(workdir / "run_config.json") as f:
    record = json.load(f)
  for section in ("model", "teacher", "align", "lora", "train", "sharding", "data", "weights",
                  "eval", "tokenizer", "log_every", "checkpoint_every", "seed"):
    assert section in record, section
  # Typed sections carry their defaults and resolved values, not only what was set.
  assert record["train"]["schedule"] == "constant" and "adam_eps" in record["train"]
  assert record["sharding"]["fsdp_min_size"] > 0
  assert record["data"]["image_size"] == 64 and record["data"]["sources"][0]["data_dir"]
  assert record["model"]["llm"]["depth"] == 4 and record["checkpoint_every"] == 3
  manager = checkpoint.make_manager(str(workdir / "checkpoints"), async_save=False)
  assets = checkpoint._restore_step(manager, manager.latest_step(), {}, ("assets",))["assets"]
  assert assets["run_config"] == record


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
  with pytest.raises(ConfigError, match="checkpoint_params='sometimes'"):
    loop.train(_config(small_data, 2, checkpoint_params="sometimes"), str(tmp_path))


def _bytes(directory):
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def test_lora_run_saves_its_factors_not_merged_weights(small_data, tmp_path):
  """A LoRA run's checkpoints hold the factors and optimizer state; evaluation and export
  rebuild the merged policy from them and the base checkpoint, which must not change."""
  import jax
  import numpy as np
  from vla_jax import modeling
  from vla_jax.errors import CheckpointError
  from vla_jax.eval import policy as policy_lib
  from vla_jax.experiment import parse_config
  from vla_jax.train import checkpoint
  from vla_jax.weights import convert as convert_lib

  lora = {"lora.enabled": True, "lora.rank": 4, "train.trainable": "lora",
          "train.learning_rate": 1e-2, "checkpoint_every": 2}
  experiment = parse_config(_config(small_data, 2, **lora))
  models = modeling.build_models(experiment)

  def write_base(seed):  # the pretrained VLA a user fine-tunes, as a converted checkpoint
    params = modeling.init_params(models, experiment, jax.random.key(seed))["student"]
    return convert_lib.save_converted(str(tmp_path / "base"), params, experiment.model)

  base = write_base(5)
  lora.update({"weights.student": base, "weights.student_format": "orbax"})
  loop.train(_config(small_data, 2, checkpoint_params="always", **lora), str(tmp_path / "merged"))
  loop.train(_config(small_data, 2, **lora), str(tmp_path / "factors"))
  assert os.path.isdir(tmp_path / "merged" / "checkpoints" / "2" / "params")
  assert not os.path.exists(tmp_path / "factors" / "checkpoints" / "2" / "params")
  assert (_bytes(tmp_path / "factors" / "checkpoints")
          < 0.5 * _bytes(tmp_path / "merged" / "checkpoints"))

  want, _, _, _ = policy_lib.load_checkpoint(str(tmp_path / "merged"))
  got, got_experiment, stats, _ = policy_lib.load_checkpoint(str(tmp_path / "factors"))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert got_experiment.model == experiment.model and set(stats) == {"tabletop"}
  exported = checkpoint.export_latest(str(tmp_path / "factors" / "checkpoints"),
                                      str(tmp_path / "export"))
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_policy_params(exported)[0], want)

  # Another base under the same path: refused, not merged into a different model.
  import shutil
  shutil.rmtree(base)
  write_base(6)
  with pytest.raises(CheckpointError, match="other base weights"):
    policy_lib.load_checkpoint(str(tmp_path / "factors"))
  shutil.rmtree(base)
  with pytest.raises(CheckpointError, match="base weights it was trained on"):
    policy_lib.load_checkpoint(str(tmp_path / "factors"))
