"""Shared pytest setup: the read-only shared data folder, deterministic numerics, and the
compile-time and scheduling settings that keep the suite within its time budget."""

import os
import pathlib
import shutil
import tempfile

import jax
import pytest

try:  # torch is a test-only dependency; make transformers/timm importable beside it.
  from tests.parity.torch_refs import make_torchvision_importable
  make_torchvision_importable()
except ImportError:
  pass

# Parity tests compare fp32 numbers to 1e-4; make matmuls exact on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

# The test models are tiny: XLA's compile time, not the computation, dominates the suite.
# Three session-wide settings cut it (subprocesses inherit them through the environment):
# - XLA without its expensive optimisation passes: the same operations, a third less CPU
#   time for this suite (measured; `VLA_JAX_TEST_XLA_OPT=1` keeps the passes);
# - one persistent compilation cache per test session, shared by the xdist workers and the
#   subprocess tests, so an identical program compiles once (`VLA_JAX_TEST_COMPILE_CACHE=0`
#   turns it off). It starts empty and is deleted at the end: no result depends on an
#   earlier run. It has a size limit, because only then does JAX guard its reads and
#   writes with a file lock: without one an entry is written in place, and a worker that
#   reads it while another process is still writing it loads a truncated executable (a
#   worker died of a segmentation fault in a train step on a loaded machine).
# - XLA:CPU's older loop emitters instead of its MLIR fusion emitters
#   (`--xla_cpu_use_fusion_emitters=false`): a train step of the tiny preset compiles in
#   2.9 s instead of 4.1 s (measured, medians of two; the same losses to the last digit
#   printed and no slower to run). `XLA_FLAGS` is read when the CPU backend starts, after
#   this file runs; subprocesses take `xla_flags(...)` (the session's flags plus theirs).
if os.environ.get("VLA_JAX_TEST_XLA_OPT") != "1":
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  jax.config.update("jax_disable_most_optimizations", True)
  _LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
  if _LOOP_EMITTERS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LOOP_EMITTERS}".strip()
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_CACHE_SIZE_ENV = "JAX_COMPILATION_CACHE_MAX_SIZE"
_CACHE_MAX_BYTES = 16 * 2 ** 30  # never reached by this suite: the limit is for the lock

REPO = pathlib.Path(__file__).resolve().parents[1]


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a subprocess: this session's compile settings plus `extra` (e.g. the
  fake device count), so a child compiles like the tests around it."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


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
  if os.environ.get("VLA_JAX_TEST_COMPILE_CACHE") != "0":
    if not hasattr(config, "workerinput"):  # the controller: workers inherit its environment
      os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="vla_jax_test_xla_cache_")
      config.vla_jax_compile_cache = os.environ[_CACHE_ENV]
    if os.environ.get(_CACHE_ENV):
      os.environ.setdefault(_CACHE_SIZE_ENV, str(_CACHE_MAX_BYTES))  # for subprocesses
      jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
      jax.config.update("jax_compilation_cache_max_size", int(os.environ[_CACHE_SIZE_ENV]))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  config.addinivalue_line(
      "markers", "slow: end-to-end or multi-process tests (deselect with -m 'not slow')")


# The modules that take longest (measured with VLA_JAX_TEST_TIMES, longest first). xdist
# hands out modules in collection order; left to its default (most tests first) these few
# long modules with few tests ran last, one worker busy and the other idle for the last
# ten minutes. Started first, they overlap with everything else (longest-job-first). The
# list only orders work: a module missing from it still runs, after these.
HEAVY_MODULES = (
    "tests/test_study.py",
    "tests/test_notebook.py",
    "tests/eval/test_image_dependence.py",
    "tests/train/test_multiprocess.py",
    "tests/train/test_faults.py",
    "tests/train/test_sharding.py",
    "tests/train/test_checkpoint.py",
    "tests/models/test_decode.py",
    "tests/sim/test_render.py",
    "tests/sim/test_env.py",
    "tests/test_benchmarks.py",
    "tests/train/test_pretrain.py",
    "tests/train/test_vlm_pretrain.py",
    "tests/train/test_loop.py",
    "tests/train/test_ema.py",
    "tests/data/test_pipeline.py",
)


def pytest_collection_modifyitems(config, items):
  """Heavy modules first, in HEAVY_MODULES order; the others after, as collected."""
  rank = {module: i for i, module in enumerate(HEAVY_MODULES)}
  key = lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank))
  items[:] = sorted(items, key=key)  # stable: a module's own test order is kept


@pytest.hookimpl(optionalhook=True)  # an xdist hook: ignored where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
  """`-n N` hands each worker whole modules (xdist's loadscope), not single tests: a
  module's fixtures (a trained run, a rendered dataset, compiled steps) are then built on
  one worker only, instead of on every worker that draws one of its tests. Modules go
  out in collection order (heavy first, `pytest_collection_modifyitems`), not xdist's
  most-tests-first."""
  if config.getoption("dist") == "load":
    from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top
    config.option.loadscopereorder = False
    return LoadScopeScheduling(config, log)
  return None


def pytest_unconfigure(config):
  cache = getattr(config, "vla_jax_compile_cache", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)


def pytest_runtest_logreport(report):
  """With `VLA_JAX_TEST_TIMES=FILE`, appends "seconds outcome phase test" per test phase as
  it finishes (a record that survives an interrupted or timed-out session)."""
  path = os.environ.get("VLA_JAX_TEST_TIMES")
  if path and (report.when == "call" or report.outcome != "passed" or report.duration > 1):
    with open(path, "a") as f:
      f.write(f"{report.duration:.1f} {report.outcome} {report.when} {report.nodeid}\n")
