"""Loaders for Llama/Gemma decoder weights: HuggingFace safetensors and big_vision npz.

`hf_llm_rules` maps the HF `LlamaForCausalLM` / `GemmaForCausalLM` names
(`<prefix>embed_tokens.weight`, `<prefix>layers.{i}.self_attn.q_proj.weight`, ...,
`<prefix>norm.weight`, `lm_head.weight`) onto `vla_jax.models.llm.LLM`'s parameters,
for scanned or looped layouts. The prefix locates the LLM inside bigger checkpoints:
  causal LM (Llama/Gemma):  prefix "model.",                 lm_head "lm_head.weight"
  OpenVLA (Prismatic):      prefix "language_model.model.",  lm_head "language_model.lm_head.weight"
  PaliGemma files (hub, and `save_pretrained` even in transformers 5.x, which converts
  back to the legacy names on save):
                            prefix "language_model.model.",  lm_head "language_model.lm_head.weight"
  PaliGemma in-memory `state_dict()` of transformers 5.x (e.g. `save_file(model.state_dict())`):
                            prefix "model.language_model.",  lm_head "lm_head.weight"
(PaliGemma ties the output layer, so its lm_head entry, if present, is ignored.)
`big_vision_gemma_rules` maps big_vision's (PaliGemma `.npz`) Gemma layout with its
einsum kernels (`q_einsum/w` [L, H, D, hd], `kv_einsum/w` [L, 2, K, D, hd] or
`qkv_einsum/w` [L, 3, H, D, hd] when K == H, `attn_vec_einsum/w` [L, H, hd, D],
`mlp/gating_einsum` [L, 2, D, F], `mlp/linear` [L, F, D]). Tensors outside the prefix
(vision tower, projector) are ignored; everything under it must match exactly.

`load_hf_llm` reads the `config.json` beside the weights (the file's own, or a PaliGemma's
/ OpenVLA's `text_config`) and refuses, with every reason at once, a checkpoint whose
settings change the function `LLM(config)` computes (`llm_config_problems`: family,
activation, RoPE scaling and theta, norm epsilon, biases, head layout, tying, ...);
`config_from_hf` builds the matching `LLMConfig` from that file.
"""

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import CheckpointError
from vla_jax.models.llm import LLM, LLMConfig
from vla_jax.weights import hf_config
from vla_jax.weights.mapping import Rule, identity, linear, load_params, stacked
from vla_jax.weights.npz import load_npz
from vla_jax.weights.safetensors import open_safetensors


# (prefix, lm_head_key) of the layouts in the module docstring, by name.
HF_LAYOUTS = {
    "causal_lm": ("model.", "lm_head.weight"),
    "openvla": ("language_model.model.", "language_model.lm_head.weight"),
    "paligemma": ("language_model.model.", "language_model.lm_head.weight"),
    "paligemma_state_dict": ("model.language_model.", "lm_head.weight"),
}



def expected_llm_params(config: LLMConfig) -> Any:
  """The LLM's params as a tree of `jax.ShapeDtypeStruct` (nothing is allocated)."""
  model = LLM(config)
  dummy = jnp.zeros((1, 1, config.width), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]


def _layer_rules(config: LLMConfig, per_layer: Sequence[tuple]) -> List[Rule]:
  """Expands (target suffix, source name fn(i), transform) into scanned or looped rules."""
  rules = []
  for target, source_of, transform in per_layer:
    if config.scan:
      rules.append(stacked(f"layers/{target}",
                           [source_of(i) for i in range(config.depth)], transform))
    else:
      rules.extend(Rule.copy(f"layers_{i}/{target}", source_of(i), transform)
                   for i in range(config.depth))
  return rules


def hf_llm_rules(config: LLMConfig, prefix: str = "model.",
                 lm_head_key: str = "lm_head.weight") -> List[Rule]:
  """Rules from HF Llama/Gemma names (under `prefix`) to LLM params.

  Torch Linear weights [out, in] become [in, out] kernels; RMSNorm weights copy as-is
  (HF Gemma stores the same `1 + w` offset as our Gemma norm). `lm_head_key` is used
  only when the config's embeddings are untied.
  """
  per_layer = [("pre_attention_norm/scale", "input_layernorm.weight", identity),
               ("pre_ffw_norm/scale", "post_attention_layernorm.weight", identity)]
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    per_layer.append((f"attn/{proj}/kernel", f"self_attn.{proj}.weight", linear))
    if config.attention_bias:
      per_layer.append((f"attn/{proj}/bias", f"self_attn.{proj}.bias", identity))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    per_layer.append((f"mlp/{proj}/kernel", f"mlp.{proj}.weight", linear))
  rules = [Rule.copy("embedder/input_embedding", f"{prefix}embed_tokens.weight"),
           Rule.copy("final_norm/scale", f"{prefix}norm.weight")]
  rules += _layer_rules(config, [
      (target, lambda i, s=source: f"{prefix}layers.{i}.{s}", transform)
      for target, source, transform in per_layer])
  if not config.effective_tie_embeddings:
    rules.append(Rule.copy("lm_head/kernel", lm_head_key, linear))
  return rules


def _heads_first_to_kernel(w: np.ndarray) -> np.ndarray:
  """[..., N, D, hd] einsum kernel -> [..., D, N * hd] Dense kernel."""
  w = np.moveaxis(w, -3, -2)
  return w.reshape(w.shape[:-2] + (w.shape[-2] * w.shape[-1],))


def _out_einsum_to_kernel(w: np.ndarray) -> np.ndarray:
  """[..., H, hd, D] attn_vec_einsum -> [..., H * hd, D] Dense kernel."""
  return w.reshape(w.shape[:-3] + (w.shape[-3] * w.shape[-2], w.shape[-1]))


def big_vision_gemma_rules(config: LLMConfig, prefix: str = "llm/") -> List[Rule]:
  """Rules from big_vision's Gemma npz layout (layers stacked on axis 0) to LLM params."""
  if config.family != "gemma":
    raise CheckpointError(f"big_vision's npz layout holds Gemma weights, but llm.family is "
                          f"{config.family!r}; use a Gemma config (e.g. llm_config('gemma_2b')).")
  if config.attention_bias or not config.effective_tie_embeddings:
    raise CheckpointError("big_vision Gemma checkpoints have no attention biases and tie the "
                          "output layer to the embedding; set llm.attention_bias=False and "
                          "llm.tie_embeddings=True.")
  layers = f"{prefix}layers/"
  # name -> (source, transform of the stacked [L, ...] array).
  stacked_sources = {
      "pre_attention_norm/scale": (f"{layers}pre_attention_norm/scale", identity),
      "pre_ffw_norm/scale": (f"{layers}pre_ffw_norm/scale", identity),
      "attn/o_proj/kernel": (f"{layers}attn/attn_vec_einsum/w", _out_einsum_to_kernel),
      "mlp/gate_proj/kernel": (f"{layers}mlp/gating_einsum", lambda w: w[:, 0]),
      "mlp/up_proj/kernel": (f"{layers}mlp/gating_einsum", lambda w: w[:, 1]),
      "mlp/down_proj/kernel": (f"{layers}mlp/linear", identity),
  }
  if config.effective_num_kv_heads == config.num_heads:
    # big_vision fuses q, k and v into one einsum when there is no GQA.
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
      stacked_sources[f"attn/{proj}/kernel"] = (
          f"{layers}attn/qkv_einsum/w", lambda w, j=index: _heads_first_to_kernel(w[:, j]))
  else:
    stacked_sources["attn/q_proj/kernel"] = (f"{layers}attn/q_einsum/w", _heads_first_to_kernel)
    for index, proj in enumerate(("k_proj", "v_proj")):
      stacked_sources[f"attn/{proj}/kernel"] = (
          f"{layers}attn/kv_einsum/w", lambda w, j=index: _heads_first_to_kernel(w[:, j]))
  rules = [Rule.copy("embedder/input_embedding", f"{prefix}embedder/input_embedding"),
           Rule.copy("final_norm/scale", f"{prefix}final_norm/scale")]
  for target, (source, transform) in stacked_sources.items():
    if config.scan:
      rules.append(Rule.copy(f"layers/{target}", source, transform))
    else:
      rules.extend(
          Rule.copy(f"layers_{i}/{target}", source,
                    lambda w, i=i, t=transform: t(w[i:i + 1])[0])
          for i in range(config.depth))
  return rules


def _outside(*kept: str) -> str:
  """A regex (for `ignore`) matching every name that starts with none of `kept`."""
  return "(?!" + "|".join(re.escape(k) for k in kept) + ").*"


# transformers' class defaults for the fields a config.json may omit.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                      max_position_embeddings=2048, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                      mlp_bias=False)
GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                      num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                      head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
                      attention_bias=False)
HF_DEFAULTS = {"llama": LLAMA_DEFAULTS, "gemma": GEMMA_DEFAULTS}


def _rope_parameters(check: hf_config.ConfigCheck) -> Dict[str, Any]:
  """RoPE settings in either spelling: transformers 5 `rope_parameters`, 4.x `rope_scaling`
  + `rope_theta` (and `partial_rotary_factor` at the top level)."""
  rope = dict(check.hf.get("rope_scaling") or {})
  rope.update(check.hf.get("rope_parameters") or {})
  for key in ("rope_theta", "partial_rotary_factor"):
    if key not in rope and check.hf.get(key) is not None:
      rope[key] = check.hf[key]
  return rope


def _activation(check: hf_config.ConfigCheck, family: str) -> Tuple[str, str]:
  """(field name, activation) as transformers resolves it for the family."""
  if family == "gemma" and check.hf.get("hidden_activation") is not None:
    return "hidden_activation", check.hf["hidden_activation"]  # transformers 4.x
  return "hidden_act", check.get("hidden_act")


def _model_type_problems(hf: Mapping[str, Any], where: str) -> List[str]:
  check = hf_config.ConfigCheck(hf, where)
  check.refuse("model_type", hf.get("model_type"), "the Llama family (model_type 'llama') "
               "and Gemma 1 ('gemma'); Gemma 2/3 soft-capping, sliding windows and post-norms "
               "are not", "Use a Llama or Gemma-1 checkpoint.")
  return check.problems


def llm_config_problems(hf: Mapping[str, Any], config: LLMConfig, where: str, *,
                        with_defaults: bool = True, causal: bool = True) -> List[str]:
  """Every setting of a HF Llama / Gemma config (section) that our `config` does not compute.

  Args:
    hf: the LLM's config.json section (`model_type` llama or gemma).
    config: the LLM config the weights are loaded into.
    where: names the section in messages.
    with_defaults: fields missing from `hf` take transformers' defaults (False: only the
      fields present are checked, for partial sub-configs such as OpenVLA's).
    causal: the checkpoint is loaded as a causal LM (a Gemma with
      `use_bidirectional_attention` is then refused; PaliGemma's own is expected).
  """
  model_type = hf.get("model_type")
  if model_type not in HF_DEFAULTS:
    return _model_type_problems(hf, where)
  check = hf_config.ConfigCheck(hf, where, HF_DEFAULTS[model_type] if with_defaults else None)
  if model_type != config.family:
    check.differs("model_type", model_type, "llm.family", config.family)
    return check.problems
  field, act = _activation(check, model_type)
  if model_type == "llama" and act is not None and act not in ("silu", "swish"):
    check.refuse(field, act, "Llama's SiLU-gated MLP (hidden_act 'silu')",
                 "Use a checkpoint with hidden_act='silu'.")
  if model_type == "gemma" and act is not None:
    legacy = field == "hidden_act" and act == "gelu"  # transformers maps it to tanh-GELU
    if act not in hf_config.TANH_GELU and not legacy:
      check.refuse(field, act, "Gemma's tanh-approximated GELU gate ('gelu_pytorch_tanh')",
                   "Use a checkpoint with hidden_act='gelu_pytorch_tanh'.")
  rope = _rope_parameters(check)
  rope_type = rope.get("rope_type", rope.get("type"))
  if rope_type not in (None, "default"):
    check.refuse("rope_parameters.rope_type" if "rope_parameters" in hf else "rope_scaling",
                 rope_type, "RoPE without scaling (rope_type 'default')",
                 "Use a checkpoint without RoPE scaling (linear / dynamic / llama3 / yarn ... "
                 "change every position's rotation).")
  factor = rope.get("partial_rotary_factor", 1.0)
  if factor is not None and float(factor) != 1.0:
    check.refuse("partial_rotary_factor", factor, "rotation of the whole head (1.0)",
                 "Use a checkpoint with partial_rotary_factor=1.0.")
  theta = rope.get("rope_theta", check.get("rope_theta"))
  if theta is not None and not np.isclose(float(theta), config.rope_theta):
    check.differs("rope_theta", theta, "llm.rope_theta", config.rope_theta)
  check.equal("rms_norm_eps", "llm.norm_eps", config.norm_eps, rtol=1e-3)
  check.equal("tie_word_embeddings", "llm.tie_embeddings", config.effective_tie_embeddings,
              convert=bool)
  check.equal("attention_bias", "llm.attention_bias", config.attention_bias, convert=bool)
  if check.get("mlp_bias"):
    check.refuse("mlp_bias", check.get("mlp_bias"), "bias-free MLP projections",
                 "Use a checkpoint with mlp_bias=False.")
  if causal and check.get("use_bidirectional_attention"):
    check.refuse("use_bidirectional_attention", True, "a causal LM here (bidirectional "
                 "attention only over a PaliGemma prefix)",
                 "Load it as a PaliGemma student, or use a causal checkpoint.")
  for key, ours_name, ours in (("hidden_size", "llm.width", config.width),
                               ("num_hidden_layers", "llm.depth", config.depth),
                               ("num_attention_heads", "llm.num_heads", config.num_heads),
                               ("intermediate_size", "llm.mlp_dim", config.mlp_dim),
                               ("vocab_size", "llm.vocab_size", config.vocab_size)):
    check.equal(key, ours_name, ours)
  heads = check.get("num_attention_heads")
  check.equal("num_key_value_heads", "llm.num_kv_heads", config.effective_num_kv_heads,
              default=heads if with_defaults else None)
  width = check.get("hidden_size")
  check.equal("head_dim", "llm.head_dim", config.effective_head_dim,
              default=width // heads if with_defaults and width and heads else None)
  return check.problems


# Composite checkpoints whose text_config may omit its model_type.
_WRAPPED_LLM = {"paligemma": "gemma", "openvla": "llama"}


def _llm_section(hf: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
  """The LLM's config: the file itself, or a composite's `text_config`."""
  section = hf_config.section(hf, "text_config", tuple(HF_DEFAULTS) + ("gemma2", "gemma3_text"))
  if section is not None and section is not hf and "model_type" not in section:
    section = {"model_type": _WRAPPED_LLM.get(hf.get("model_type")), **section}
  return section


def config_from_hf(path: str, **overrides: Any) -> LLMConfig:
  """The `LLMConfig` of a HF Llama / Gemma checkpoint (or a PaliGemma's / OpenVLA's LLM).

  Args:
    path: the checkpoint directory (or a file beside its config.json).
    overrides: our settings that HF does not fix, e.g. scan=True, dtype="bfloat16".
  Raises:
    CheckpointError: no config.json, or it sets something we do not implement.
  """
  hf, where = hf_config.read_config(path)
  section = _llm_section(hf or {})
  if section is None:
    raise CheckpointError(f"config_from_hf needs a Llama / Gemma config.json; {where} "
                          f"{'does not exist' if hf is None else 'holds none'}.")
  if section.get("model_type") not in HF_DEFAULTS:
    hf_config.raise_problems(_model_type_problems(section, where), path, where)
  check = hf_config.ConfigCheck(section, where, HF_DEFAULTS[section["model_type"]])
  width, heads = check.get("hidden_size"), check.get("num_attention_heads")
  head_dim = check.get("head_dim") or width // heads
  rope = _rope_parameters(check)
  fields = dict(
      family=section["model_type"], vocab_size=check.get("vocab_size"), width=width,
      depth=check.get("num_hidden_layers"), num_heads=heads,
      num_kv_heads=check.get("num_key_value_heads", heads),
      head_dim=None if head_dim * heads == width and section["model_type"] == "llama"
      else head_dim,
      mlp_dim=check.get("intermediate_size"),
      rope_theta=float(rope.get("rope_theta", check.get("rope_theta"))),
      norm_eps=float(check.get("rms_norm_eps")),
      tie_embeddings=bool(check.get("tie_word_embeddings")),
      max_position_embeddings=check.get("max_position_embeddings"),
      attention_bias=bool(check.get("attention_bias")))
  config = LLMConfig(**{**fields, **overrides})
  causal = "text_config" not in hf  # a composite's LLM (PaliGemma) brings its own mask
  hf_config.raise_problems(llm_config_problems(section, config, where, causal=causal),
                           path, where)
  return config


def _hf_config_problems(path: str, config: LLMConfig, prefix: str) -> List[str]:
  """The problems of the config.json beside `path` (none without one).

  A composite checkpoint (PaliGemma, OpenVLA) wraps the LLM's config in `text_config`;
  OpenVLA's is partial (its LLM settings come from the Llama it was trained from), so
  only the fields it states are checked.
  """
  hf, where = hf_config.read_config(path)
  if hf is None:
    hf_config.warn_unchecked(path, "LLM")
    return []
  section = _llm_section(hf)
  if section is None:
    return [f"{where}: model_type={hf.get('model_type')!r} holds no LLM config (model_type "
            "'llama' / 'gemma', or a text_config); is this the right checkpoint?"]
  wrapped = "text_config" in hf and section is not hf
  return llm_config_problems(section, config,
                             "config.json text_config" if wrapped else "config.json",
                             with_defaults=hf.get("model_type") != "openvla",
                             causal=not wrapped and prefix == HF_LAYOUTS["causal_lm"][0])


def load_hf_llm(path: str, config: LLMConfig, *, prefix: str = "model.",
                lm_head_key: str = "lm_head.weight", shardings: Any = None) -> Any:
  """Loads HF Llama/Gemma weights (safetensors file, index json or directory) into LLM params.

  Args:
    path: checkpoint location (`save_pretrained` directory, file or index json).
    config: the LLM config the params are for (scan decides the layout);
      `config_from_hf(path)` builds it from the checkpoint's config.json.
    prefix: where the decoder's `embed_tokens`/`layers`/`norm` live (see module doc).
    lm_head_key: the output projection's name (untied configs only).
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    The params tree of `LLM(config)` (float32).
  Raises:
    CheckpointError: names or shapes differ, or the config.json beside the weights sets
      something `config` does not compute (`llm_config_problems`), each named with the
      fix. Without a config.json only names and shapes are checked (logged).
  """
  path = os.fspath(path)
  source = open_safetensors(path)
  rules = hf_llm_rules(config, prefix, lm_head_key)
  ignore = [_outside(prefix, lm_head_key), r".*rotary_emb\.inv_freq"]
  if config.effective_tie_embeddings:
    ignore.append(re.escape(lm_head_key))  # some tied checkpoints still store the copy
  return load_params(source, rules, expected_llm_params(config), ignore=ignore,
                     shardings=shardings, source_name=f"HF checkpoint {path}",
                     config_problems=_hf_config_problems(path, config, prefix),
                     config_file=hf_config.config_path(path))


def load_big_vision_gemma(path: str, config: LLMConfig, *, prefix: str = "llm/",
                          shardings: Any = None) -> Any:
  """Loads Gemma weights from a big_vision / PaliGemma `.npz` into LLM params.

  Args:
    path: the `.npz` (optionally `file.npz:subtree`, then use prefix="").
    config: a Gemma LLM config.
    prefix: where the Gemma tree sits in the file (PaliGemma: "llm/").
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  """
  source = load_npz(path)
  ignore = [_outside(prefix)] if prefix else []
  return load_params(source, big_vision_gemma_rules(config, prefix), expected_llm_params(config),
                     ignore=ignore, shardings=shardings, source_name=f"big_vision npz {path}")
