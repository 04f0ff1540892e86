"""Loaders refuse checkpoints whose config.json changes the function our config computes.

Each case is a real `save_pretrained` directory of a tiny random transformers model whose
config sets one field (timm: `save_for_hf`; OpenVLA, whose classes live outside
transformers: the hub's config.json layout written beside the weights). Loading it into
the config a user would write by hand for the plain model must raise a CheckpointError
naming the field and its value; the plain checkpoint itself loads.
"""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.parity import torch_refs

timm = torch_refs.import_timm()  # also makes transformers importable beside CPU torch
import transformers  # noqa: E402  pylint: disable=g-import-not-at-top

from vla_jax.errors import CheckpointError  # noqa: E402
from vla_jax.models import dinov2 as dinov2_lib  # noqa: E402
from vla_jax.models import llm as llm_lib  # noqa: E402
from vla_jax.models import vit as vit_lib  # noqa: E402
from vla_jax.models.vla import VLAConfig  # noqa: E402
from vla_jax.weights import dinov2 as dinov2_weights  # noqa: E402
from vla_jax.weights import llm as llm_weights  # noqa: E402
from vla_jax.weights import siglip as siglip_weights  # noqa: E402
from vla_jax.weights import vla as vla_weights  # noqa: E402

VOCAB = 64


def _save(model, path):
  model.eval().save_pretrained(path)
  return str(path)


# ----------------------------------------------------------------------------- LLMs
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=128, tie_word_embeddings=False)
GEMMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
             max_position_embeddings=128)


def _llama_config(**overrides):
  """What a user writes by hand for the plain tiny Llama above."""
  return llm_lib.LLMConfig(**{**dict(family="llama", vocab_size=VOCAB, width=64, depth=2,
                                     num_heads=4, num_kv_heads=2, mlp_dim=96, norm_eps=1e-5,
                                     max_position_embeddings=128, tie_embeddings=False),
                              **overrides})


def _gemma_config(**overrides):
  return llm_lib.LLMConfig(**{**dict(family="gemma", vocab_size=VOCAB, width=64, depth=2,
                                     num_heads=4, num_kv_heads=1, head_dim=32, mlp_dim=96,
                                     norm_eps=1e-6, max_position_embeddings=128,
                                     tie_embeddings=True), **overrides})


LLAMA_ROPE = {
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64, rope_theta=10000.0),
    "yarn": dict(rope_type="yarn", factor=2.0, rope_theta=10000.0,
                 original_max_position_embeddings=64),
}


@pytest.mark.parametrize("rope_type", sorted(LLAMA_ROPE))
def test_llama_with_rope_scaling_is_refused(tmp_path, rope_type):
  config = transformers.LlamaConfig(**LLAMA, rope_parameters=LLAMA_ROPE[rope_type])
  path = _save(transformers.LlamaForCausalLM(config), tmp_path)
  with pytest.raises(CheckpointError, match=rf"rope_type={rope_type!r} is not implemented"):
    llm_weights.load_hf_llm(path, _llama_config())
  with pytest.raises(CheckpointError, match="rope_type"):
    llm_weights.config_from_hf(path)


LLM_CASES = {
    # name: (family, HF config overrides, expected message)
    "hidden_act": ("llama", dict(hidden_act="gelu"), r"hidden_act='gelu' is not implemented"),
    "mlp_bias": ("llama", dict(mlp_bias=True), r"mlp_bias=True is not implemented"),
    "attention_bias": ("llama", dict(attention_bias=True),
                       r"attention_bias=True but llm.attention_bias=False"),
    "head_dim": ("llama", dict(head_dim=32), r"head_dim=32 but llm.head_dim=16"),
    "num_key_value_heads": ("llama", dict(num_key_value_heads=1),
                            r"num_key_value_heads=1 but llm.num_kv_heads=2"),
    "rms_norm_eps": ("llama", dict(rms_norm_eps=1e-6), r"rms_norm_eps=1e-06 but llm.norm_eps"),
    "rope_theta": ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=5e5)),
                   r"rope_theta=500000.0 but llm.rope_theta=10000.0"),
    "tie_word_embeddings": ("llama", dict(tie_word_embeddings=True),
                            r"tie_word_embeddings=True but llm.tie_embeddings=False"),
    "gemma_hidden_act": ("gemma", dict(hidden_act="silu"),
                         r"hidden_act='silu' is not implemented"),
    "gemma_bidirectional": ("gemma", dict(use_bidirectional_attention=True),
                            r"use_bidirectional_attention=True is not implemented"),
}


@pytest.mark.parametrize("case", sorted(LLM_CASES))
def test_llm_config_that_changes_the_function_is_refused(tmp_path, case):
  family, overrides, message = LLM_CASES[case]
  if family == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
    ours = _llama_config()
  else:
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**GEMMA, **overrides}))
    ours = _gemma_config()
  path = _save(model, tmp_path)
  with pytest.raises(CheckpointError, match=message) as error:
    llm_weights.load_hf_llm(path, ours)
  assert "config.json" in str(error.value)


def test_llm_of_another_family_is_refused(tmp_path):
  config = transformers.Gemma2Config(**GEMMA)
  path = _save(transformers.Gemma2ForCausalLM(config), tmp_path)
  with pytest.raises(CheckpointError, match=r"model_type='gemma2' is not implemented"):
    llm_weights.load_hf_llm(path, _gemma_config())
  with pytest.raises(CheckpointError, match=r"model_type='gemma2'"):
    llm_weights.config_from_hf(path)


def test_plain_llms_load_and_config_from_hf_matches(tmp_path):
  for name, model, ours in (
      ("llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
       _llama_config()),
      ("gemma", transformers.GemmaForCausalLM(transformers.GemmaConfig(**GEMMA)),
       _gemma_config())):
    path = _save(model, tmp_path / name)
    llm_weights.load_hf_llm(path, ours)
    assert llm_weights.config_from_hf(path) == ours


# ----------------------------------------------------------------------------- SigLIP
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def _siglip_config(**overrides):
  return vit_lib.ViTConfig(**{**dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8,
                                     image_size=32, pool_type="map"), **overrides})


SIGLIP_CASES = {
    "exact_gelu": (dict(hidden_act="gelu"), r"hidden_act='gelu' but vit.gelu_approximate=True"),
    "quick_gelu": (dict(hidden_act="quick_gelu"), r"hidden_act='quick_gelu' is not implemented"),
    "layer_norm_eps": (dict(layer_norm_eps=1e-5), r"layer_norm_eps=1e-05 but vit.layernorm_eps"),
    "num_attention_heads": (dict(num_attention_heads=2),
                            r"num_attention_heads=2 but vit.num_heads=4"),
    "vision_use_head": (dict(vision_use_head=False), r"vision_use_head=False"),
}


@pytest.mark.parametrize("case", sorted(SIGLIP_CASES))
def test_siglip_config_that_changes_the_function_is_refused(tmp_path, case):
  overrides, message = SIGLIP_CASES[case]
  config = transformers.SiglipVisionConfig(**{**SIGLIP, **overrides})
  path = _save(transformers.SiglipVisionModel(config), tmp_path)
  with pytest.raises(CheckpointError, match=message):
    siglip_weights.load_hf_siglip(path, _siglip_config())


def test_full_siglip_model_is_checked_through_its_vision_config(tmp_path):
  text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=64, vocab_size=VOCAB)
  config = transformers.SiglipConfig(vision_config={**SIGLIP, "layer_norm_eps": 1e-5},
                                     text_config=text)
  path = _save(transformers.SiglipModel(config), tmp_path)
  with pytest.raises(CheckpointError, match=r"vision_config: layer_norm_eps=1e-05"):
    siglip_weights.load_hf_siglip(path, _siglip_config())


# ----------------------------------------------------------------------------- DINOv2
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=7)


def _dino_config(**overrides):
  return dinov2_lib.DinoV2Config(**{**dict(width=32, depth=2, num_heads=4, image_size=28,
                                           patch_size=7), **overrides})


DINO_CASES = {
    "hidden_act": (dict(hidden_act="gelu_pytorch_tanh"),
                   r"hidden_act='gelu_pytorch_tanh' is not implemented"),
    "qkv_bias": (dict(qkv_bias=False), r"qkv_bias=False is not implemented"),
    "layer_norm_eps": (dict(layer_norm_eps=1e-5), r"layer_norm_eps=1e-05 but dinov2.layernorm_eps"),
    "num_attention_heads": (dict(num_attention_heads=2),
                            r"num_attention_heads=2 but dinov2.num_heads=4"),
    "mlp_ratio": (dict(mlp_ratio=2), r"mlp_ratio=2 but dinov2.mlp_dim=128"),
    "use_swiglu_ffn": (dict(use_swiglu_ffn=True), r"use_swiglu_ffn=True but dinov2.ffn='mlp'"),
}


@pytest.mark.parametrize("case", sorted(DINO_CASES))
def test_dinov2_config_that_changes_the_function_is_refused(tmp_path, case):
  overrides, message = DINO_CASES[case]
  config = transformers.Dinov2Config(**{**DINO, **overrides})
  path = _save(transformers.Dinov2Model(config), tmp_path)
  with pytest.raises(CheckpointError, match=message):
    dinov2_weights.load_hf_dinov2(path, _dino_config())


def test_dinov2_register_count_is_checked(tmp_path):
  config = transformers.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2)
  path = _save(transformers.Dinov2WithRegistersModel(config), tmp_path)
  with pytest.raises(CheckpointError, match=r"num_register_tokens=2 but dinov2.num_registers=4"):
    dinov2_weights.load_hf_dinov2(path, _dino_config(num_registers=4))


# ----------------------------------------------------------------------------- timm
def test_timm_config_json_is_checked(tmp_path):
  tanh = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, img_size=28,
                           embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=0,
                           act_layer="gelu_tanh")
  timm.models.save_for_hf(tanh, str(tmp_path / "tanh"), safe_serialization=True)
  ours = _siglip_config(patch_size=14, image_size=28, gelu_approximate=False)
  with pytest.raises(CheckpointError, match=r"model_args.act_layer='gelu_tanh' but "
                                            r"vit.gelu_approximate=False"):
    siglip_weights.load_timm_siglip(str(tmp_path / "tanh" / "model.safetensors"), ours)
  qk_norm = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=28,
                              patch_size=7, embed_dim=32, depth=2, num_heads=4, num_classes=0,
                              qk_norm=True)
  timm.models.save_for_hf(qk_norm, str(tmp_path / "qk"), safe_serialization=True)
  dino = _dino_config(num_registers=4, posemb_covers_cls=False)
  with pytest.raises(CheckpointError, match=r"model_args.qk_norm=True is not implemented"):
    dinov2_weights.load_timm_dinov2(str(tmp_path / "qk" / "model.safetensors"), dino)
  with pytest.raises(CheckpointError, match=r"architecture='vit_large_patch14_reg4_dinov2'"):
    siglip_weights.load_timm_siglip(str(tmp_path / "qk" / "model.safetensors"), ours)
  plain = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=28,
                            patch_size=7, embed_dim=32, depth=2, num_heads=4, num_classes=0)
  timm.models.save_for_hf(plain, str(tmp_path / "plain"), safe_serialization=True)
  dinov2_weights.load_timm_dinov2(str(tmp_path / "plain" / "model.safetensors"), dino)


# ----------------------------------------------------------------------------- students
def _paligemma(text_overrides=None, vision_overrides=None):
  config = transformers.PaliGemmaConfig(
      vision_config={**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=28, patch_size=7,
                            projection_dim=48, vision_use_head=False),
                     **(vision_overrides or {})},
      text_config={**dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                          vocab_size=300), **(text_overrides or {})},
      image_token_index=299, projection_dim=48, vocab_size=300)
  return transformers.PaliGemmaForConditionalGeneration(config)


def _paligemma_config():
  siglip = vit_lib.ViTConfig(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=7,
                             image_size=28, pool_type="none")
  llm = llm_lib.LLMConfig(family="gemma", vocab_size=300, width=48, depth=2, num_heads=4,
                          num_kv_heads=1, head_dim=16, mlp_dim=96, norm_eps=1e-6,
                          tie_embeddings=True, max_position_embeddings=8192)
  return VLAConfig("paligemma", llm, siglip, None, 28)


@pytest.mark.parametrize("text,vision,message", [
    (dict(rms_norm_eps=1e-5), None, r"text_config: rms_norm_eps=1e-05"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)), None,
     r"text_config: rope_parameters.rope_type='linear' is not implemented"),
    (None, dict(hidden_act="gelu"), r"vision_config: hidden_act='gelu'"),
], ids=["text_eps", "text_rope", "vision_act"])
def test_paligemma_config_is_checked(tmp_path, text, vision, message):
  path = _save(_paligemma(text, vision), tmp_path)
  with pytest.raises(CheckpointError, match=message):
    vla_weights.load_hf_paligemma(path, _paligemma_config())


def test_plain_paligemma_loads_and_config_from_hf_matches(tmp_path):
  path = _save(_paligemma(), tmp_path)
  vla_weights.load_hf_paligemma(path, _paligemma_config())
  assert vla_weights.paligemma_config_from_hf(path) == _paligemma_config()


@pytest.fixture(scope="module")
def openvla_dir(tmp_path_factory):
  """A tiny OpenVLA checkpoint with the hub's config.json layout (returns the writer)."""
  torch.manual_seed(0)
  refs = torch_refs.make_openvla_reference(
      28, 7, dino_width=32, siglip_width=32, tower_depth=2, tower_heads=4,
      llama_config=transformers.LlamaConfig(**LLAMA))
  path = tmp_path_factory.mktemp("openvla")
  safetensors.torch.save_file(torch_refs.openvla_state_dict(refs), str(path / "model.safetensors"))

  def write(**overrides):
    hub = {"model_type": "openvla", "arch_specifier": "no-align+fused-gelu-mlp",
           "use_fused_vision_backbone": True, "image_sizes": [28, 28],
           "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m",
                              "vit_so400m_patch14_siglip_224"],
           "timm_override_act_layers": [None, None],
           "text_config": {"model_type": "llama", "vocab_size": VOCAB}}
    (path / "config.json").write_text(json.dumps({**hub, **overrides}))
    return str(path)
  return write


def _openvla_config():
  siglip = vit_lib.ViTConfig(width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=7,
                             image_size=28, pool_type="none", gelu_approximate=False,
                             final_norm=False)
  dino = dinov2_lib.DinoV2Config(width=32, depth=1, num_heads=4, patch_size=7, image_size=28,
                                 num_registers=4, posemb_covers_cls=False, final_norm=False)
  return VLAConfig("openvla", _llama_config(), siglip, dino, 28)


@pytest.mark.parametrize("overrides,message", [
    (dict(timm_override_act_layers=["quick_gelu", None]),
     r"timm_override_act_layers=\['quick_gelu', None\] is not implemented"),
    (dict(arch_specifier="no-align+fused-linear"),
     r"arch_specifier='no-align\+fused-linear' is not implemented"),
    (dict(timm_model_ids=["vit_large_patch14_reg4_dinov2.lvd142m",
                          "vit_large_patch14_clip_336.openai"]), r"timm_model_ids="),
    (dict(use_fused_vision_backbone=False), r"use_fused_vision_backbone=False"),
    (dict(text_config={"model_type": "llama", "vocab_size": VOCAB, "rope_scaling":
                       {"type": "linear", "factor": 2.0}}),
     r"text_config: rope_scaling='linear' is not implemented"),
], ids=["act_override", "projector", "clip_tower", "unfused", "text_rope"])
def test_openvla_config_is_checked(openvla_dir, overrides, message):
  with pytest.raises(CheckpointError, match=message):
    vla_weights.load_hf_openvla(openvla_dir(**overrides), _openvla_config())


def test_plain_openvla_loads(openvla_dir):
  params = vla_weights.load_hf_openvla(openvla_dir(), _openvla_config())
  assert np.isfinite(np.asarray(params["llm"]["final_norm"]["scale"])).all()
