"""Checked before a run builds anything (one run per workdir, valid intervals), and a
metrics log that survives torn writes and resumes."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from vla_jax.errors import ConfigError
from vla_jax.train import loop
from vla_jax.train import workdir as workdir_lib
from vla_jax.experiment import load_config


def test_a_second_run_on_a_busy_workdir_stops_before_building_anything(tmp_path):
  config = load_config(REPO / "configs" / "align.py", "tiny")
  with workdir_lib.workdir_lock(str(tmp_path)):
    with pytest.raises(ConfigError, match=rf"in use by another training run \(pid {os.getpid()}"):
      loop.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing of the first run touched


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
  # A process takes the lock and dies with kill -9's effect (no cleanup, file left behind).
  code = ("import os; from vla_jax.train import workdir as w; "
          f"ctx = w.workdir_lock({str(tmp_path)!r}); ctx.__enter__(); os._exit(0)")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 env={**os.environ, "PYTHONPATH": str(REPO)})
  left = (tmp_path / workdir_lib.LOCK_NAME).read_text()
  assert left.startswith("pid ") and f"pid {os.getpid()} " not in left
  with workdir_lib.workdir_lock(str(tmp_path)):
    assert (tmp_path / workdir_lib.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
  with workdir_lib.workdir_lock(str(tmp_path)):  # released on exit: taken again
    pass


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a directory")
  config = load_config(REPO / "configs" / "align.py", "tiny")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    loop.train(config, str(path))


def test_metrics_after_a_crash_and_a_resume_stay_valid_and_do_not_double_back(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss/action": 1.0 / s} for s in (20, 40, 60)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 80, "loss/act'  # torn
  path.write_text(text)
  assert [r["step"] for r in workdir_lib.read_metrics(str(path))] == [20, 40, 60]
  # Resumed from the checkpoint of step 40: 60 (written after it) and the torn line go.
  assert workdir_lib.repair_metrics(str(path), resumed_from=40) == 2
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [20, 40]
  assert workdir_lib.repair_metrics(str(path), resumed_from=40) == 0  # idempotent
  assert loop.plot_curves(str(path), str(tmp_path / "curves.png")) is not None


@pytest.mark.parametrize("key, value", [("log_every", 0), ("checkpoint_every", 0),
                                        ("eval_every", -1), ("eval_batches", 0)])
def test_bad_intervals_are_refused_before_anything_compiles(tmp_path, key, value):
  config = load_config(REPO / "configs" / "align.py", "tiny")
  config[key] = value
  with pytest.raises(ConfigError, match=rf"config.{key}={value}: must be an integer >= "):
    loop.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
