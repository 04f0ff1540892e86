"""DINOv3 ViT (`models.teachers.dinov3`) and its loader vs transformers' `DINOv3ViTModel`, fp32.

Tiny random references with every parameter perturbed, saved with `save_pretrained` and
loaded through `load_hf_dinov3` with a config from `config_from_hf`. The two configs
differ in registers (2 vs 0), RoPE base, the biases that exist (no key bias, as the
releases, vs key bias and no MLP bias) and scan; they run at the config's size and at
another grid (RoPE needs no resampling). Teacher features (ImageNet normalisation, CLS
and registers dropped, final norm) and every block must match to 1e-4.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from tests.parity.torch_refs import IMAGENET_MEAN, IMAGENET_STD, to_numpy
from vla_jax.errors import CheckpointError
from vla_jax.models.teacher import Teacher, TeacherConfig
from vla_jax.models.teachers import dinov3

import transformers  # noqa: E402  pylint: disable=g-import-not-at-top
import safetensors.torch  # noqa: E402  pylint: disable=g-import-not-at-top

TOL = 1e-4
PATCH = 8
CASES = {
    "registers_no_key_bias": dict(hf=dict(num_register_tokens=2, rope_theta=50.0),
                                  scan=False),
    "no_registers_key_bias_scanned": dict(
        hf=dict(num_register_tokens=0, key_bias=True, mlp_bias=False, layer_norm_eps=1e-6),
        scan=True),
}
_REFS = {}


def _reference(case: str, tmp_path_factory):
  if case not in _REFS:
    torch.manual_seed(0)
    config = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          patch_size=PATCH, image_size=32, **CASES[case]["hf"])
    model = transformers.DINOv3ViTModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for param in model.parameters():
        param.add_(0.2 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp(f"dinov3_{case}")
    model.eval().save_pretrained(directory)
    _REFS[case] = (model, str(directory))
  return _REFS[case]


def _max_diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, f"shape {ours.shape} vs {theirs.shape}"
  return float(np.max(np.abs(ours - theirs)))


@pytest.mark.parametrize("case,size", [("registers_no_key_bias", 32),
                                       ("registers_no_key_bias", 48),
                                       ("no_registers_key_bias_scanned", 40)])
def test_patch_features_and_blocks_match_transformers(case, size, tmp_path_factory):
  model, directory = _reference(case, tmp_path_factory)
  config = dinov3.config_from_hf(directory, image_size=size, scan=CASES[case]["scan"])
  params = dinov3.load_hf_dinov3(directory, config)
  images = np.random.default_rng(size).uniform(size=(2, size, size, 3)).astype(np.float32)
  normalised = (images - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy()),
                output_hidden_states=True)
  teacher = Teacher(TeacherConfig(kind="dinov3", tower=config))
  features = jax.jit(teacher.apply, static_argnums=2)({"params": {"tower": params}}, images,
                                                      size // PATCH)
  prefix = config.num_prefix_tokens
  errors = {"features": _max_diff(features, to_numpy(ref.last_hidden_state[:, prefix:]))}
  _, out = jax.jit(dinov3.DinoV3(config).apply)({"params": params}, normalised)
  errors["embedded"] = _max_diff(out["embedded"], to_numpy(ref.hidden_states[0]))
  for i in range(config.depth):
    errors[f"block{i:02d}"] = _max_diff(out[f"block{i:02d}"], to_numpy(ref.hidden_states[i + 1]))
  print(case, size, {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < TOL, errors


def test_state_dict_layout_loads_the_same_params(tmp_path, tmp_path_factory):
  model, directory = _reference("registers_no_key_bias", tmp_path_factory)
  config = dinov3.config_from_hf(directory)
  path = str(tmp_path / "model.safetensors")  # `model.layer.{i}` module names
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
  jax.tree.map(np.testing.assert_array_equal, dinov3.load_hf_dinov3(directory, config),
               dinov3.load_hf_dinov3(path, config))


@pytest.mark.parametrize("field,value", [("use_gated_mlp", True), ("hidden_act", "silu"),
                                         ("qk_norm", True)])
def test_loader_refuses_unimplemented_settings_naming_them(field, value, tmp_path,
                                                           tmp_path_factory):
  _, directory = _reference("registers_no_key_bias", tmp_path_factory)
  config = dinov3.config_from_hf(directory)
  with open(os.path.join(directory, "config.json")) as f:
    hf = {**json.load(f), field: value}
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(CheckpointError, match=rf"{field}={value!r} is not implemented"):
    dinov3.load_hf_dinov3(str(tmp_path), config)
  wrong = dataclasses.replace(config, rope_theta=100.0)
  with pytest.raises(CheckpointError, match=r"rope_theta=50.0 but dinov3.rope_theta=100.0"):
    dinov3.load_hf_dinov3(directory, wrong)
