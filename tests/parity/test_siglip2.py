"""SigLIP 2 NaFlex (`models.teachers.siglip2`) and its loader vs transformers' `siglip2`, fp32.

Tiny random references with every parameter perturbed, saved with `save_pretrained` and
loaded through `load_hf_siglip2` with a config from `config_from_hf`. The two configs
differ in what changes the function: a `Siglip2VisionModel` with the pooling head,
tanh GELU and a 4 x 4 position table, run at its table's grid and at a larger and a
smaller one (the table resized with antialiasing, as transformers does at every call);
and a full `Siglip2Model` (vision tensors under `vision_model.`, a text tower) without
the head, exact GELU, another LayerNorm epsilon, a 3 x 3 table, patch 4 and scanned
blocks. transformers gets the pixels patchified by its own image processor's
`convert_image_to_patches`, an all-valid attention mask and the patch grid as
`spatial_shapes`. Teacher features (loaded through the registry's `load_teacher`; [-1, 1]
pixels, post-LayerNorm patch tokens) and every block must match to 1e-4.
"""

import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch

from tests.parity.torch_refs import SIGLIP_MEAN, SIGLIP_STD, to_numpy
from vla_jax.errors import CheckpointError
from vla_jax.models.teacher import Teacher, TeacherConfig
from vla_jax.models.teachers import siglip2
from vla_jax.weights.teacher import load_teacher

import transformers  # noqa: E402  pylint: disable=g-import-not-at-top
from transformers.models.siglip2 import image_processing_siglip2  # noqa: E402

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
CASES = {
    "vision_head_tanh": dict(full=False, scan=False,
                             hf=dict(patch_size=8, num_patches=16, vision_use_head=True)),
    "full_model_no_head_exact_scanned": dict(
        full=True, scan=True, hf=dict(patch_size=4, num_patches=9, vision_use_head=False,
                                      hidden_act="gelu", layer_norm_eps=1e-5)),
}
_REFS = {}


def _reference(case: str, tmp_path_factory):
  """(vision tower, save_pretrained directory) of a perturbed tiny transformers model."""
  if case not in _REFS:
    torch.manual_seed(0)
    vision = transformers.Siglip2VisionConfig(**VISION, **CASES[case]["hf"])
    if CASES[case]["full"]:
      text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, vocab_size=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
      model = transformers.Siglip2Model(transformers.Siglip2Config(
          text_config=text, vision_config=vision.to_dict()))
    else:
      model = transformers.Siglip2VisionModel(vision)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for param in model.parameters():
        param.add_(0.2 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp(f"siglip2_{case}")
    model.eval().save_pretrained(directory)
    tower = model.vision_model if CASES[case]["full"] else model
    _REFS[case] = (tower, str(directory))
  return _REFS[case]


def _transformers_forward(tower, normalised: np.ndarray, patch: int):
  """The tower on [B, H, W, C] normalised pixels, patchified by transformers' processor."""
  nchw = torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())
  patches = torch.stack([image_processing_siglip2.convert_image_to_patches(image, patch)
                         for image in nchw])
  grid = normalised.shape[1] // patch
  with torch.no_grad():
    return tower(pixel_values=patches,
                 pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.int32),
                 spatial_shapes=torch.tensor([[grid, grid]] * len(nchw)),
                 output_hidden_states=True)


def _max_diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, f"shape {ours.shape} vs {theirs.shape}"
  return float(np.max(np.abs(ours - theirs)))


@pytest.mark.parametrize("case,size", [("vision_head_tanh", 32),  # the table's own 4 x 4
                                       ("vision_head_tanh", 48),  # 6 x 6: table grown
                                       ("vision_head_tanh", 24),  # 3 x 3: shrunk, antialiased
                                       ("full_model_no_head_exact_scanned", 40)])  # 3 -> 10
def test_patch_features_and_blocks_match_transformers(case, size, tmp_path_factory):
  tower, directory = _reference(case, tmp_path_factory)
  config = siglip2.config_from_hf(directory, image_size=size, scan=CASES[case]["scan"])
  params = siglip2.load_hf_siglip2(directory, config)
  images = np.random.default_rng(size).uniform(size=(2, size, size, 3)).astype(np.float32)
  normalised = (images - np.float32(SIGLIP_MEAN)) / np.float32(SIGLIP_STD)
  ref = _transformers_forward(tower, normalised, config.patch_size)
  teacher_config = TeacherConfig(kind="siglip2", tower=config)
  teacher_params = load_teacher(directory, teacher_config, "hf")  # through the registry
  jax.tree.map(np.testing.assert_array_equal, teacher_params["tower"], params)
  features = jax.jit(Teacher(teacher_config).apply, static_argnums=2)(
      {"params": teacher_params}, images, size // config.patch_size)
  errors = {"features": _max_diff(features, to_numpy(ref.last_hidden_state))}
  _, out = jax.jit(siglip2.Siglip2(config).apply)({"params": params}, normalised)
  errors["embedded"] = _max_diff(out["embedded"], to_numpy(ref.hidden_states[0]))
  for i in range(config.depth):
    errors[f"block{i:02d}"] = _max_diff(out[f"block{i:02d}"], to_numpy(ref.hidden_states[i + 1]))
  print(case, size, {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < TOL, errors


def test_position_table_resize_equals_transformers():
  # The resize alone, at sizes where antialiasing (shrinking) and clamping (growing) act.
  rng = np.random.default_rng(0)
  table = rng.standard_normal((5, 5, 6)).astype(np.float32)
  for grid in (2, 3, 4, 5, 7, 12):
    theirs = transformers.models.siglip2.modeling_siglip2.Siglip2VisionEmbeddings \
        .resize_positional_embeddings(torch.from_numpy(table), torch.tensor([[grid, grid]]),
                                      grid * grid)
    ours = siglip2.resize_posemb(table.reshape(1, 25, 6), grid)
    np.testing.assert_allclose(np.asarray(ours)[0], to_numpy(theirs)[0], atol=1e-6)
    direct = torch.nn.functional.interpolate(
        torch.from_numpy(table).permute(2, 0, 1)[None], size=(grid, grid), mode="bilinear",
        align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(grid * grid, 6)
    np.testing.assert_allclose(np.asarray(ours)[0], to_numpy(direct), atol=1e-5)
    if grid < 5:  # shrinking: without antialiasing the table would be another one
      plain = torch.nn.functional.interpolate(
          torch.from_numpy(table).permute(2, 0, 1)[None], size=(grid, grid), mode="bilinear",
          align_corners=False)[0].permute(1, 2, 0).reshape(grid * grid, 6)
      assert np.max(np.abs(np.asarray(ours)[0] - to_numpy(plain))) > 1e-3, grid


def _edited_checkpoint(directory, tmp_path, edit):
  """A copy of the checkpoint at `directory` whose config.json went through `edit`."""
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  edit(hf)
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  return str(tmp_path)


@pytest.mark.parametrize("field,value", [("hidden_act", "silu"), ("num_patches", 15),
                                         ("patch_size", [8, 8]), ("qk_norm", True)])
def test_loader_refuses_unimplemented_settings_naming_them(field, value, tmp_path,
                                                           tmp_path_factory):
  _, directory = _reference("vision_head_tanh", tmp_path_factory)
  config = siglip2.config_from_hf(directory)
  path = _edited_checkpoint(directory, tmp_path, lambda hf: hf.update({field: value}))
  message = re.escape(f"{field}={value!r} is not implemented")
  with pytest.raises(CheckpointError, match=message):
    siglip2.load_hf_siglip2(path, config)
  with pytest.raises(CheckpointError, match=message):
    siglip2.config_from_hf(path)


def test_loader_names_settings_configured_differently(tmp_path_factory):
  _, directory = _reference("full_model_no_head_exact_scanned", tmp_path_factory)
  config = siglip2.config_from_hf(directory)
  assert (config.posemb_grid, config.patch_size, config.image_size) == (3, 4, 12)
  assert not config.gelu_approximate and config.layernorm_eps == 1e-5
  for field, value, message in (
      ("gelu_approximate", True, r"vision_config: hidden_act='gelu' but "
                                 r"siglip2.gelu_approximate=True"),
      ("posemb_grid", 4, r"num_patches=9 but siglip2.posemb_grid=4: .* Set "
                         r"siglip2.posemb_grid=3"),
      ("layernorm_eps", 1e-6, r"layer_norm_eps=1e-05 but siglip2.layernorm_eps=1e-06")):
    with pytest.raises(CheckpointError, match=message):
      siglip2.load_hf_siglip2(directory, dataclasses.replace(config, **{field: value}))


def test_loader_refuses_other_families_and_unknown_model_fields(tmp_path, tmp_path_factory):
  _, directory = _reference("full_model_no_head_exact_scanned", tmp_path_factory)
  config = siglip2.config_from_hf(directory)
  path = _edited_checkpoint(directory, tmp_path, lambda hf: hf.update(logit_softcap=30.0))
  with pytest.raises(CheckpointError, match=r"config.json: logit_softcap=30.0 is not "
                                            r"implemented"):
    siglip2.load_hf_siglip2(path, config)
  # A fixed-resolution SigLIP 2 is a transformers `siglip` checkpoint: pointed elsewhere.
  path = _edited_checkpoint(directory, tmp_path, lambda hf: hf.update(model_type="siglip"))
  with pytest.raises(CheckpointError, match=r"model_type='siglip' is not implemented.*"
                                            r"teacher.kind=siglip"):
    siglip2.load_hf_siglip2(path, config)
