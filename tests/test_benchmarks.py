"""The accelerator-facing benchmark scripts run, each in its own Python, at tiny size on CPU.

`benchmarks/memory.py` compiles the tiny preset's LoRA step from abstract arguments on
8 fake CPU devices (FSDP x tensor mesh, so the tensor-parallel rules and the LoRA factors
are both partitioned); `benchmarks/gpu_step.py --smoke` initialises, compiles and times a
few real steps on this machine's CPU. Both must report sane numbers; the 7B tables in the
README come from the same code paths. `benchmarks/step_vs_torch.py --smoke` times our step
against the PyTorch reference step and must report a finite ratio and equal first losses.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # subprocesses that import JAX and compile a train step


def _run(args, tmp_path, **env):
  out = tmp_path / "result.json"
  result = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **env),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(out.read_text()), result.stdout


def test_memory_analysis_of_the_tiny_lora_step(tmp_path):
  # memory.py adds the 8-device flag itself; a conflicting one from the caller must not win.
  env = {"XLA_FLAGS": ""}
  rows, stdout = _run(["benchmarks/memory.py", "--presets=tiny", "--variants=lora",
                       "--meshes=fsdp4_tensor2"], tmp_path, **env)
  (row,) = rows
  assert (row["preset"], row["variant"], row["mesh"]) == ("tiny", "lora", "fsdp4_tensor2")
  for key in ("arguments", "outputs", "temporaries", "total"):
    assert row[key] > 0, (key, row)
  # Only the donated state comes back in place; the frozen params are arguments.
  assert row["alias"] <= row["outputs"] and row["alias"] < row["arguments"]
  assert 0 < row["params_trainable"] < row["params_student"] < row["params_total"]
  assert row["total"] < 1 and row["fits_16gib"]
  assert "| tiny | lora | fsdp4_tensor2 |" in stdout


def test_gpu_step_smoke_on_cpu(tmp_path):
  result, stdout = _run(["benchmarks/gpu_step.py", "--smoke", "--peak_tflops=1"], tmp_path)
  assert result["preset"] == "tiny" and result["llm_depth"] == 2
  assert 0 < result["step_s"] < 60 and math.isfinite(result["step_s"])
  assert result["tokens_per_s"] > 0 and result["frames_per_s"] > 0
  assert result["model_flops"] > 0 and result["xla_flops_per_device"] > 0
  assert 0 < result["mfu"] < 1 and math.isfinite(result["loss"])
  assert result["peak_flops_per_device"] == 1e12
  assert "MFU" in stdout and "step time" in stdout


def test_step_vs_torch_smoke(tmp_path):
  # Our jitted LoRA + align step against the peft/transformers reference step, tiny sizes,
  # one short timing round; both start from the same weights and batch.
  result, stdout = _run(["benchmarks/step_vs_torch.py", "--smoke"], tmp_path)
  lora = result["variants"]["LoRA"]
  assert math.isfinite(lora["ratio"]) and lora["ratio"] > 0
  assert "ratio torch/jax (LoRA)" in stdout
  ours, theirs = lora["first_step"]["jax"], lora["first_step"]["torch"]
  for key in ("loss/total", "loss/action", "loss/align"):
    assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
  assert lora["trainable"][0] == lora["trainable"][1]  # the same LoRA factors on both sides
