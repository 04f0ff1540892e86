"""C-RADIO (`models.teachers.radio`) and its loader vs transformers' `RadioModel`, in fp32.

Each reference is a tiny random `RadioModel` with every parameter perturbed (so biases,
LayerNorm affine terms, the prefix tokens and, where used, layer scale all matter),
saved with `save_pretrained` (RADIO's own tensor names, fused qkv) and loaded through
`load_hf_radio` with a config built by `config_from_hf`. The two configs differ in what
changes the patch features: prefix tokens (2 summary + 3 registers vs 3 + 0), layer
scale, MLP ratio, LayerNorm epsilon and pixel statistics; they run with the CPE table
resampled down, up, and at its native grid. The teacher's patch features (normalisation
and prefix dropping included) and every block's hidden states must match to 1e-4.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from tests.parity.torch_refs import to_numpy
from vla_jax.errors import CheckpointError
from vla_jax.models import align as align_lib
from vla_jax.models.teacher import Teacher, TeacherConfig, teacher_config
from vla_jax.models.teachers import radio

import transformers  # noqa: E402  pylint: disable=g-import-not-at-top
import safetensors.torch  # noqa: E402  pylint: disable=g-import-not-at-top

TOL = 1e-4
PATCH, MAX_IMG = 8, 64  # an 8 x 8 CPE table
CASES = {
    "registers_layerscale": dict(
        hf=dict(num_cls_tokens=2, num_registers=3, mlp_ratio=3.0, layer_norm_eps=1e-5,
                norm_mean=[0.5, 0.4, 0.3], norm_std=[0.2, 0.3, 0.25]),
        perturb_scale=True, scan=False),
    "summary_only_scanned": dict(hf=dict(num_cls_tokens=3, num_registers=0),
                                 perturb_scale=False, scan=True),
}
_REFS = {}


def _reference(case: str, tmp_path_factory):
  """(transformers model, its save_pretrained directory), built once per session."""
  if case not in _REFS:
    spec = CASES[case]
    torch.manual_seed(0)
    config = transformers.RadioConfig(hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, patch_size=PATCH,
                                      max_img_size=MAX_IMG, **spec["hf"])
    model = transformers.RadioModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for name, param in model.named_parameters():
        if spec["perturb_scale"] or "lambda1" not in name:
          param.add_(0.2 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp(f"radio_{case}")
    model.eval().save_pretrained(directory)
    _REFS[case] = (model, str(directory))
  return _REFS[case]


def _images(size: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(size).uniform(size=(batch, size, size, 3)).astype(np.float32)


def _max_diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, f"shape {ours.shape} vs {theirs.shape}"
  return float(np.max(np.abs(ours - theirs)))


@pytest.mark.parametrize("case,size", [("registers_layerscale", 32),  # 8x8 table -> 4x4
                                       ("registers_layerscale", 80),  # -> 10x10
                                       ("summary_only_scanned", 64)])  # native 8x8
def test_patch_features_and_blocks_match_transformers(case, size, tmp_path_factory):
  model, directory = _reference(case, tmp_path_factory)
  config = radio.config_from_hf(directory, image_size=size, scan=CASES[case]["scan"])
  assert config.layer_scale == CASES[case]["perturb_scale"]
  params = radio.load_hf_radio(directory, config)
  images = _images(size)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                output_hidden_states=True)
  grid = size // PATCH
  teacher = Teacher(TeacherConfig(kind="radio", tower=config))
  features = jax.jit(teacher.apply, static_argnums=2)({"params": {"tower": params}}, images,
                                                      grid)
  errors = {"features": _max_diff(features, to_numpy(ref.features))}
  normalised = (images - np.asarray(config.norm_mean)) / np.asarray(config.norm_std)
  _, out = jax.jit(radio.Radio(config).apply)({"params": params}, normalised)
  errors["embedded"] = _max_diff(out["embedded"], to_numpy(ref.hidden_states[0]))
  for i in range(config.depth):
    errors[f"block{i:02d}"] = _max_diff(out[f"block{i:02d}"], to_numpy(ref.hidden_states[i + 1]))
  print(case, size, {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < TOL, errors


def test_state_dict_layout_loads_the_same_params(tmp_path, tmp_path_factory):
  model, directory = _reference("registers_layerscale", tmp_path_factory)
  config = radio.config_from_hf(directory, image_size=32)
  path = str(tmp_path / "model.safetensors")  # transformers >= 5 module names, split q/k/v
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
  hub, state_dict = radio.load_hf_radio(directory, config), radio.load_hf_radio(path, config)
  jax.tree.map(np.testing.assert_array_equal, hub, state_dict)


@pytest.mark.parametrize("n_in,n_out", [(8, 4), (8, 10), (128, 16), (5, 3), (3, 7)])
def test_cpe_resampling_equals_torch_bilinear(n_in, n_out):
  table = np.random.default_rng(0).normal(size=(1, n_in * n_in, 6)).astype(np.float32)
  grid = torch.from_numpy(table.reshape(n_in, n_in, 6).transpose(2, 0, 1)[None].copy())
  want = torch.nn.functional.interpolate(grid, size=(n_out, n_out), mode="bilinear",
                                         align_corners=False)
  want = want[0].numpy().transpose(1, 2, 0).reshape(1, n_out * n_out, 6)
  np.testing.assert_allclose(radio.resample_cpe(table, n_out), want, atol=1e-5)


def _with_config(directory: str, tmp_path, **changes) -> str:
  """A copy of the checkpoint whose config.json has `changes` applied."""
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  config.update(changes)
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  return str(tmp_path)


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu_pytorch_tanh"), ("video_temporal_patch_size", 2),
    ("use_swiglu_ffn", True), ("qkv_bias", False), ("head_dim", 4),
    ("qk_normalization", True),  # not a RadioConfig field: we cannot tell what it does
])
def test_loader_refuses_unimplemented_settings_naming_them(field, value, tmp_path,
                                                           tmp_path_factory):
  _, directory = _reference("summary_only_scanned", tmp_path_factory)
  config = radio.config_from_hf(directory, image_size=64)
  changed = _with_config(directory, tmp_path, **{field: value})
  with pytest.raises(CheckpointError, match=rf"{field}={value!r} is not implemented"):
    radio.load_hf_radio(changed, config)
  with pytest.raises(CheckpointError, match=rf"{field}={value!r} is not implemented"):
    radio.config_from_hf(changed)


def test_loader_reports_what_our_config_must_change(tmp_path, tmp_path_factory):
  _, directory = _reference("registers_layerscale", tmp_path_factory)
  good = radio.config_from_hf(directory, image_size=32)
  wrong = dataclasses.replace(good, layernorm_eps=1e-6, num_registers=2, layer_scale=False,
                              norm_mean=radio.CLIP_MEAN)
  with pytest.raises(CheckpointError) as error:
    radio.load_hf_radio(directory, wrong)
  message = str(error.value)
  for expected in ("Set radio.layernorm_eps=1e-05", "num_registers=3 but radio.num_registers=2",
                   "Set radio.layer_scale=True", "input_conditioner.norm_mean"):
    assert expected in message, message
  # The stored conditioner is what transformers computes with, whatever config.json says.
  stale = _with_config(directory, tmp_path, norm_mean=list(radio.CLIP_MEAN))
  with pytest.raises(CheckpointError, match="input_conditioner.norm_mean"):
    radio.load_hf_radio(stale, dataclasses.replace(good, norm_mean=radio.CLIP_MEAN))


@pytest.mark.parametrize("grid_match", align_lib.GRID_MATCH_MODES)
def test_tiny_radio_teacher_gives_the_student_grid(grid_match):
  config = teacher_config("tiny_radio", student_grid=4)  # 32 px, patch 8, 4 prefix tokens
  teacher = Teacher(config)
  images = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))
  params = teacher.init(jax.random.key(1), images, 4)["params"]
  student_grid = 4 if grid_match == "resize_input" else 2
  features = teacher.apply({"params": params}, images, student_grid, grid_match)
  assert features.shape == (2, student_grid ** 2, config.width)
  # The prefix (summary + register) tokens are dropped: the features are the patches'.
  x = (jax.image.resize(images, (2, 32, 32, 3), "bilinear", antialias=True)
       - np.asarray(config.tower.norm_mean)) / np.asarray(config.tower.norm_std)
  _, out = radio.Radio(config.tower).apply({"params": params["tower"]}, x)
  if grid_match == "resize_input":
    np.testing.assert_allclose(features, out["patch_tokens"], atol=1e-5)


def test_missing_layer_scale_is_filled_as_transformers_does(tmp_path, tmp_path_factory):
  # A checkpoint without `lambda1` vectors: transformers fills them with layerscale_value.
  model, directory = _reference("summary_only_scanned", tmp_path_factory)
  state = {k: v.contiguous() for k, v in model.state_dict().items() if "lambda1" not in k}
  safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
  with open(os.path.join(directory, "config.json")) as f:
    hf = {**json.load(f), "layerscale_value": 0.5}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  reference = transformers.RadioModel.from_pretrained(str(tmp_path)).eval()
  config = radio.config_from_hf(str(tmp_path), image_size=64)
  assert config.layer_scale
  params = radio.load_hf_radio(str(tmp_path), config)
  images = _images(64)
  with torch.no_grad():
    want = reference(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  features = Teacher(TeacherConfig(kind="radio", tower=config)).apply(
      {"params": {"tower": params}}, images, 8)
  assert _max_diff(features, to_numpy(want.features)) < TOL
