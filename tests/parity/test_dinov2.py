"""DinoV2 + its loaders vs the PyTorch references (transformers and timm), in fp32.

Each test builds a small random PyTorch model, perturbs every parameter (so layer scale,
LayerNorm affine terms, registers and biases all matter and no tensor is at its default),
saves it to real safetensors files, loads it through our loader and compares the final
and per-block hidden states to 1e-4.
"""

import re

import jax
import numpy as np
import pytest
import torch

from tests.parity.torch_refs import import_timm, to_numpy
from vla_jax.models.dinov2 import DinoV2, DinoV2Config
from vla_jax.errors import CheckpointError
from vla_jax.weights import dinov2 as dinov2_weights
from vla_jax.weights.mapping import load_params
from vla_jax.weights.safetensors import open_safetensors

timm = import_timm()  # also makes transformers' vision imports work (see torch_refs)
import transformers  # noqa: E402  pylint: disable=g-import-not-at-top
import safetensors.torch  # noqa: E402  pylint: disable=g-import-not-at-top

TOL = 1e-4
WIDTH, DEPTH, HEADS, IMAGE, PATCH = 32, 3, 4, 28, 7


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Adds N(0, 0.2) noise to every parameter so none keeps its structured init."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.2 * torch.randn(param.shape, generator=generator))
  return model.eval()


def _images(seed: int = 0, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _torch_input(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _close(ours, theirs, what: str):
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
  err = float(np.max(np.abs(ours - theirs)))
  assert err < TOL, f"{what}: max abs error {err:.2e}"


def _our_config(**overrides) -> DinoV2Config:
  return DinoV2Config(**{**dict(width=WIDTH, depth=DEPTH, num_heads=HEADS,
                                image_size=IMAGE, patch_size=PATCH), **overrides})


def _hf_model(registers: int, swiglu: bool = False, seed: int = 0):
  torch.manual_seed(seed)
  common = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                image_size=IMAGE, patch_size=PATCH, layerscale_value=0.5,
                use_swiglu_ffn=swiglu)
  if registers:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    model = transformers.Dinov2WithRegistersModel(config)
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
  return _perturb(model, seed)


def _compare_hf(model, params, config: DinoV2Config, images: np.ndarray):
  with torch.no_grad():
    ref = model(pixel_values=_torch_input(images), output_hidden_states=True)
  x, out = jax.jit(DinoV2(config).apply)({"params": params}, images)
  assert len(ref.hidden_states) == config.depth + 1
  _close(out["embedded"], to_numpy(ref.hidden_states[0]), "embeddings")
  for i in range(config.depth):
    _close(out[f"block{i:02d}"], to_numpy(ref.hidden_states[i + 1]), f"block{i:02d}")
  _close(x, to_numpy(ref.last_hidden_state), "encoded")
  _close(out["cls"], to_numpy(ref.pooler_output), "cls")
  prefix = DinoV2.num_prefix_tokens(config)
  _close(out["patch_tokens"], to_numpy(ref.last_hidden_state[:, prefix:]), "patch_tokens")


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_matches_transformers(tmp_path, registers, scan):
  model = _hf_model(registers)
  model.save_pretrained(tmp_path)
  config = _our_config(num_registers=registers, scan=scan)
  params = dinov2_weights.load_hf_dinov2(tmp_path, config)
  if scan:
    assert params["blocks"]["attn"]["query"]["kernel"].shape == (DEPTH, WIDTH, HEADS, 8)
  else:
    assert "blocks_2" in params
  _compare_hf(model, params, config, _images())


@pytest.mark.parametrize("layout", ["hub", "state_dict"])
def test_hf_dinov2_swiglu_matches_transformers(tmp_path, layout):
  model = _hf_model(registers=0, swiglu=True, seed=1)
  if layout == "hub":
    model.save_pretrained(tmp_path)
    path = tmp_path
  else:  # transformers >= 5 in-memory names: q_proj / gate_proj / up_proj / down_proj
    path = str(tmp_path / "state.safetensors")
    safetensors.torch.save_file(model.state_dict(), path)
  config = _our_config(ffn="swiglu", scan=layout == "hub")
  assert config.hidden_dim == model.encoder.layer[0].mlp.down_proj.in_features
  _compare_hf(model, dinov2_weights.load_hf_dinov2(path, config), config, _images(1))


def _timm_model(depth: int = DEPTH, seed: int = 0):
  torch.manual_seed(seed)
  model = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False,
                            img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=depth,
                            num_heads=HEADS, init_values=0.5, num_classes=0)
  return _perturb(model, seed)


def _save_state_dict(model, path, prefix: str = "", rename=lambda k: k) -> str:
  state = {prefix + rename(k): v.contiguous() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state, path)
  return path


def _reg4_config(**overrides) -> DinoV2Config:
  return _our_config(num_registers=4, posemb_covers_cls=False, **overrides)


@pytest.mark.parametrize("scan", [False, True])
def test_timm_reg4_matches_timm(tmp_path, scan):
  model = _timm_model()
  assert model.no_embed_class and model.num_prefix_tokens == 5  # the layout we claim
  path = _save_state_dict(model, str(tmp_path / "timm.safetensors"))
  config = _reg4_config(scan=scan)
  params = dinov2_weights.load_timm_dinov2(path, config)
  images = _images(2)
  with torch.no_grad():
    features = model.forward_features(_torch_input(images))
    (middle,) = model.get_intermediate_layers(_torch_input(images), n={DEPTH - 2})
  x, out = jax.jit(DinoV2(config).apply)({"params": params}, images)
  _close(x, to_numpy(features), "encoded")
  _close(out[f"block{DEPTH - 2:02d}"][:, 5:], to_numpy(middle), "second-to-last block")
  _close(out["cls"], to_numpy(features[:, 0]), "cls")


@pytest.mark.parametrize("scan", [False, True])
def test_truncated_openvla_tower_from_timm(tmp_path, scan):
  """OpenVLA keeps checkpoint_depth - 1 blocks and reads the un-normed last one."""
  model = _timm_model(seed=3)
  # OpenVLA's HF export: prefixed keys and LayerScale `gamma` renamed `scale_factor`.
  prefix = "vision_backbone.featurizer."
  path = _save_state_dict(model, str(tmp_path / "openvla.safetensors"), prefix,
                          lambda k: re.sub(r"\.gamma$", ".scale_factor", k))
  config = _reg4_config(depth=DEPTH - 1, final_norm=False, scan=scan)
  params = dinov2_weights.load_timm_dinov2(path, config, prefix=prefix)
  assert "norm" not in params
  images = _images(3)
  with torch.no_grad():
    (reference,) = model.get_intermediate_layers(_torch_input(images), n={DEPTH - 2})
  _, out = jax.jit(DinoV2(config).apply)({"params": params}, images)
  _close(out["patch_tokens"], to_numpy(reference), "patch_tokens")


def test_truncated_tower_rules_and_unused_regexes(tmp_path):
  """A 1-block tower with the final norm, through the public rules + load_params."""
  model = _timm_model(seed=4)
  path = _save_state_dict(model, str(tmp_path / "timm.safetensors"))
  config = _reg4_config(depth=1)
  source = open_safetensors(path)
  expected = jax.eval_shape(DinoV2(config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), np.float32))["params"]
  rules = dinov2_weights.timm_dinov2_rules(config)
  unused = dinov2_weights.timm_dinov2_unused(config, checkpoint_depth=DEPTH)
  params = load_params(source, rules, expected, ignore=unused)
  with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.1\."):  # without the regexes: blocks 1-2
    load_params(source, rules, expected)
  images = _images(4)
  with torch.no_grad():
    tokens = model.patch_embed(_torch_input(images))
    tokens = model.blocks[0](model._pos_embed(tokens))  # pylint: disable=protected-access
    reference = model.norm(tokens)
  x, _ = DinoV2(config).apply({"params": params}, images)
  _close(x, to_numpy(reference), "1-block encoded")


# ----------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("size", [42, 21], ids=["up_6x6", "down_3x3"])
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_at_another_resolution(tmp_path, registers, size):
  """A 28 px (4x4) checkpoint run at `size` px: ours, built by `config_from_hf`, equals
  transformers (which interpolates by itself: `Dinov2Model` plain bicubic,
  `Dinov2WithRegistersModel` antialiased)."""
  model = _hf_model(registers, seed=5)
  model.save_pretrained(tmp_path)
  config = dinov2_weights.config_from_hf(tmp_path, image_size=size)
  assert config == _our_config(num_registers=registers, image_size=size, mlp_dim=4 * WIDTH)
  params = dinov2_weights.load_hf_dinov2(tmp_path, config)
  images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=_torch_input(images))
  x, _ = jax.jit(DinoV2(config).apply)({"params": params}, images)
  _close(x, to_numpy(ref.last_hidden_state), "encoded")
  # The other bicubic is measurably another function.
  other = "bicubic" if registers else "bicubic_antialias"
  params = dinov2_weights.load_hf_dinov2(tmp_path, config, posemb_resample=other)
  x, _ = jax.jit(DinoV2(config).apply)({"params": params}, images)
  assert np.abs(np.asarray(x) - to_numpy(ref.last_hidden_state)).max() > 1e-3


def test_timm_dinov2_at_another_resolution(tmp_path):
  torch.manual_seed(6)
  model = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=IMAGE,
                            patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                            init_values=0.5, num_classes=0, dynamic_img_size=True)
  model = _perturb(model, 6)
  path = _save_state_dict(model, str(tmp_path / "timm.safetensors"))
  for size in (42, 21):
    config = _reg4_config(image_size=size)
    images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      ref = model.forward_features(_torch_input(images))
    x, _ = jax.jit(DinoV2(config).apply)({"params": dinov2_weights.load_timm_dinov2(path, config)},
                                         images)
    _close(x, to_numpy(ref), f"encoded at {size} px")
