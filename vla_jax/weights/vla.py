"""Loaders for whole VLA students: OpenVLA and PaliGemma checkpoints as published.

* `load_hf_openvla`: the `openvla/openvla-7b` safetensors layout
  (`vision_backbone.featurizer.*` = timm DINOv2, `vision_backbone.fused_featurizer.*` =
  timm SigLIP, `projector.fc1..fc3`, `language_model.model.*`,
  `language_model.lm_head.weight`). The towers keep one block fewer than the checkpoint
  (Prismatic reads the second-to-last block), so the last block, final norms and the
  SigLIP attention pool are deliberately left unread.
* `load_hf_paligemma`: `PaliGemmaForConditionalGeneration` safetensors, both the hub's
  layout (`vision_tower.vision_model.*`, `multi_modal_projector.linear`,
  `language_model.model.*`) and the one transformers >= 5 saves (`model.vision_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`).
* `load_big_vision_paligemma`: big_vision's PaliGemma `.npz` (`img/...` with `img/head`
  as the projection, `llm/...`).

Each composes the per-family rules (`siglip.py`, `dinov2.py`, `llm.py`) under the
student's parameter names (`siglip/`, `dino/`, `projector/`, `llm/`) and validates the
whole checkpoint at once.
"""

import re
from typing import Any, List, Mapping, Tuple

import jax
import numpy as np

from vla_jax.errors import CheckpointError
from vla_jax.models.vla import VLA, VLAConfig, dummy_inputs
from vla_jax.weights import dinov2 as dinov2_weights
from vla_jax.weights import llm as llm_weights
from vla_jax.weights import siglip as siglip_weights
from vla_jax.weights.mapping import Rule, linear, load_params, nest
from vla_jax.weights.npz import load_npz
from vla_jax.weights.safetensors import open_safetensors


def abstract_params(config: VLAConfig) -> Any:
  """Shapes and dtypes of `VLA(config)`'s params, without allocating them."""
  images, tokens = dummy_inputs(config, 1, 2)
  return jax.eval_shape(lambda: VLA(config).init(jax.random.key(0), images, tokens))["params"]


def _checkpoint_depth(names, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  found = {int(m.group(1)) for m in map(pattern.match, names) if m}
  if not found:
    raise CheckpointError(f"No tensors named {prefix}blocks.N.* in the checkpoint: it is not an "
                          "OpenVLA (Prismatic) checkpoint, or its vision backbone is elsewhere.")
  return max(found) + 1


def _dense_rules(target: str, source: str) -> List[Rule]:
  return [Rule.copy(f"{target}/kernel", f"{source}.weight", linear),
          Rule.copy(f"{target}/bias", f"{source}.bias")]


def openvla_rules(config: VLAConfig, names) -> Tuple[List[Rule], List[str]]:
  """(rules, deliberately-unused regexes) for an `openvla/openvla-7b`-layout checkpoint."""
  names = list(names)
  fused = config.dino is not None
  siglip_prefix = "vision_backbone.fused_featurizer." if fused else "vision_backbone.featurizer."
  rules = nest("siglip/", siglip_weights.timm_siglip_rules(config.siglip, siglip_prefix))
  ignore = siglip_weights.timm_siglip_unused(
      config.siglip, _checkpoint_depth(names, siglip_prefix), siglip_prefix)
  if fused:
    dino_prefix = "vision_backbone.featurizer."
    # OpenVLA's HF export renames timm's LayerScale `gamma` to `scale_factor`.
    scale_key = ("scale_factor" if any(n.endswith(".ls1.scale_factor") for n in names)
                 else "gamma")
    rules += nest("dino/", dinov2_weights.timm_dinov2_rules(
        config.dino, dino_prefix, layer_scale_key=scale_key))
    ignore += dinov2_weights.timm_dinov2_unused(
        config.dino, _checkpoint_depth(names, dino_prefix), dino_prefix)
  for layer in ("fc1", "fc2", "fc3") if fused else ("fc1", "fc2"):
    rules += _dense_rules(f"projector/{layer}", f"projector.{layer}")
  rules += nest("llm/", llm_weights.hf_llm_rules(
      config.llm, "language_model.model.", "language_model.lm_head.weight"))
  ignore.append(r".*rotary_emb\.inv_freq")
  return rules, ignore


def load_hf_openvla(path: str, config: VLAConfig, *, shardings: Any = None) -> Any:
  """Loads an OpenVLA checkpoint (safetensors file, index json or directory).

  Args:
    path: e.g. a local copy of `openvla/openvla-7b`.
    config: an `arch="openvla"` VLAConfig whose towers keep checkpoint depth - 1 blocks.
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Params of `VLA(config)`.
  """
  if config.arch != "openvla":
    raise CheckpointError(f"load_hf_openvla needs an arch='openvla' config, got {config.arch!r}.")
  source = open_safetensors(path)
  rules, ignore = openvla_rules(config, source.keys())
  return load_params(source, rules, abstract_params(config), ignore=ignore, shardings=shardings,
                     source_name=f"OpenVLA checkpoint {path}")


def _first_prefix(names, candidates, probe: str) -> str:
  """The first candidate prefix under which `probe` exists, or None."""
  names = set(names)
  return next((p for p in candidates if p + probe in names), None)


def paligemma_rules(config: VLAConfig, names) -> Tuple[List[Rule], List[str]]:
  """(rules, unused regexes) for HF PaliGemma in any of its key layouts.

  The hub's (`vision_tower.vision_model.*`, `language_model.model.*`), what
  transformers >= 5 `save_pretrained` writes (`vision_tower.*`), and its in-memory
  `state_dict` (`model.vision_tower.*`, `model.language_model.*`).
  """
  names = list(names)
  vision = _first_prefix(names, ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                 "model.vision_tower.", "vision_tower."),
                         "embeddings.patch_embedding.weight")
  lm = _first_prefix(names, ("language_model.model.", "model.language_model.", "language_model."),
                     "embed_tokens.weight")
  projector = _first_prefix(names, ("multi_modal_projector.", "model.multi_modal_projector."),
                            "linear.weight")
  if vision is None or lm is None or projector is None:
    raise CheckpointError(
        "Not a PaliGemma checkpoint: expected a SigLIP tower (vision_tower.[vision_model.]"
        "embeddings.*), a multi_modal_projector.linear and a Gemma (language_model.[model.]"
        f"embed_tokens); found {len(names)} tensors starting with {sorted(names)[:4]}.")
  rules = nest("siglip/", siglip_weights.hf_siglip_rules(config.siglip, vision))
  rules += _dense_rules("projector/linear", projector + "linear")
  rules += nest("llm/", llm_weights.hf_llm_rules(config.llm, lm))
  ignore = siglip_weights.hf_siglip_unused(config.siglip, vision)
  # Gemma ties the output layer to the embedding; some exports still store a copy.
  ignore += [r"(language_model\.)?lm_head\.weight", r".*rotary_emb\.inv_freq"]
  return rules, ignore


def load_hf_paligemma(path: str, config: VLAConfig, *, shardings: Any = None) -> Any:
  """Loads a HF `PaliGemmaForConditionalGeneration` checkpoint into `VLA(config)` params."""
  if config.arch != "paligemma":
    raise CheckpointError("load_hf_paligemma needs an arch='paligemma' config, got "
                          f"{config.arch!r}.")
  source = open_safetensors(path)
  rules, ignore = paligemma_rules(config, source.keys())
  return load_params(source, rules, abstract_params(config), ignore=ignore, shardings=shardings,
                     source_name=f"PaliGemma checkpoint {path}")


def load_big_vision_paligemma(path: str, config: VLAConfig, *, shardings: Any = None) -> Any:
  """Loads big_vision's PaliGemma `.npz` (`[params/]img/...`, `[params/]llm/...`)."""
  if config.arch != "paligemma":
    raise CheckpointError("load_big_vision_paligemma needs an arch='paligemma' config.")
  source: Mapping[str, np.ndarray] = load_npz(path)
  if any(k.startswith("params/") for k in source):
    source = {k[len("params/"):]: v for k, v in source.items() if k.startswith("params/")}
  scanned = any(k.startswith("img/Transformer/encoderblock/") for k in source)
  tower = siglip_weights.big_vision_rules(config.siglip, checkpoint_scanned=scanned,
                                          prefix="img/")
  rules = nest("siglip/", tower)
  rules += [Rule.copy("projector/linear/kernel", "img/head/kernel"),
            Rule.copy("projector/linear/bias", "img/head/bias")]
  rules += nest("llm/", llm_weights.big_vision_gemma_rules(config.llm, "llm/"))
  return load_params(source, rules, abstract_params(config), shardings=shardings,
                     source_name=f"big_vision PaliGemma checkpoint {path}")


def load_student(path: str, config: VLAConfig, fmt: str = "hf", *, shardings: Any = None) -> Any:
  """Dispatches on the student's layout and the checkpoint format ("hf" | "big_vision")."""
  if fmt == "hf":
    loader = load_hf_openvla if config.arch == "openvla" else load_hf_paligemma
  elif fmt == "big_vision" and config.arch == "paligemma":
    loader = load_big_vision_paligemma
  else:
    raise CheckpointError(f"No {fmt!r} loader for arch={config.arch!r}; use 'hf' (both) or "
                          "'big_vision' (PaliGemma), or 'orbax' for a converted checkpoint.")
  return loader(path, config, shardings=shardings)

