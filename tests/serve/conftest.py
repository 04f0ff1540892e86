"""Fixtures for the server tests: a random tiny policy, a running server, the real clients.

The openpi client is the real `openpi-client` package. It pins numpy<2, which this
project cannot use, so it lives in its own virtual environment, created once (under the
cache root, `$VLA_JAX_CACHE` or ~/.cache/vla_jax; a file lock keeps pytest-xdist workers
from building it twice) and reused; `$VLA_JAX_OPENPI_CLIENT_PYTHON` names an existing
interpreter instead. Tests drive it with `openpi_client_run.py` in a subprocess.
"""

import fcntl
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Dict

import jax
import numpy as np
import pytest

from vla_jax.actions import NormStats
from vla_jax.eval.policy import VLAPolicy
from vla_jax.models.vla import VLA, vla_config
from vla_jax.serve import server as server_lib
from vla_jax.sim import bundled
from vla_jax.text import Tokenizer

OPENPI_CLIENT = "openpi-client==0.1.2"
# openpi-client 0.1.2 imports typing_extensions without declaring it.
OPENPI_CLIENT_EXTRAS = ("typing_extensions",)
CLIENT_SCRIPT = pathlib.Path(__file__).with_name("openpi_client_run.py")
PROMPTS = ("put the carrot on the plate", "put the red cube on the plate",
           "put the eggplant in the basket")


def openpi_client_python() -> str:
  """The python of a virtual environment with openpi-client, created on first use."""
  if os.environ.get("VLA_JAX_OPENPI_CLIENT_PYTHON"):
    return os.environ["VLA_JAX_OPENPI_CLIENT_PYTHON"]
  root = pathlib.Path(bundled.cache_root())
  root.mkdir(parents=True, exist_ok=True)
  venv = root / f"openpi_client_0.1.2_py{sys.version_info.major}{sys.version_info.minor}"
  python, done = venv / "bin" / "python", venv / "installed"
  with open(root / "openpi_client_venv.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
               [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                OPENPI_CLIENT, *OPENPI_CLIENT_EXTRAS]]
      for step in steps:
        run = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if run.returncode:
          pytest.fail(f"could not set up {OPENPI_CLIENT} in {venv} ({' '.join(step)}):\n"
                      f"{run.stderr[-2000:]}\nThe server tests need the real client; "
                      "check the network to PyPI, or set VLA_JAX_OPENPI_CLIENT_PYTHON.")
      done.write_text(OPENPI_CLIENT + "\n")
  return str(python)


@pytest.fixture(scope="session")
def openpi_python() -> str:
  return openpi_client_python()


def run_openpi_client(python: str, tmp_path: pathlib.Path, port: int, mode: str,
                      arrays: Dict[str, np.ndarray], timeout: float = 180, **spec: Any
                      ) -> Dict[str, Any]:
  """Runs `openpi_client_run.py` in `mode` against localhost:port; returns its JSON."""
  inputs, output = tmp_path / f"{mode}_in.npz", tmp_path / f"{mode}_out.json"
  np.savez(inputs, **arrays)
  spec_path = tmp_path / f"{mode}_spec.json"
  spec_path.write_text(json.dumps({"host": "127.0.0.1", "port": port, "mode": mode,
                                   "inputs": str(inputs), "output": str(output), **spec}))
  run = subprocess.run([python, str(CLIENT_SCRIPT), str(spec_path)], capture_output=True,
                       text=True, timeout=timeout, check=False)
  assert run.returncode == 0, f"openpi client ({mode}) failed:\n{run.stderr[-3000:]}"
  return json.loads(output.read_text())


def action_stats(low: float, high: float) -> NormStats:
  """7-d statistics: q01/q99 = low/high, the gripper (last) in [0, 1] and not masked."""
  q01, q99 = np.full(7, low), np.full(7, high)
  q01[6], q99[6] = 0.0, 1.0
  return NormStats(mean=np.zeros(7), std=np.ones(7), min=q01, max=q99, q01=q01, q99=q99)


def random_params(model: VLA, seed: int = 0) -> Any:
  """Random parameters of `model` without compiling its init (shapes by eval_shape)."""
  size = model.config.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3), np.float32),
                          np.ones((1, 8), np.int32))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(s.dtype), shapes)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> VLAPolicy:
  """The `tiny` OpenVLA-layout student with random weights and the bundled tokenizer."""
  tokenizer = Tokenizer.from_path(bundled.bundled_tokenizer_path(
      str(tmp_path_factory.mktemp("cache"))))
  model = VLA(vla_config("tiny"))
  return VLAPolicy(model, random_params(model), tokenizer, action_stats(-0.2, 0.2))


def served(policy: VLAPolicy, max_batch: int = 4) -> server_lib.ServedPolicy:
  """`policy` served with its statistics as "tabletop" and a second set, "wide"."""
  return server_lib.ServedPolicy(policy, {"tabletop": policy.norm_stats,
                                          "wide": action_stats(-2.0, 2.0)},
                                 "tabletop", max_batch=max_batch)


@pytest.fixture(scope="module")
def server(tiny_policy):
  """A server on a free localhost port: batches of up to 4, 20 ms to gather them."""
  instance = server_lib.PolicyServer(served(tiny_policy), server_lib.ServeConfig(
      port=0, max_batch=4, max_wait_ms=20.0, max_request_bytes=2**20))
  instance.start()
  yield instance
  instance.stop()


def observations(n: int, size: int = 80, seed: int = 0) -> Dict[str, np.ndarray]:
  """n camera frames uint8 [n, size, size, 3] and n prompts."""
  rng = np.random.default_rng(seed)
  return {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "prompts": np.array([PROMPTS[i % len(PROMPTS)] for i in range(n)])}
