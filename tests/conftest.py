"""Shared pytest fixtures: the read-only shared data folder and deterministic numerics."""

import os
import pathlib

import jax
import pytest

try:  # torch is a test-only dependency; make transformers/timm importable beside it.
  from tests.parity.torch_refs import make_torchvision_importable
  make_torchvision_importable()
except ImportError:
  pass

# Parity tests compare fp32 numbers to 1e-4; make matmuls exact on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  """`$VLA_JAX_SHARED_DATA`, else `../shared/data` beside the repository."""
  return pathlib.Path(os.environ.get("VLA_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = shared_data_dir()
  if not path.exists():
    pytest.fail(f"Shared data not found at {path}; set VLA_JAX_SHARED_DATA.")
  return path


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: end-to-end or multi-process tests (deselect with -m 'not slow')")
