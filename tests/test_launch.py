"""The launch scripts parse and start the distributed entry point."""

import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_parse_and_print_usage(script):
  path = REPO / "launch" / script
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
  usage = subprocess.run(["bash", str(path)], capture_output=True, text=True)
  assert usage.returncode == 2 and "launch/" + script in usage.stdout
  text = path.read_text()
  assert "python -m vla_jax.main" in text and "--config.distributed=True" in text
