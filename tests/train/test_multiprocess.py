"""Multi-process training for real: 2 processes x 4 CPU devices on localhost against 1 x 8.

The slow test launches `tests/train/multiprocess_script.py` (the training loop of the
tiny preset) three times: once as one process with 8 fake CPU devices (the reference),
and as two processes with 4 devices each, joined by `jax.distributed.initialize` over
the environment settings a user would export by hand (gloo collectives), first for 2
steps and a checkpoint, then resumed from it for 2 more. With the default
`data.host_sharding="global"` each process decodes its own 4 rows of every global batch
of 8, so both runs see the same batches and process 0's metrics.jsonl must repeat the
reference's losses.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, xla_flags
from vla_jax.errors import ConfigError
from vla_jax.train import sharding as sharding_lib

DISTRIBUTED_ENV = sharding_lib.DISTRIBUTED_ENV
TIMEOUT_S = 900  # per launch; the processes are killed after it, so CI never hangs
# Both runs compute the same float32 program on the same batches; only the order in which
# gradient contributions are summed may differ (gloo's cross-process all-reduce against
# XLA's in-process one), an O(1e-7) relative rounding effect that four Adam steps keep
# far below 1e-5. A wrong batch, a missing host's rows or a bad restore moves the loss
# by more than 1e-2.
RTOL = 1e-5
KEYS = ("loss/total", "loss/action", "loss/align", "grad_norm", "action/token_accuracy")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(tmp_path, name, workdir, steps, small_data, processes):
  """Starts one run as `processes` processes; returns [(Popen, log path)]."""
  env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={8 // processes}"))
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  started = []
  for index in range(processes):
    if processes > 1:
      env = dict(env, JAX_PROCESS_ID=str(index))
    log = tmp_path / f"{name}.p{index}.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the child
      started.append((subprocess.Popen(
          [sys.executable, "-m", "tests.train.multiprocess_script", str(workdir), str(steps),
           *small_data], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log))
  return started


def _tail(log, chars=3000) -> str:
  return log.read_text(errors="replace")[-chars:]


def _wait(runs):
  """Waits for every process; on a timeout or a failure kills the rest and fails with
  the tails of all their logs."""
  deadline = time.monotonic() + TIMEOUT_S
  failed = []
  for proc, log in runs:
    try:
      if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
        failed.append(f"{log.name} exited with {proc.returncode}")
    except subprocess.TimeoutExpired:
      failed.append(f"{log.name} timed out after {TIMEOUT_S} s")
    if failed:
      break
  if failed:
    for proc, _ in runs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    pytest.fail("; ".join(failed) + "\n" + "\n".join(
        f"----- {log.name} -----\n{_tail(log)}" for _, log in runs))


def _metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return {row["step"]: row for row in map(json.loads, f)}


def _summary(log):
  lines = [l for l in log.read_text().splitlines() if l.startswith('{"summary"')]
  return json.loads(lines[-1])["summary"]


@pytest.mark.slow  # three launches of 1-2 Python processes that import JAX and TensorFlow
def test_two_processes_train_and_resume_like_one_with_eight_devices(small_data, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  # The reference runs beside the first multi-process launch: their programs differ
  # (device assignment), so neither waits on the other's compilation.
  reference = _start(tmp_path, "single", single, 4, small_data, processes=1)
  first = _start(tmp_path, "first", multi, 2, small_data, processes=2)
  _wait(first + reference)
  resumed = _start(tmp_path, "resumed", multi, 4, small_data, processes=2)
  _wait(resumed)

  expected, got = _metrics(single), _metrics(multi)
  assert sorted(expected) == sorted(got) == [1, 2, 3, 4]  # resume dropped no row, added none
  for step in (1, 2, 3, 4):
    for key in KEYS:
      assert got[step][key] == pytest.approx(expected[step][key], rel=RTOL, abs=1e-7), (
          step, key, got[step][key], expected[step][key])
  summary = _summary(resumed[0][1])
  assert summary["resumed_from"] == 2 and summary["checkpoint_steps"] == [2, 4]
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
  # Process 1 trained too (its metrics are replicated) but wrote no files of its own.
  assert _summary(resumed[1][1])["final_metrics"]["loss/total"] == got[4]["loss/total"]
  assert _summary(resumed[1][1])["loss_curves"] is None
  differences = {key: max(abs(got[s][key] - expected[s][key]) for s in got) for key in KEYS}
  print("max |multi - single| per metric over steps 1-4:", differences)


# ----------------------------------------------------------------------------- settings
def test_distributed_settings_from_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert sharding_lib.distributed_settings(env) == {
      "coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
  # None given: JAX detects the cluster (SLURM, TPU pods), a lone address included.
  assert sharding_lib.distributed_settings({}) == {}
  assert sharding_lib.distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS unset"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2"},
     "JAX_PROCESS_ID unset"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, r"must be in \[0, JAX_NUM_PROCESSES=2\)"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two",
      "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "0"}, "must be host:port"),
])
def test_half_given_settings_are_a_config_error(env, message):
  with pytest.raises(ConfigError, match=message):
    sharding_lib.distributed_settings(env)


def test_settings_without_config_distributed_are_a_config_error(monkeypatch):
  for name, value in (("JAX_COORDINATOR_ADDRESS", "localhost:1"), ("JAX_NUM_PROCESSES", "2"),
                      ("JAX_PROCESS_ID", "0")):
    monkeypatch.setenv(name, value)
  with pytest.raises(ConfigError, match="--config.distributed=True"):
    sharding_lib.initialize_distributed(False)
