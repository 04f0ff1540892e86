"""Serving what training writes: an export (fast, random weights) and, end to end, a
trained run served by `python -m vla_jax.main --mode=serve` to both real clients."""

import os
import signal
import subprocess
import sys
import time

import json_numpy
import numpy as np
import pytest
import requests

from tests.conftest import REPO
from tests.serve.conftest import action_stats, observations, random_params, run_openpi_client
from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.eval import policy as policy_lib
from vla_jax.experiment import load_config, parse_config
from vla_jax.models.vla import VLA
from vla_jax.serve import inputs
from vla_jax.serve import server as server_lib
from vla_jax.sim import bundled
from vla_jax.text import openvla_prompt, train_sentencepiece
from vla_jax.train import checkpoint, loop


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An export of the random `tiny` student with two sets of statistics."""
  root = tmp_path_factory.mktemp("export")
  experiment = parse_config(load_config(REPO / "configs" / "align.py", "tiny"))
  tokenizer = bundled.bundled_tokenizer_path(str(root / "cache"))
  params = random_params(VLA(experiment.model), seed=1)
  return checkpoint.export(str(root / "export"), params, experiment,
                           {"tabletop": action_stats(-0.2, 0.2),
                            "bridge_orig": action_stats(-1.0, 1.0)}, tokenizer=tokenizer)


def test_an_export_serves_every_statistics_it_holds(exported):
  serving = server_lib.load_served_policy(exported, unnorm_key="tabletop", max_batch=2)
  assert serving.default_key == "tabletop" and serving.unnorm_keys == ["bridge_orig", "tabletop"]
  assert serving.info["checkpoint"] == exported and serving.sizes == (1, 2)
  data = observations(2, size=64)
  queries = [inputs.Query(data["images"][i], str(data["prompts"][i]), None, key)
             for i, key in enumerate(("", "bridge_orig"))]
  got = [serving.infer([q])[0] for q in queries]
  assert all(chunk.shape == (1, 7) for chunk in got)  # H = 1: a chunk of one action
  alone = policy_lib.load_policy(exported, dataset="tabletop")
  bridge = policy_lib.VLAPolicy(alone.model, alone.params, alone.tokenizer,
                                action_stats(-1.0, 1.0))
  for i, policy in enumerate((alone, bridge)):
    np.testing.assert_array_equal(got[i][0], policy(data["images"][i:i + 1],
                                                    [str(data["prompts"][i])])[0])
  with pytest.raises(ConfigError, match=r"no normalisation statistics for dataset 'fractal'; "
                                        r"the checkpoint has \['bridge_orig', 'tabletop'\]"):
    server_lib.load_served_policy(exported, unnorm_key="fractal")


def test_serving_an_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="neither a run's checkpoints nor an export"):
    server_lib.read_assets(str(tmp_path))


def _train_tiny_run(root):
  data_dir = bundled.bundled_dataset_dir(str(root / "data"), num_train=6, num_val=2,
                                         progress=False)
  prompts = [openvla_prompt(f"put the {o} on the plate") for o in ("red cube", "carrot")]
  tokenizer = train_sentencepiece(prompts * 4, root / "tok.model", vocab_size=300,
                                  action_ids=256)
  config = load_config(REPO / "configs" / "align.py", "tiny")
  config.tokenizer = str(tokenizer.path)
  config.weights.student, config.weights.teacher = "", ""
  config.data.sources[0]["data_dir"] = data_dir
  config.data.shuffle_buffer = 64
  config.data.max_length = 96
  config.data.action_horizon = 1  # OpenVLA's single step (chunks: tests/serve/test_server.py)
  config.model.llm.depth = 2
  config.align.align_layer = 1
  config.train.num_steps = 2
  config.train.batch_size = 4
  config.train.warmup_steps = 0
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 0
  workdir = str(root / "workdir")
  loop.train(config, workdir)
  return workdir


def _start_cli(workdir, *flags):
  """`python -m vla_jax.main --mode=serve` on a free port; returns (process, port)."""
  process = subprocess.Popen(
      [sys.executable, "-m", "vla_jax.main", f"--config={REPO / 'configs' / 'align.py'}",
       "--mode=serve", f"--workdir={workdir}", "--port=0", "--serve_max_batch=2", *flags],
      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True)
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    line = process.stdout.readline()
    if line.startswith("serving on "):
      return process, int(line.split()[2].rstrip(":").rsplit(":", 1)[1])
    if not line and process.poll() is not None:
      break
  process.kill()
  pytest.fail(f"--mode=serve did not start (exit {process.poll()}).")


@pytest.mark.slow  # trains a model, then starts the command line
def test_a_trained_run_served_by_the_command_line_answers_both_clients(
    tmp_path, openpi_python):
  workdir = _train_tiny_run(tmp_path)
  process, port = _start_cli(workdir, "--serve_api_key=k3y")
  try:
    data = observations(2, size=128)
    in_process = policy_lib.load_policy(workdir)
    expected = [in_process(data["images"][i:i + 1], [str(data["prompts"][i])])[0]
                for i in range(2)]
    out = run_openpi_client(openpi_python, tmp_path, port, "infer", data, api_key="k3y")
    assert out["metadata"]["unnorm_key"] == "tabletop"
    assert out["metadata"]["checkpoint"] == os.path.abspath(workdir)
    for i in range(2):
      np.testing.assert_array_equal(np.float32(out["results"][i]["actions"]), expected[i])
      reply = requests.post(f"http://127.0.0.1:{port}/act", timeout=60, data=json_numpy.dumps(
          {"image": data["images"][i], "instruction": str(data["prompts"][i]),
           "unnorm_key": "tabletop"}), headers={"Authorization": "Api-Key k3y"})
      np.testing.assert_array_equal(json_numpy.loads(reply.text), expected[i])
  finally:
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
