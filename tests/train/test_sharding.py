"""Sharded training on 8 fake CPU devices (in a subprocess) and the partition rules."""

import json
import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import REPO, xla_flags
from vla_jax.errors import ConfigError
from vla_jax.train import sharding as sharding_lib

pytestmark = pytest.mark.slow  # end-to-end / multi-process


def run_on_8_devices(module, timeout):
  """The JSON report that `python -m module` prints, run with 8 fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
  return run_on_8_devices("tests.train.multidevice_script", 900)


@pytest.mark.parametrize("mesh", ["data", "fsdp", "fsdp_tensor"])
def test_meshes_match_one_device(report, mesh):
  entry = report["meshes"][mesh]
  assert entry["loss_diff"] < 1e-5 and entry["metric_diff"] < 1e-4
  assert entry["param_diff"] < 1e-5


def test_in_layer_lora_under_scan_matches_one_device(report):
  """LoRA inside the scanned layers, on an FSDP x tensor mesh, two steps: as on one device."""
  entry = report["lora_scan_fsdp_tensor"]
  assert entry["in_layer"] and entry["scanned_factors"] >= 7, entry
  assert entry["loss_diff"] < 1e-5, entry
  assert entry["lora_diff"] < 1e-5 * max(1.0, entry["lora_scale"]), entry


def test_activations_are_constrained_to_the_batch_axes_only_under_a_mesh(report):
  """Every transformer block of the student's towers, its LLM and the teacher pins its
  output's batch axis on a mesh (forward and backward); without a mesh, nothing."""
  assert report["activation_constraints_without_mesh"] == 0
  blocks = 2 + 2 + 2  # the test experiment: student SigLIP, LLM and teacher of depth 2
  for mesh in ("data", "fsdp", "fsdp_tensor"):
    assert report["meshes"][mesh]["activation_constraints"] >= blocks, report["meshes"][mesh]


def test_parameters_are_actually_sharded(report):
  meshes = report["meshes"]
  assert meshes["data"]["lm_head_spec"] == [None, None]
  assert "fsdp" in meshes["fsdp"]["lm_head_spec"]
  assert meshes["fsdp"]["teacher_embedding_spec"] != [None, None, None]
  assert meshes["fsdp_tensor"]["q_proj_spec"][-1] == "tensor"
  assert meshes["fsdp_tensor"]["lm_head_spec"] == ["fsdp", "tensor"]


def test_batch_that_does_not_divide_the_mesh_is_rejected(report):
  data_parallel = {"data": 8, "fsdp": 8, "fsdp_tensor": 4}  # data x fsdp devices
  for name, mesh in report["meshes"].items():
    assert "global batch size 6" in mesh["bad_batch_error"]
    assert f"multiple of {data_parallel[name]}" in mesh["bad_batch_error"]


def test_restore_onto_fewer_devices(report):
  for count, entry in report["restore"].items():
    assert entry["diff"] == 0.0 and entry["opt_diff"] == 0.0
    assert entry["devices"] == int(count)
    assert entry["position"] == {"examples_seen": 8}


def test_partition_rules():
  mesh = sharding_lib.make_mesh(sharding_lib.ShardingConfig(), jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  config = sharding_lib.ShardingConfig(overrides=((r"lm_head/kernel$", (None, "data")),))
  spec = sharding_lib.partition_spec("llm/lm_head/kernel", (8, 16), mesh, config)
  assert tuple(spec) == (None, "data")
  with pytest.raises(ConfigError, match="one entry per axis"):
    sharding_lib.partition_spec("llm/lm_head/kernel", (8, 16, 2), mesh, config)
  with pytest.raises(ConfigError, match="at most one mesh axis"):
    sharding_lib.ShardingConfig(data=-1, fsdp=-1)
  with pytest.raises(ConfigError, match="uses 4 devices"):
    sharding_lib.mesh_shape(sharding_lib.ShardingConfig(data=2, fsdp=2), 8)
  assert sharding_lib.mesh_shape(sharding_lib.ShardingConfig(data=2, fsdp=-1, tensor=2), 8) == (
      2, 2, 2)


@pytest.fixture(scope="module")
def load_report():
  return run_on_8_devices("tests.train.sharded_load_script", 900)


@pytest.mark.parametrize("case", ["checkpoints", "export", "random"])
def test_init_and_loading_put_every_tensor_straight_onto_its_shard(load_report, case):
  """create_params on an 8-device FSDP mesh: an Orbax student + big_vision teacher, an
  export, or nothing (all random); each leaf on its sharding, no whole copy anywhere."""
  entry = load_report[case]
  assert entry["leaves"] > 100 and entry["split"] > 50, entry
  assert entry["wrong_sharding"] == [] and entry["wrong_buffers"] == [], entry
  assert entry["whole_on_one_device"] == [], entry
  # Every device holds a fraction of the tree (replicated small leaves included).
  assert entry["max_device_bytes"] < 0.25 * entry["total_bytes"], entry
  diffs = [v for k, v in entry.items() if k.endswith("diff")]
  assert diffs and max(diffs) == 0.0, entry
  # The same check flags the unsharded init, which builds every tensor on one device.
  assert load_report["control_whole_on_one_device"] > 50
