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
whole checkpoint at once. The HF loaders first check the checkpoint's `config.json`
(`openvla_config_problems`, `paligemma_config_problems`) and refuse settings the student
does not compute; `paligemma_config_from_hf` builds the matching config. Position
embeddings for another resolution are resampled as the checkpoint's framework does:
timm's antialiased bicubic (OpenVLA's towers), transformers' bicubic (HF PaliGemma),
big_vision's corner-aligned bilinear (`.npz`).
"""

import re
from typing import Any, List, Mapping, Optional, Tuple

import jax
import numpy as np

from vla_jax.errors import CheckpointError
from vla_jax.models.vla import VLA, VLAConfig, dummy_inputs
from vla_jax.weights import dinov2 as dinov2_weights
from vla_jax.weights import hf_config
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


def openvla_config_problems(hf: Mapping[str, Any], config: VLAConfig, where: str
                            ) -> List[str]:
  """Every setting of an OpenVLA (Prismatic) config.json that `VLA(config)` does not compute.

  Its `text_config` is partial (Prismatic takes the LLM's settings from the Llama it was
  trained from, `hf_llm_id`), so only the fields it states are checked. `image_sizes`
  other than ours are not a problem: the towers' position embeddings are resampled.
  """
  check = hf_config.ConfigCheck(hf, where)
  if hf.get("model_type", "openvla") != "openvla":
    check.refuse("model_type", hf["model_type"], "OpenVLA ('openvla')",
                 "Use load_hf_paligemma for PaliGemma, or an OpenVLA checkpoint.")
    return check.problems
  fused = config.dino is not None
  check.equal("use_fused_vision_backbone", "model.dino (None = SigLIP only)", fused,
              convert=bool)
  overrides = [a for a in hf.get("timm_override_act_layers") or [] if a is not None]
  if overrides:
    check.refuse("timm_override_act_layers", hf["timm_override_act_layers"],
                 "the towers' own activations (all null)", "Use a checkpoint whose towers "
                 "keep timm's activations (CLIP's quick_gelu is not implemented).")
  ids = list(hf.get("timm_model_ids") or [])
  if ids:
    wanted = ["dinov2", "siglip"] if fused else ["siglip"]
    if len(ids) != len(wanted) or any(w not in i for w, i in zip(wanted, ids)):
      check.refuse("timm_model_ids", ids, f"towers {wanted} (DINOv2 + SigLIP fused, or "
                   "SigLIP alone)", "Use an OpenVLA checkpoint with those towers, or set "
                   "model.dino to match.")
  arch = hf.get("arch_specifier")
  if arch is not None:
    projector = "fused-gelu-mlp" if fused else "gelu-mlp"
    if not str(arch).endswith(projector) or (not fused and "fused" in str(arch)):
      check.refuse("arch_specifier", arch, f"Prismatic's '{projector}' projector for this "
                   "config", "Use a checkpoint with that projector (linear projectors are "
                   "not implemented).")
  text = hf.get("text_config")
  if isinstance(text, Mapping):
    check.problems += llm_weights.llm_config_problems(
        {"model_type": "llama", **text}, config.llm, f"{where} text_config",
        with_defaults=False, causal=False)
  return check.problems


def _config_problems(path: str, config: VLAConfig, problems_fn, what: str
                     ) -> Tuple[List[str], str]:
  hf, where = hf_config.read_config(path)
  if hf is None:
    hf_config.warn_unchecked(path, what)
    return [], where
  return problems_fn(hf, config, "config.json"), where


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
  problems, where = _config_problems(path, config, openvla_config_problems, "OpenVLA")
  source = open_safetensors(path)
  rules, ignore = openvla_rules(config, source.keys())
  return load_params(source, rules, abstract_params(config), ignore=ignore, shardings=shardings,
                     source_name=f"OpenVLA checkpoint {path}", config_problems=problems,
                     config_file=where)


def _first_prefix(names, candidates, probe: str) -> str:
  """The first candidate prefix under which `probe` exists, or None."""
  names = set(names)
  return next((p for p in candidates if p + probe in names), None)


def paligemma_rules(config: VLAConfig, names, posemb_resample: str = "bicubic"
                    ) -> Tuple[List[Rule], List[str]]:
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
  rules = nest("siglip/", siglip_weights.hf_siglip_rules(config.siglip, vision, posemb_resample))
  rules += _dense_rules("projector/linear", projector + "linear")
  rules += nest("llm/", llm_weights.hf_llm_rules(config.llm, lm))
  ignore = siglip_weights.hf_siglip_unused(config.siglip, vision)
  # Gemma ties the output layer to the embedding; some exports still store a copy.
  ignore += [r"(language_model\.)?lm_head\.weight", r".*rotary_emb\.inv_freq"]
  return rules, ignore


def paligemma_config_problems(hf: Mapping[str, Any], config: VLAConfig, where: str
                              ) -> List[str]:
  """Every setting of a HF PaliGemma config.json that `VLA(config)` does not compute: its
  `text_config` against `config.llm`, its `vision_config` against `config.siglip`."""
  if hf.get("model_type") != "paligemma":
    check = hf_config.ConfigCheck(hf, where)
    check.refuse("model_type", hf.get("model_type"), "PaliGemma 1 ('paligemma')",
                 "Use load_hf_openvla for OpenVLA, or a PaliGemma checkpoint.")
    return check.problems
  text = {"model_type": "gemma", **(hf.get("text_config") or {})}
  vision = {"model_type": "siglip_vision_model", **(hf.get("vision_config") or {})}
  return (llm_weights.llm_config_problems(text, config.llm, f"{where} text_config",
                                          causal=False) +
          siglip_weights.siglip_config_problems(vision, config.siglip,
                                                f"{where} vision_config"))


def paligemma_config_from_hf(path: str, image_size: Optional[int] = None,
                             scan: bool = False) -> VLAConfig:
  """The `VLAConfig` of a HF PaliGemma checkpoint (SigLIP without head, final norm kept).

  Args:
    path: the checkpoint directory (or a file beside its config.json).
    image_size: the resolution to run at (default: the checkpoint's; another one
      resamples the position embedding at load, as transformers does).
    scan: scan the LLM's and the tower's layers.
  """
  llm = llm_weights.config_from_hf(path, scan=scan)
  siglip = siglip_weights.config_from_hf(path, image_size, pool_type="none", scan=scan)
  return VLAConfig("paligemma", llm, siglip, None, siglip.image_size)


def load_hf_paligemma(path: str, config: VLAConfig, *, posemb_resample: Optional[str] = None,
                      shardings: Any = None) -> Any:
  """Loads a HF `PaliGemmaForConditionalGeneration` checkpoint into `VLA(config)` params.

  The config.json beside it is checked first (`paligemma_config_problems`); a SigLIP
  position embedding for another resolution is resampled as transformers does
  ("bicubic") unless `posemb_resample` says otherwise.
  """
  if config.arch != "paligemma":
    raise CheckpointError("load_hf_paligemma needs an arch='paligemma' config, got "
                          f"{config.arch!r}.")
  problems, where = _config_problems(path, config, paligemma_config_problems, "PaliGemma")
  source = open_safetensors(path)
  rules, ignore = paligemma_rules(config, source.keys(), posemb_resample or "bicubic")
  return load_params(source, rules, abstract_params(config), ignore=ignore, shardings=shardings,
                     source_name=f"PaliGemma checkpoint {path}", config_problems=problems,
                     config_file=where)


def load_big_vision_paligemma(path: str, config: VLAConfig, *,
                              posemb_resample: Optional[str] = None,
                              shardings: Any = None) -> Any:
  """Loads big_vision's PaliGemma `.npz` (`[params/]img/...`, `[params/]llm/...`); a
  position embedding for another resolution is resampled as big_vision does
  ("bilinear_align_corners") unless `posemb_resample` says otherwise."""
  if config.arch != "paligemma":
    raise CheckpointError("load_big_vision_paligemma needs an arch='paligemma' config.")
  source: Mapping[str, np.ndarray] = load_npz(path)
  if any(k.startswith("params/") for k in source):
    source = {k[len("params/"):]: v for k, v in source.items() if k.startswith("params/")}
  scanned = any(k.startswith("img/Transformer/encoderblock/") for k in source)
  tower = siglip_weights.big_vision_rules(
      config.siglip, checkpoint_scanned=scanned, prefix="img/",
      posemb_resample=posemb_resample or "bilinear_align_corners")
  rules = nest("siglip/", tower)
  rules += [Rule.copy("projector/linear/kernel", "img/head/kernel"),
            Rule.copy("projector/linear/bias", "img/head/bias")]
  rules += nest("llm/", llm_weights.big_vision_gemma_rules(config.llm, "llm/"))
  return load_params(source, rules, abstract_params(config), shardings=shardings,
                     source_name=f"big_vision PaliGemma checkpoint {path}")


def load_student(path: str, config: VLAConfig, fmt: str = "hf", *, shardings: Any = None) -> Any:
  """The loader the student's layout registers for `fmt` ("hf": both; "big_vision":
  PaliGemma); CheckpointError naming the formats the layout has otherwise."""
  return config.layout.loader(fmt)(path, config, shardings=shardings)

