"""Parity of whole VLA students with PyTorch references, loaded through our loaders.

* OpenVLA: timm DINOv2-reg4 + timm SigLIP towers (random weights), Prismatic's fused
  projector and a `LlamaForCausalLM`, saved under the `openvla/openvla-7b` key layout;
  the reference forward is Prismatic's (second-to-last block patch tokens, concatenated,
  projected, spliced in after BOS).
* PaliGemma: `PaliGemmaForConditionalGeneration` with a prefix-LM mask, in both the
  key layouts transformers and the hub use.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from tests.parity import torch_refs
from tests.parity.torch_refs import to_numpy
from vla_jax.errors import CheckpointError
from vla_jax.models import dinov2 as dinov2_lib
from vla_jax.models import llm as llm_lib
from vla_jax.models import vit as vit_lib
from vla_jax.models.vla import SIGLIP_MEAN, SIGLIP_STD, VLA, VLAConfig
from vla_jax.weights import vla as vla_weights

TOL = 1e-4
IMAGE, PATCH, DEPTH = 32, 8, 3
N_VISUAL = (IMAGE // PATCH) ** 2


def _images(batch=2, size=IMAGE, seed=0):
  return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def openvla(tmp_path_factory):
  """(reference modules, checkpoint path, config factory) for a tiny OpenVLA."""
  torch.manual_seed(0)
  refs = torch_refs.make_openvla_reference(
      IMAGE, PATCH, dino_width=32, siglip_width=48, tower_depth=DEPTH, tower_heads=4,
      llama_config=transformers.LlamaConfig(
          vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
          max_position_embeddings=128))
  path = tmp_path_factory.mktemp("openvla") / "model.safetensors"
  safetensors.torch.save_file(torch_refs.openvla_state_dict(refs), str(path))

  def config(scan=False):
    siglip_cfg = vit_lib.ViTConfig(width=48, depth=DEPTH - 1, mlp_dim=96, num_heads=4,
                                   patch_size=PATCH, image_size=IMAGE, pool_type="none",
                                   gelu_approximate=False, final_norm=False, scan=scan)
    dino_cfg = dinov2_lib.DinoV2Config(width=32, depth=DEPTH - 1, num_heads=4, patch_size=PATCH,
                                       image_size=IMAGE, num_registers=4,
                                       posemb_covers_cls=False, final_norm=False, scan=scan)
    llm_cfg = llm_lib.LLMConfig(family="llama", vocab_size=300, width=64, depth=3, num_heads=4,
                                num_kv_heads=2, mlp_dim=128, norm_eps=1e-5,
                                max_position_embeddings=128, scan=scan)
    return VLAConfig("openvla", llm_cfg, siglip_cfg, dino_cfg, IMAGE)

  return refs, path, config


@pytest.mark.parametrize("scan", [False, True])
def test_openvla_matches_prismatic_reference(openvla, scan):
  refs, path, make_config = openvla
  config = make_config(scan)
  params = vla_weights.load_hf_openvla(str(path), config)
  images = _images()
  tokens = np.random.default_rng(1).integers(3, 300, size=(2, 9)).astype(np.int32)
  tokens[:, 0] = 1
  mask = np.ones_like(tokens, dtype=bool)
  mask[1, -3:] = False  # right padding, as OpenVLA batches
  ref = torch_refs.prismatic_forward(refs, images, tokens, mask, output_hidden_states=True)
  out = jax.jit(lambda p: VLA(config).apply(
      {"params": p}, jnp.asarray(images), jnp.asarray(tokens), jnp.asarray(mask),
      align_layer=2, return_all_hidden=True))(params)
  valid = np.asarray(out["input_mask"])
  assert valid.shape == (2, 9 + N_VISUAL)
  np.testing.assert_array_equal(np.asarray(out["visual_positions"]), np.arange(1, 1 + N_VISUAL))
  np.testing.assert_allclose(np.asarray(out["logits"])[valid], to_numpy(ref.logits)[valid],
                             atol=TOL, rtol=0)
  for k in range(3):  # HF's last entry is after the final norm; ours before.
    np.testing.assert_allclose(np.asarray(out["hidden"][k])[valid],
                               to_numpy(ref.hidden_states[k])[valid], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["align_hidden"]),
                             to_numpy(ref.hidden_states[2])[:, 1:1 + N_VISUAL], atol=TOL, rtol=0)


def test_openvla_loader_rejects_wrong_config(openvla):
  _, path, make_config = openvla
  config = make_config()
  wrong = VLAConfig("openvla", llm_lib.LLMConfig(
      family="llama", vocab_size=300, width=64, depth=4, num_heads=4, num_kv_heads=2,
      mlp_dim=128, norm_eps=1e-5), config.siglip, config.dino, IMAGE)
  with pytest.raises(CheckpointError, match=r"missing from the .*layers\.3"):
    vla_weights.load_hf_openvla(str(path), wrong)


def _paligemma(vision_use_head=False):
  torch.manual_seed(0)
  config = transformers.PaliGemmaConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=28, patch_size=7, projection_dim=48,
                         vision_use_head=vision_use_head),
      text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                       vocab_size=300, hidden_activation="gelu_pytorch_tanh"),
      image_token_index=299, projection_dim=48, vocab_size=300)
  return transformers.PaliGemmaForConditionalGeneration(config).eval()


def _our_paligemma_config(scan=False):
  siglip = vit_lib.ViTConfig(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=7,
                             image_size=28, pool_type="none", scan=scan)
  llm = llm_lib.LLMConfig(family="gemma", vocab_size=300, width=48, depth=2, num_heads=4,
                          num_kv_heads=1, head_dim=16, mlp_dim=96, norm_eps=1e-6, scan=scan)
  return VLAConfig("paligemma", llm, siglip, None, 28)


def _hub_layout(state):
  """transformers-5 key names -> the hub's PaliGemma names (as published checkpoints)."""
  renames = [("model.vision_tower.", "vision_tower.vision_model."),
             ("model.multi_modal_projector.", "multi_modal_projector."),
             ("model.language_model.", "language_model.model."),
             ("lm_head.", "language_model.lm_head.")]
  out = {}
  for key, value in state.items():
    for old, new in renames:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = value.clone()  # tied weights must not share storage on disk
  return out


@pytest.mark.parametrize("layout,scan", [("save_pretrained", False), ("hub", True),
                                         ("state_dict", False)])
def test_paligemma_matches_transformers(tmp_path, layout, scan):
  model = _paligemma()
  path = tmp_path / "model.safetensors"
  if layout == "hub":
    safetensors.torch.save_file(_hub_layout(model.state_dict()), str(path))
  elif layout == "state_dict":
    safetensors.torch.save_file({k: v.clone() for k, v in model.state_dict().items()},
                                str(path))
  else:
    model.save_pretrained(tmp_path)
    path = tmp_path
  config = _our_paligemma_config(scan)
  if layout == "save_pretrained":  # beside a config.json: build ours from it
    config = vla_weights.paligemma_config_from_hf(str(path), scan=scan)
    assert (config.llm.width, config.siglip.width, config.image_size) == (48, 32, 28)
  params = vla_weights.load_hf_paligemma(str(path), config)

  n = config.num_visual_tokens
  images = _images(size=28)
  text = np.random.default_rng(2).integers(3, 299, size=(2, 10)).astype(np.int32)
  text[:, 0] = 2  # Gemma's BOS
  prefix = np.zeros_like(text, dtype=bool)
  prefix[:, :6] = True  # BOS + prompt + "\n" are the prefix; the rest is the suffix
  input_ids = np.concatenate([np.full((2, n), 299, np.int32), text], axis=1)
  token_type_ids = np.concatenate([np.zeros((2, n), np.int64), (~prefix).astype(np.int64)], 1)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(input_ids).long(),
                pixel_values=torch_refs.torch_pixels(images, SIGLIP_MEAN, SIGLIP_STD),
                attention_mask=torch.ones(input_ids.shape, dtype=torch.long),
                token_type_ids=torch.from_numpy(token_type_ids), output_hidden_states=True)
  out = VLA(config).apply({"params": params}, jnp.asarray(images), jnp.asarray(text),
                          prefix_mask=jnp.asarray(prefix), align_layer=1)
  np.testing.assert_array_equal(np.asarray(out["visual_positions"]), np.arange(n))
  np.testing.assert_allclose(np.asarray(out["logits"]), to_numpy(ref.logits), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["align_hidden"]),
                             to_numpy(ref.hidden_states[1])[:, :n], atol=TOL, rtol=0)


def test_paligemma_prefix_is_bidirectional():
  """Changing a later prefix token changes the image tokens' states; a suffix token does not."""
  config = _our_paligemma_config()
  model = VLA(config)
  images = jnp.asarray(_images(size=28))
  text = jnp.asarray(np.random.default_rng(3).integers(3, 299, size=(2, 8)), jnp.int32)
  prefix = jnp.arange(8)[None].repeat(2, 0) < 5
  params = model.init(jax.random.key(0), images, text)["params"]

  def visual_state(tokens):
    return model.apply({"params": params}, images, tokens, prefix_mask=prefix,
                       align_layer=2)["align_hidden"]

  base = visual_state(text)
  assert not np.allclose(visual_state(text.at[:, 4].set(7)), base)  # prefix token
  np.testing.assert_allclose(visual_state(text.at[:, 6].set(7)), base, atol=1e-6)  # suffix


def test_paligemma_loader_rejects_openvla_checkpoint(openvla):
  _, path, _ = openvla
  with pytest.raises(CheckpointError, match="Not a PaliGemma checkpoint"):
    vla_weights.load_hf_paligemma(str(path), _our_paligemma_config())


def test_big_vision_paligemma_npz_matches_transformers(tmp_path):
  """big_vision's PaliGemma npz (`params/img/...` with `img/head` as projection, `params/llm/...`)."""
  from vla_jax.weights.npz import flatten

  model = _paligemma()
  model.save_pretrained(tmp_path / "hf")
  config = _our_paligemma_config()
  hf_params = vla_weights.load_hf_paligemma(str(tmp_path / "hf"), config)  # parity-tested above
  tree = torch_refs.gemma_to_big_vision(model.config.text_config,
                                        model.model.language_model.state_dict())
  tree.update({"img/" + k: np.asarray(v) for k, v in flatten(hf_params["siglip"]).items()})
  tree["img/head/kernel"] = np.asarray(hf_params["projector"]["linear"]["kernel"])
  tree["img/head/bias"] = np.asarray(hf_params["projector"]["linear"]["bias"])
  path = str(tmp_path / "paligemma.npz")
  np.savez(path, **{"params/" + k: v for k, v in tree.items()})

  params = vla_weights.load_big_vision_paligemma(path, config)
  images = _images(size=28)
  text = np.random.default_rng(4).integers(3, 299, size=(2, 7)).astype(np.int32)
  text[:, 0] = 2
  n = config.num_visual_tokens
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(np.concatenate(
                    [np.full((2, n), 299, np.int32), text], axis=1)).long(),
                pixel_values=torch_refs.torch_pixels(images, SIGLIP_MEAN, SIGLIP_STD),
                token_type_ids=torch.zeros((2, n + 7), dtype=torch.long))
  out = VLA(config).apply({"params": params}, jnp.asarray(images), jnp.asarray(text))
  np.testing.assert_allclose(np.asarray(out["logits"]), to_numpy(ref.logits), atol=TOL, rtol=0)
