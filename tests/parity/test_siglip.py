"""Parity of `models.vit.ViT` + `weights.siglip` loaders against HF and timm SigLIP towers.

Random tiny PyTorch models are saved to real safetensors files, loaded through our
loaders (scanned and looped), and every intermediate is compared in float32.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from tests.parity.torch_refs import import_timm, to_numpy

timm = import_timm()  # Also makes `transformers` importable next to CPU torch.
from transformers import (SiglipConfig, SiglipModel, SiglipVisionConfig,  # noqa: E402
                          SiglipVisionModel)

from vla_jax.errors import CheckpointError  # noqa: E402
from vla_jax.models.vit import ViT, ViTConfig, abstract_params  # noqa: E402
from vla_jax.weights import siglip  # noqa: E402
from vla_jax.weights.mapping import load_params  # noqa: E402
from vla_jax.weights.safetensors import open_safetensors  # noqa: E402

TOL = 1e-4
HF_TOWER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=64, image_size=32, patch_size=8)
TIMM_DEPTH = 3


def _randomize(model: torch.nn.Module) -> None:
  """Replaces the init (zero biases, unit norms) so every tensor's mapping matters."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.normal_(0.0, 0.2)
      if "norm" in name and name.endswith("weight"):
        param.add_(1.0)


def _nhwc(images: torch.Tensor) -> np.ndarray:
  return np.transpose(to_numpy(images), (0, 2, 3, 1))


def _assert_close(ours, theirs, what: str) -> None:
  ours, theirs = np.asarray(ours, np.float32), to_numpy(theirs)
  assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
  assert np.std(theirs) > 1e-2, f"{what}: reference is degenerate"
  error = np.max(np.abs(ours - theirs))
  assert error < TOL, f"{what}: max abs error {error:.2e}"


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: ViTConfig):
  """One compiled forward per config (configs are frozen, hence hashable)."""
  return jax.jit(ViT(config).apply)


def _run(config: ViTConfig, params, images: torch.Tensor):
  return _jitted_apply(config)({"params": params}, _nhwc(images))


def _hf_config(scan: bool) -> ViTConfig:
  return ViTConfig(width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=8, image_size=32,
                   pool_type="map", gelu_approximate=True, scan=scan)


@pytest.fixture(scope="module")
def hf_tower(tmp_path_factory):
  torch.manual_seed(0)
  model = SiglipVisionModel(SiglipVisionConfig(**HF_TOWER, vision_use_head=True)).eval()
  _randomize(model)
  path = tmp_path_factory.mktemp("hf_siglip")
  model.save_pretrained(path)
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    outputs = model(pixel_values=images, output_hidden_states=True)
  return path, images, outputs


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_hf_siglip_vision_model(hf_tower, scan):
  path, images, ref = hf_tower
  config = _hf_config(scan)
  params = siglip.load_hf_siglip(str(path), config)
  x, out = _run(config, params, images)
  for i in range(config.depth):
    _assert_close(out[f"block{i:02d}"], ref.hidden_states[i + 1], f"block{i:02d}")
  _assert_close(out["encoded"], ref.last_hidden_state, "encoded")
  _assert_close(out["pre_logits"], ref.pooler_output, "pre_logits")
  _assert_close(x, ref.pooler_output, "x")


def test_hf_full_siglip_model_ignores_text_tower(tmp_path):
  torch.manual_seed(1)
  text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=64, vocab_size=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
  model = SiglipModel(SiglipConfig(vision_config=HF_TOWER, text_config=text)).eval()
  _randomize(model)
  model.save_pretrained(tmp_path)
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    ref = model.vision_model(pixel_values=images)
  config = _hf_config(scan=False)
  _, out = _run(config, siglip.load_hf_siglip(str(tmp_path), config), images)
  _assert_close(out["encoded"], ref.last_hidden_state, "encoded")
  _assert_close(out["pre_logits"], ref.pooler_output, "pre_logits")


def test_hf_vision_checkpoint_does_not_hide_stray_text_keys(hf_tower, tmp_path):
  """Text keys are ignored only in a full SiglipModel, not in a vision-only file."""
  path, _, _ = hf_tower
  tensors = {k: np.array(v) for k, v in open_safetensors(str(path)).items()}
  tensors["text_model.embeddings.token_embedding.weight"] = np.zeros((4, 32), np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="text_model"):
    siglip.load_hf_siglip(str(tmp_path / "model.safetensors"), _hf_config(scan=False))


def _timm_config(depth: int = TIMM_DEPTH, **overrides) -> ViTConfig:
  return ViTConfig(**{**dict(width=32, depth=depth, mlp_dim=64, num_heads=4, patch_size=14,
                             image_size=28, pool_type="map", gelu_approximate=False),
                      **overrides})


@pytest.fixture(scope="module")
def timm_tower(tmp_path_factory):
  torch.manual_seed(2)
  model = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, img_size=28,
                            embed_dim=32, depth=TIMM_DEPTH, num_heads=4, mlp_ratio=2,
                            num_classes=0).eval()
  _randomize(model)
  path = str(tmp_path_factory.mktemp("timm_siglip") / "model.safetensors")
  safetensors.torch.save_file(model.state_dict(), path)
  images = torch.randn(2, 3, 28, 28)
  with torch.no_grad():
    ref = dict(features=model.forward_features(images), pooled=model(images),
               blocks=model.get_intermediate_layers(images, n=list(range(TIMM_DEPTH))),
               # What OpenVLA's featurizer returns: the second-to-last block, un-normalised.
               openvla=model.get_intermediate_layers(images, n={TIMM_DEPTH - 2})[0])
  return path, images, ref


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_timm_siglip(timm_tower, scan):
  path, images, ref = timm_tower
  config = _timm_config(scan=scan)
  x, out = _run(config, siglip.load_timm_siglip(path, config), images)
  _assert_close(out[f"block{TIMM_DEPTH - 2:02d}"], ref["openvla"], "get_intermediate_layers")
  for i in range(TIMM_DEPTH):
    _assert_close(out[f"block{i:02d}"], ref["blocks"][i], f"block{i:02d}")
  _assert_close(out["encoded"], ref["features"], "encoded")
  _assert_close(x, ref["pooled"], "pooled")


@pytest.mark.parametrize("scan,final_norm", [(False, True), (True, False)],
                         ids=["loop", "scan-no-final-norm"])
def test_timm_truncated_tower(timm_tower, scan, final_norm):
  """OpenVLA's layout: depth - 1 blocks, no pooling, the last kept block is the output."""
  path, images, ref = timm_tower
  config = _timm_config(depth=TIMM_DEPTH - 1, pool_type="none", final_norm=final_norm,
                        scan=scan)
  source = open_safetensors(path)
  ignore = siglip.timm_siglip_unused(config, TIMM_DEPTH)
  params = load_params(source, siglip.timm_siglip_rules(config), abstract_params(config),
                       ignore=ignore)
  x, out = _run(config, params, images)
  for i in range(config.depth):
    _assert_close(out[f"block{i:02d}"], ref["blocks"][i], f"block{i:02d}")
  _assert_close(out[f"block{config.depth - 1:02d}"], ref["openvla"], "openvla features")
  if not final_norm:
    _assert_close(x, ref["openvla"], "x")
  # Each unused-regex matters: without them the leftovers are reported, not dropped.
  rules, expected = siglip.timm_siglip_rules(config), abstract_params(config)
  with pytest.raises(CheckpointError, match=r"unexpected.*attn_pool"):
    load_params(source, rules, expected)
  with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.2\."):
    load_params(source, rules, expected, ignore=[p for p in ignore if "blocks" not in p])


# ----------------------------------------------------------------------------- resolution
def _max_error(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float32) - to_numpy(theirs))))


@pytest.mark.parametrize("size", [48, 24], ids=["up_6x6", "down_3x3"])
def test_hf_siglip_at_another_resolution(hf_tower, size):
  """A 32 px (4x4) checkpoint run at `size` px: ours, built by `config_from_hf` and loaded
  with transformers' own resampling, equals `interpolate_pos_encoding=True`."""
  path, _, _ = hf_tower
  model = SiglipVisionModel.from_pretrained(path).eval()
  images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
  with torch.no_grad():
    ref = model(pixel_values=images, interpolate_pos_encoding=True)
  config = siglip.config_from_hf(str(path), image_size=size)
  assert config == dataclasses.replace(_hf_config(scan=False), image_size=size)
  _, out = _run(config, siglip.load_hf_siglip(str(path), config), images)
  _assert_close(out["encoded"], ref.last_hidden_state, "encoded")
  _assert_close(out["pre_logits"], ref.pooler_output, "pre_logits")
  # big_vision's resampling is measurably another function (what we did before).
  params = siglip.load_hf_siglip(str(path), config, posemb_resample="bilinear_align_corners")
  assert _max_error(_run(config, params, images)[1]["encoded"], ref.last_hidden_state) > 1e-3


def test_timm_siglip_at_another_resolution(tmp_path):
  """timm resamples with antialiased bicubic (`dynamic_img_size`); so do we for timm."""
  torch.manual_seed(3)
  model = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, img_size=42,
                            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=0,
                            dynamic_img_size=True).eval()
  _randomize(model)
  path = str(tmp_path / "model.safetensors")
  safetensors.torch.save_file(model.state_dict(), path)
  for size in (70, 28):  # 3x3 -> 5x5 and -> 2x2 patches
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
      ref = model.forward_features(images)
    config = _timm_config(depth=2, image_size=size)
    _, out = _run(config, siglip.load_timm_siglip(path, config), images)
    _assert_close(out["encoded"], ref, f"encoded at {size} px")


def test_sigmoid_loss_equals_transformers_siglip_loss():
  """`train.siglip_pretrain.sigmoid_loss` is transformers' SiglipModel(return_loss=True)."""
  from vla_jax.train import siglip_pretrain  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = SiglipConfig(
      text_config=dict(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=12),
      vision_config=dict(HF_TOWER, num_hidden_layers=1))
  model = SiglipModel(config).eval()
  with torch.no_grad():  # a scale and bias where both the pairs and the rest matter
    model.logit_scale.fill_(1.7)
    model.logit_bias.fill_(-1.3)
  batch = 6
  pixels = torch.randn(batch, 3, 32, 32)
  ids = torch.randint(0, 50, (batch, 12))
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
  ours = siglip_pretrain.sigmoid_loss(
      to_numpy(out.image_embeds) * 3.0,  # unnormalised: ours normalises itself
      to_numpy(out.text_embeds), np.float32(1.7), np.float32(-1.3))
  np.testing.assert_allclose(float(ours), float(out.loss), rtol=1e-5)
  # Matching pairs matter: swapping two captions changes the loss.
  swapped = siglip_pretrain.sigmoid_loss(to_numpy(out.image_embeds),
                                         to_numpy(out.text_embeds)[[1, 0, 2, 3, 4, 5]],
                                         np.float32(1.7), np.float32(-1.3))
  assert abs(float(swapped) - float(ours)) > 1e-3
