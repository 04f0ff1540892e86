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
"""

import json
import os
import re
from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import CheckpointError
from vla_jax.models.llm import LLM, LLMConfig
from vla_jax.weights.mapping import Rule, check_rules, identity, linear, load_params, stacked
from vla_jax.weights.npz import flatten, load_npz
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


_HF_FAMILIES = {"llama": "llama", "gemma": "gemma"}


def _hf_config_problems(path: str, config: LLMConfig) -> List[str]:
  """Disagreements between a `config.json` beside the weights and `config` (if one exists).

  Weights alone cannot tell a Llama from a Gemma of equal shapes, nor reveal rope_theta
  or the norm epsilon; HF's config.json can.
  """
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    return []
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError):
    return []
  if hf.get("model_type") not in _HF_FAMILIES and isinstance(hf.get("text_config"), dict):
    hf = hf["text_config"]  # PaliGemma / OpenVLA wrap the LLM's config.
  problems = []
  family = _HF_FAMILIES.get(hf.get("model_type"))
  if family is None:
    return problems
  if family != config.family:
    problems.append(f"{config_path} says model_type={hf['model_type']!r} but llm.family is "
                    f"{config.family!r}")
  theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta"))
  if theta is not None and not np.isclose(float(theta), config.rope_theta):
    problems.append(f"{config_path} says rope_theta={theta} but llm.rope_theta is "
                    f"{config.rope_theta}")
  eps = hf.get("rms_norm_eps")
  if eps is not None and not np.isclose(float(eps), config.norm_eps, rtol=1e-3, atol=0):
    problems.append(f"{config_path} says rms_norm_eps={eps} but llm.norm_eps is "
                    f"{config.norm_eps}")
  tied = hf.get("tie_word_embeddings")
  if tied is not None and bool(tied) != config.effective_tie_embeddings:
    problems.append(f"{config_path} says tie_word_embeddings={tied} but the LLM config ties "
                    f"them: {config.effective_tie_embeddings} (set llm.tie_embeddings)")
  return problems


def load_hf_llm(path: str, config: LLMConfig, *, prefix: str = "model.",
                lm_head_key: str = "lm_head.weight", shardings: Any = None) -> Any:
  """Loads HF Llama/Gemma weights (safetensors file, index json or directory) into LLM params.

  Args:
    path: checkpoint location (`save_pretrained` directory, file or index json).
    config: the LLM config the params are for (scan decides the layout).
    prefix: where the decoder's `embed_tokens`/`layers`/`norm` live (see module doc).
    lm_head_key: the output projection's name (untied configs only).
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    The params tree of `LLM(config)` (float32).
  """
  path = os.fspath(path)
  source = open_safetensors(path)
  rules = hf_llm_rules(config, prefix, lm_head_key)
  ignore = [_outside(prefix, lm_head_key), r".*rotary_emb\.inv_freq"]
  if config.effective_tie_embeddings:
    ignore.append(re.escape(lm_head_key))  # some tied checkpoints still store the copy
  expected = expected_llm_params(config)
  problems = _hf_config_problems(path, config)
  name = f"HF checkpoint {path}"
  contradictions = "\n  - ".join([f"{name} contradicts the config:"] + problems)
  try:
    check_rules(source, rules, flatten(expected), ignore, name)
  except CheckpointError as e:
    if problems:
      raise CheckpointError(f"{contradictions}\n{e}") from None
    raise
  if problems:
    raise CheckpointError(f"{contradictions}\nFix the LLM config (family, rope_theta, "
                          "norm_eps, tie_embeddings) to match the checkpoint.")
  return load_params(source, rules, expected, ignore=ignore, shardings=shardings,
                     source_name=name)


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
