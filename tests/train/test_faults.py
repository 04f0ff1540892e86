"""Fault injection on the training loop: divergence, signals, corrupt checkpoints, and what
is (never) saved."""

import errno
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from tests.train.test_checkpoint import damage
from vla_jax.errors import CheckpointError, DivergenceError
from vla_jax.eval import policy as policy_lib
from vla_jax.experiment import load_config
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import loop

pytestmark = pytest.mark.slow  # end-to-end runs


def make_config(small_data, steps, **train):
  """The tiny preset on the small dataset, random weights: a run compiles in seconds."""
  config = load_config(REPO / "configs" / "align.py", "tiny")
  data_dir, tokenizer = small_data
  config.tokenizer = tokenizer
  config.weights.student, config.weights.teacher = "", ""
  config.data.sources[0]["data_dir"] = data_dir
  config.data.shuffle_buffer = 64
  # Constant: a cosine schedule bakes num_steps into the step, so runs of different
  # lengths (here and in test_loop, test_ema) would each compile their own program; with
  # one schedule they share it through the session's compilation cache.
  train = {"schedule": "constant", **train}
  config.train.update(num_steps=steps, batch_size=4, warmup_steps=0, **train)
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 0
  return config


def test_divergence_stops_the_run_and_saves_nothing_nonfinite(small_data, tmp_path):
  config = make_config(small_data, 30, learning_rate=1e4, max_nonfinite_steps=3)
  with pytest.raises(DivergenceError, match="train.max_nonfinite_steps=3") as error:
    loop.train(config, str(tmp_path))
  assert "last good checkpoint is step" in str(error.value)
  manager = ckpt_lib.make_manager(tmp_path / "checkpoints", async_save=False)
  steps = list(manager.all_steps())
  manager.close()
  assert steps and max(steps) < 30, steps
  # The checkpoints left behind are finite policies (the last one was checked on save).
  params, experiment, norm_stats, _ = policy_lib.load_checkpoint(str(tmp_path), steps[-1])
  # A policy whose parameters are NaN (written by an older version) is refused.
  nan_params = {**params, "projector": jax.tree.map(lambda x: np.full_like(x, np.nan),
                                                   params["projector"])}
  export = ckpt_lib.export(str(tmp_path / "nan_export"), nan_params, experiment, norm_stats)
  with pytest.raises(CheckpointError, match="NaN or inf.*diverged"):
    policy_lib.load_checkpoint(export)


def _wait_for_metrics(path, lines, process, timeout=600):
  """Blocks until `path` has `lines` lines (the run is past compiling and stepping)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, process.communicate()
    if os.path.exists(path) and len(open(path).readlines()) >= lines:
      return
    time.sleep(0.2)
  raise TimeoutError(f"{path} did not reach {lines} lines in {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_says_where_to_resume(small_data, tmp_path, signum):
  workdir = tmp_path / "run"
  process = subprocess.Popen(
      [sys.executable, "-m", "tests.train.faults_script", *small_data, str(workdir), "100000"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_metrics(workdir / "metrics.jsonl", 2, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=900)
  finally:
    process.kill()
  assert process.returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  manager = ckpt_lib.make_manager(workdir / "checkpoints", async_save=False)
  steps = list(manager.all_steps())
  manager.close()
  # checkpoint_every is 100,000: the only checkpoint is the one the signal forced.
  assert len(steps) == 1 and steps[0] >= 2, steps
  assert (f"Stopped by {signal.Signals(signum).name} after step {steps[0]} of 100000; "
          f"checkpoint step {steps[0]} is saved") in stderr
  assert f"--workdir={workdir}" in stderr


def test_stop_signal_catches_ctrl_c_and_restores_the_handler():
  before = signal.getsignal(signal.SIGINT)
  with loop.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # would be a KeyboardInterrupt without the handler
    time.sleep(0.05)
  assert stop.received == "SIGINT" and signal.getsignal(signal.SIGINT) is before


def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(small_data, tmp_path,
                                                                     caplog):
  loop.train(make_config(small_data, 4), str(tmp_path))  # checkpoints at steps 2 and 4
  damage(tmp_path / "checkpoints" / "4" / "train_state", "truncate")
  with caplog.at_level(logging.WARNING):
    summary = loop.train(make_config(small_data, 6), str(tmp_path))
  assert f"checkpoint step 4 in {tmp_path / 'checkpoints'} is corrupt: a file cannot be read" in (
      caplog.text)
  assert summary["resumed_from"] == 2 and summary["checkpoint_steps"] == [2, 4, 6]
  assert np.isfinite(summary["final_metrics"]["loss/total"])
  assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()
  assert policy_lib.load_checkpoint(str(tmp_path))[3]["step"] == 6


def test_a_full_disk_is_one_line_and_keeps_the_committed_checkpoints(small_data, tmp_path,
                                                                      monkeypatch):
  """Orbax / TensorStore report ENOSPC wrapped in their own errors (from a save thread);
  the run ends with one line saying what is safe and how to resume."""
  config = make_config(small_data, 6)
  real_save = ckpt_lib.save

  def save(manager, step, *args, **kwargs):
    if step >= 4:
      try:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
      except OSError as e:
        raise RuntimeError(f"Error writing array of step {step}") from e
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib, "save", save)
  with pytest.raises(CheckpointError) as error:
    loop.train(config, str(tmp_path))
  message = str(error.value)
  assert message.startswith("No space left on device while the run in ")
  assert "at step 4: the committed checkpoints (steps [2]) are intact" in message
  assert "resume from step 2" in message and "\n" not in message
  assert error.value.__cause__ is None and error.value.__suppress_context__
  params, _, _, _ = policy_lib.load_checkpoint(str(tmp_path), 2)
  assert jax.tree.leaves(params)
  assert loop.is_disk_full(OSError(errno.ENOSPC, "x")) and not loop.is_disk_full(OSError(5, "x"))


def test_another_experiment_on_resume_is_one_line_and_an_export_fine_tunes(small_data, tmp_path,
                                                                           caplog):
  from vla_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from vla_jax.eval import commands  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  loop.train(make_config(small_data, 2), run)
  other = make_config(small_data, 4)
  other.model.llm.depth = 3
  with pytest.raises(ConfigError, match=r"holds a run of another experiment \(checkpoint step 2, "
                     r"preset 'tiny'\) \(this config: preset 'tiny'\): model.llm.depth: 4 -> 3\. "
                     r"To resume it, pass the config it was written with.*--mode=export"):
    loop.train(other, run)
  # Nothing was moved aside as if it were corrupt.
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]
  # Evaluating with the other config says that the checkpoint's own config is used.
  policy = policy_lib.load_policy(run)
  with caplog.at_level(logging.WARNING):
    differences = commands.note_checkpoint_config(other, policy.model.config, run)
  assert differences == ["model.llm.depth: 4 -> 3"]
  assert "Evaluating with the checkpoint's own config" in caplog.text
  # Fine-tuning from the run: its export is the new run's student.
  export = ckpt_lib.export_latest(os.path.join(run, "checkpoints"), str(tmp_path / "export"))
  tune = make_config(small_data, 1)
  tune.weights.student, tune.weights.student_format = export, "export"
  loop.train(tune, str(tmp_path / "tuned"))
  other.weights.student, other.weights.student_format = export, "export"
  with pytest.raises(ConfigError, match=r"export .* was made for another student: "
                     r"model.llm.depth: 4 -> 3"):
    loop.train(other, str(tmp_path / "mismatch"))
