"""Loads SigLIP vision towers (big_vision `.npz`, HuggingFace, timm) into `models.vit.ViT`.

Three published layouts map onto the one big_vision-named parameter tree:
- big_vision `.npz` (optionally a subtree, `paligemma.npz:img`), scanned
  (`Transformer/encoderblock`, leading layer axis) or looped (`encoderblock_{i}`); either
  is converted to the layout `config.scan` asks for.
- HuggingFace `SiglipVisionModel` / `SiglipModel` safetensors (`embeddings.*`,
  `encoder.layers.{i}.*`, `post_layernorm`, `head.*`), with or without the
  `vision_model.` prefix; a full `SiglipModel`'s text tower is ignored.
- timm `vit_*_siglip_*` (`patch_embed`, `blocks.{i}` with a fused `attn.qkv`, `norm`,
  `attn_pool`). OpenVLA builds its tower with one block fewer than the checkpoint and
  reads that last block's output un-normalised; `timm_siglip_unused` names the tensors
  such a truncated config deliberately leaves behind.
A position embedding stored for another grid is resampled once, at load (logged), by the
checkpoint's own framework's method (`vla_jax.models.posemb_resample`): big_vision's
corner-aligned bilinear for `.npz`, transformers' bicubic for HF, timm's antialiased
bicubic for timm; `posemb_resample=` overrides it.
The HF loader reads `config.json` and refuses settings our ViT does not compute
(`siglip_config_problems`); `config_from_hf` builds the matching `ViTConfig`.
Every loader validates names and shapes through `mapping.load_params` before reading data.
"""

import re
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from vla_jax.errors import CheckpointError
from vla_jax.models import posemb_resample as resample_lib
from vla_jax.models.vit import ViTConfig, abstract_params, resample_posemb
from vla_jax.weights import hf_config, npz
from vla_jax.weights.mapping import Rule, conv2d, identity, linear, load_params, stacked
from vla_jax.weights.safetensors import open_safetensors

# (our name inside one block, checkpoint name, transform or None)
_Entry = Tuple[str, str, Optional[Callable[[np.ndarray], np.ndarray]]]



# ---------------------------------------------------------------------------
# Transforms shared by the torch layouts.
# ---------------------------------------------------------------------------
def _part(array: np.ndarray, index: int, parts: int, width: int) -> np.ndarray:
  """Slice `index` of a fused [parts * width, ...] tensor (qkv, kv, in_proj)."""
  if array.shape[0] != parts * width:
    raise ValueError(f"fused tensor has {array.shape[0]} rows, expected {parts} x {width}")
  return array[index * width:(index + 1) * width]


def _heads_kernel(config: ViTConfig, index: int = 0, parts: int = 1):
  """torch Linear weight [parts * D, D] (slice `index`) -> DenseGeneral kernel [D, H, hd]."""
  def transform(w):
    w = _part(w, index, parts, config.width)
    return linear(w).reshape(w.shape[1], config.num_heads, config.head_dim)
  return transform


def _heads_bias(config: ViTConfig, index: int = 0, parts: int = 1):
  """torch Linear bias [parts * D] (slice `index`) -> DenseGeneral bias [H, hd]."""
  def transform(b):
    return _part(b, index, parts, config.width).reshape(config.num_heads, config.head_dim)
  return transform


def _out_kernel(config: ViTConfig):
  """torch Linear weight [D, D] -> attention output kernel [H, hd, D]."""
  return lambda w: linear(w).reshape(config.num_heads, config.head_dim, w.shape[0])


def _posemb_transform(config: ViTConfig, method: str, add_batch_axis: bool = False):
  """Checkpoint position embedding -> [1, grid**2, D], resampled by `method` if its grid
  differs."""
  def transform(posemb):
    if add_batch_axis:
      posemb = posemb[None]
    if posemb.ndim != 3 or posemb.shape[1] == config.num_patches:
      return posemb  # right already, or malformed: `check_rules` reports the shape.
    side = int(round(np.sqrt(posemb.shape[1])))
    if side * side != posemb.shape[1]:
      return posemb  # not a square grid: reported as mis-shaped.
    return np.asarray(resample_posemb(posemb, config.grid_size, method))
  return transform


def _log_posemb(num_stored: int, config: ViTConfig, source: str, method: str) -> None:
  if config.posemb == "learn" and num_stored != config.num_patches:
    side = int(round(np.sqrt(num_stored)))
    logging.info("SigLIP: resampling pos_embedding of %s from a %dx%d to a %dx%d grid "
                 "(%s).", source, side, side, config.grid_size, config.grid_size, method)


def _block_rules(config: ViTConfig, block_entries: Callable[[int], Sequence[_Entry]]
                 ) -> List[Rule]:
  """Rules for every block, looped or stacked according to `config.scan`."""
  per_block = [block_entries(i) for i in range(config.depth)]
  rules = []
  for j, (name, _, transform) in enumerate(per_block[0]):
    transform = transform or identity
    if config.scan:
      rules.append(stacked(f"Transformer/encoderblock/{name}",
                           [entries[j][1] for entries in per_block], transform))
    else:
      rules += [Rule.copy(f"Transformer/encoderblock_{i}/{name}", entries[j][1], transform)
                for i, entries in enumerate(per_block)]
  return rules


def _rules(entries: Sequence[_Entry]) -> List[Rule]:
  return [Rule.copy(name, source, transform or identity) for name, source, transform in entries]


def _norm(ours: str, theirs: str) -> List[_Entry]:
  return [(f"{ours}/scale", f"{theirs}.weight", None), (f"{ours}/bias", f"{theirs}.bias", None)]


def _dense(ours: str, theirs: str) -> List[_Entry]:
  return [(f"{ours}/kernel", f"{theirs}.weight", linear), (f"{ours}/bias", f"{theirs}.bias", None)]


def _attention(config: ViTConfig, ours: str, q: Tuple[str, int, int], k: Tuple[str, int, int],
               v: Tuple[str, int, int], out: str) -> List[_Entry]:
  """q/k/v: (torch Linear name, slice index, number of fused parts)."""
  entries = []
  for field, (theirs, index, parts) in (("query", q), ("key", k), ("value", v)):
    weight, bias = (f"{theirs}_weight", f"{theirs}_bias") if theirs.endswith("in_proj") else (
        f"{theirs}.weight", f"{theirs}.bias")
    entries += [(f"{ours}/{field}/kernel", weight, _heads_kernel(config, index, parts)),
                (f"{ours}/{field}/bias", bias, _heads_bias(config, index, parts))]
  entries += [(f"{ours}/out/kernel", f"{out}.weight", _out_kernel(config)),
              (f"{ours}/out/bias", f"{out}.bias", None)]
  return entries


def _mlp(ours: str, fc1: str, fc2: str) -> List[_Entry]:
  return _dense(f"{ours}/Dense_0", fc1) + _dense(f"{ours}/Dense_1", fc2)


# ---------------------------------------------------------------------------
# big_vision .npz
# ---------------------------------------------------------------------------
def _take_layer(index: int, depth: int):
  """Scanned checkpoint leaf [depth, ...] -> layer `index`; rejects another depth."""
  def transform(array):
    if array.shape[0] != depth:
      raise ValueError(f"scanned checkpoint has {array.shape[0]} layers, config has {depth}")
    return array[index]
  return transform


def big_vision_rules(config: ViTConfig, *, checkpoint_scanned: bool, prefix: str = "",
                     posemb_resample: str = "bilinear_align_corners") -> List[Rule]:
  """Rules from a big_vision checkpoint (flat `/` names under `prefix`) to `ViT(config)`.

  Converts between scanned and looped layouts when the checkpoint's (`checkpoint_scanned`)
  differs from `config.scan`, and resamples `pos_embedding` to the config's grid
  (big_vision's method unless `posemb_resample` says otherwise).
  """
  rules = []
  for target in npz.flatten(abstract_params(config)):
    looped = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.*)", target)
    scanned = re.fullmatch(r"Transformer/encoderblock/(.*)", target)
    if looped and checkpoint_scanned:
      index, rest = int(looped.group(1)), looped.group(2)
      rules.append(Rule.copy(target, f"{prefix}Transformer/encoderblock/{rest}",
                             _take_layer(index, config.depth)))
    elif scanned and not checkpoint_scanned:
      rest = scanned.group(1)
      rules.append(stacked(target, [f"{prefix}Transformer/encoderblock_{i}/{rest}"
                                    for i in range(config.depth)]))
    elif target == "pos_embedding":
      rules.append(Rule.copy(target, prefix + target,
                             _posemb_transform(config, posemb_resample)))
    else:
      rules.append(Rule.copy(target, prefix + target))
  return rules


def load_big_vision(path: str, config: ViTConfig, *, posemb_resample: Optional[str] = None,
                    shardings: Any = None) -> Mapping[str, Any]:
  """Loads a big_vision `.npz` (or `file.npz:subtree`) into params for `ViT(config)`.

  Args:
    path: `.npz` file, optionally with `:subtree` (e.g. `pg.npz:img`).
    config: the model config; its `scan` picks the returned layout.
    posemb_resample: how to resample a position embedding stored for another grid
      (default: big_vision's, "bilinear_align_corners").
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s.
  """
  source = npz.load_npz(path)
  if "embedding/kernel" not in source:
    roots = sorted({k[:-len("/embedding/kernel")] for k in source
                    if k.endswith("/embedding/kernel")})
    if roots:
      raise CheckpointError(
          f"{path} holds no ViT at its top level; ViT params sit under {roots}. Load a "
          f"subtree with '{npz.split_subtree(path)[0]}:{roots[0]}'.")
  checkpoint_scanned = any(k.startswith("Transformer/encoderblock/") for k in source)
  method = resample_lib.check_method(posemb_resample or "bilinear_align_corners")
  if "pos_embedding" in source and np.ndim(source["pos_embedding"]) == 3:
    _log_posemb(source["pos_embedding"].shape[1], config, path, method)
  rules = big_vision_rules(config, checkpoint_scanned=checkpoint_scanned,
                           posemb_resample=method)
  return load_params(source, rules, abstract_params(config), shardings=shardings,
                     source_name=f"big_vision checkpoint {path}")


def save_big_vision(path: str, params: Mapping[str, Any]) -> None:
  """Saves ViT params as a big_vision `.npz` (flat `/` keys; bf16 kept as `|V2`)."""
  npz.save_npz(path, params)


# ---------------------------------------------------------------------------
# HuggingFace SiglipVisionModel / SiglipModel
# ---------------------------------------------------------------------------
def hf_siglip_rules(config: ViTConfig, prefix: str = "vision_model.",
                    posemb_resample: str = "bicubic") -> List[Rule]:
  """Rules from HF SigLIP vision keys (`{prefix}embeddings...`) to `ViT(config)` params.

  Covers the patch and position embeddings (resampled to the config's grid as
  transformers' `interpolate_pos_encoding` does, unless `posemb_resample` says
  otherwise), the blocks (looped or stacked per `config.scan`), `post_layernorm` (if
  `config.final_norm`) and the MAP `head` (if `config.pool_type == "map"`).
  """
  p = prefix
  entries = [("embedding/kernel", f"{p}embeddings.patch_embedding.weight", conv2d),
             ("embedding/bias", f"{p}embeddings.patch_embedding.bias", None)]
  if config.posemb == "learn":
    entries.append(("pos_embedding", f"{p}embeddings.position_embedding.weight",
                    _posemb_transform(config, posemb_resample, add_batch_axis=True)))
  if config.final_norm:
    entries += _norm("Transformer/encoder_norm", f"{p}post_layernorm")
  if config.pool_type == "map":
    head = f"{p}head."
    entries.append(("MAPHead_0/probe", f"{head}probe", None))
    in_proj = f"{head}attention.in_proj"
    entries += _attention(config, "MAPHead_0/MultiHeadDotProductAttention_0", (in_proj, 0, 3),
                          (in_proj, 1, 3), (in_proj, 2, 3), f"{head}attention.out_proj")
    entries += _norm("MAPHead_0/LayerNorm_0", f"{head}layernorm")
    entries += _mlp("MAPHead_0/MlpBlock_0", f"{head}mlp.fc1", f"{head}mlp.fc2")

  def block(i: int) -> List[_Entry]:
    b = f"{p}encoder.layers.{i}."
    return (_norm("LayerNorm_0", f"{b}layer_norm1") +
            _attention(config, "MultiHeadDotProductAttention_0", (f"{b}self_attn.q_proj", 0, 1),
                       (f"{b}self_attn.k_proj", 0, 1), (f"{b}self_attn.v_proj", 0, 1),
                       f"{b}self_attn.out_proj") +
            _norm("LayerNorm_1", f"{b}layer_norm2") +
            _mlp("MlpBlock_0", f"{b}mlp.fc1", f"{b}mlp.fc2"))

  return _rules(entries) + _block_rules(config, block)


def hf_siglip_unused(config: ViTConfig, prefix: str = "vision_model.") -> List[str]:
  """Regexes of HF SigLIP vision tensors that `config` deliberately does not load."""
  unused = []
  if not config.final_norm:
    unused.append(re.escape(f"{prefix}post_layernorm.") + r"(weight|bias)")
  if config.pool_type != "map":
    unused.append(re.escape(f"{prefix}head.") + ".*")
  return unused


# transformers' SiglipVisionConfig defaults, for fields a config.json omits.
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224,
                              patch_size=16, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, vision_use_head=True)
_VISION_TYPES = ("siglip_vision_model", "siglip2_vision_model", "clip_vision_model")


def vision_section(hf: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
  """The SigLIP vision config inside a config.json (itself, or a SiglipModel's or
  PaliGemma's `vision_config`)."""
  return hf_config.section(hf, "vision_config", _VISION_TYPES)


def siglip_config_problems(hf: Mapping[str, Any], config: ViTConfig, where: str) -> List[str]:
  """Every setting of a HF SigLIP vision config (section) that `ViT(config)` does not compute.

  The checkpoint's `image_size` is not one of them: a position embedding for another
  grid is resampled at load.
  """
  check = hf_config.ConfigCheck(hf, where, SIGLIP_VISION_DEFAULTS)
  model_type = hf.get("model_type", "siglip_vision_model")
  if model_type != "siglip_vision_model":
    fix = ("A SigLIP 2 NaFlex checkpoint loads as teacher.kind=siglip2 "
           "(vla_jax.models.teachers.siglip2.load_hf_siglip2)."
           if str(model_type).startswith("siglip2") else "Use a SigLIP checkpoint.")
    check.refuse("model_type", model_type, "SigLIP ('siglip_vision_model'; SigLIP 2's "
                 "NaFlex patching and CLIP's pre-norm are not)", fix)
    return check.problems
  act = check.get("hidden_act")
  if act in hf_config.TANH_GELU or act == "gelu":
    check.equal("hidden_act", "vit.gelu_approximate", config.gelu_approximate,
                convert=lambda a: a != "gelu")
  else:
    check.refuse("hidden_act", act, "GELU, exact ('gelu', vit.gelu_approximate=False) or "
                 "tanh-approximated ('gelu_pytorch_tanh', True)",
                 "Use a checkpoint with one of those activations.")
  check.equal("layer_norm_eps", "vit.layernorm_eps", config.layernorm_eps, rtol=1e-3)
  for key, ours_name, ours in (("hidden_size", "vit.width", config.width),
                               ("intermediate_size", "vit.mlp_dim", config.mlp_width),
                               ("num_hidden_layers", "vit.depth", config.depth),
                               ("num_attention_heads", "vit.num_heads", config.num_heads),
                               ("patch_size", "vit.patch_size", config.patch_size),
                               ("num_channels", "vit.channels", config.channels)):
    check.equal(key, ours_name, ours)
  if config.posemb != "learn":
    check.differs("position_embedding", "learned", "vit.posemb", config.posemb)
  if config.pool_type == "map" and not check.get("vision_use_head"):
    check.differs("vision_use_head", False, "vit.pool_type", config.pool_type,
                  "The checkpoint has no MAP head: set vit.pool_type='none' (or 'gap').")
  return check.problems


def _hf_vision_problems(path: str, config: ViTConfig) -> Tuple[List[str], str]:
  hf, where = hf_config.read_config(path)
  if hf is None:
    hf_config.warn_unchecked(path, "SigLIP")
    return [], where
  section = vision_section(hf)
  if section is None:
    return [f"{where}: model_type={hf.get('model_type')!r} holds no SigLIP vision config "
            "(model_type 'siglip_vision_model', or a vision_config); is this the right "
            "checkpoint?"], where
  name = "config.json" if section is hf else "config.json vision_config"
  return siglip_config_problems(section, config, name), where


def config_from_hf(path: str, image_size: Optional[int] = None, **overrides: Any) -> ViTConfig:
  """The `ViTConfig` of a HF SigLIP vision tower (a SiglipVisionModel, SiglipModel or
  PaliGemma checkpoint directory).

  Args:
    path: the checkpoint directory (or a file beside its config.json).
    image_size: the resolution to run at (default: the checkpoint's; another one
      resamples the position embedding at load).
    overrides: our settings HF does not fix (scan, remat, dtype, pool_type, ...).
  """
  hf, where = hf_config.read_config(path)
  section = vision_section(hf or {})
  if section is None:
    raise CheckpointError(f"config_from_hf needs a SigLIP config.json; {where} "
                          f"{'does not exist' if hf is None else 'holds none'}.")
  check = hf_config.ConfigCheck(section, where, SIGLIP_VISION_DEFAULTS)
  fields = dict(
      width=check.get("hidden_size"), depth=check.get("num_hidden_layers"),
      mlp_dim=check.get("intermediate_size"), num_heads=check.get("num_attention_heads"),
      patch_size=check.get("patch_size"), channels=check.get("num_channels"),
      image_size=image_size or check.get("image_size"), posemb="learn",
      pool_type="map" if check.get("vision_use_head") else "none",
      gelu_approximate=check.get("hidden_act") != "gelu",
      layernorm_eps=float(check.get("layer_norm_eps")))
  config = ViTConfig(**{**fields, **overrides})
  hf_config.raise_problems(siglip_config_problems(section, config, where), path, where)
  return config


def load_hf_siglip(path: str, config: ViTConfig, *, posemb_resample: Optional[str] = None,
                   shardings: Any = None) -> Mapping[str, Any]:
  """Loads a HF `SiglipVisionModel` or `SiglipModel` safetensors checkpoint.

  Args:
    path: a `save_pretrained` directory, a `.safetensors` file or an index json.
    config: the model config (HF SigLIP uses tanh-GELU: `gelu_approximate=True`;
      `config_from_hf(path)` builds it). The checkpoint's config.json is checked against
      it (`siglip_config_problems`).
    posemb_resample: how to resample a position embedding stored for another grid
      (default: transformers' `interpolate_pos_encoding`, "bicubic").
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s for `ViT(config)`.
  Raises:
    CheckpointError: names or shapes differ, or config.json sets what we do not compute.
  """
  problems, where = _hf_vision_problems(path, config)
  source = open_safetensors(path)
  names = list(source.keys())
  # transformers >= 5 saves SiglipVisionModel without the `vision_model.` prefix.
  prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
  ignore = hf_siglip_unused(config, prefix)
  if prefix and any(n.startswith("text_model.") for n in names):
    logging.info("SigLIP: %s is a full SiglipModel; ignoring its text tower.", path)
    ignore += [r"text_model\..*", "logit_scale", "logit_bias"]
  method = resample_lib.check_method(posemb_resample or "bicubic")
  posemb = f"{prefix}embeddings.position_embedding.weight"
  if posemb in source and len(source.shape(posemb)) == 2:
    _log_posemb(source.shape(posemb)[0], config, path, method)
  return load_params(source, hf_siglip_rules(config, prefix, method), abstract_params(config),
                     ignore=ignore, shardings=shardings,
                     source_name=f"HF SigLIP checkpoint {path}", config_problems=problems,
                     config_file=where)


# ---------------------------------------------------------------------------
# timm vit_*_siglip_*
# ---------------------------------------------------------------------------
def timm_siglip_rules(config: ViTConfig, prefix: str = "",
                      posemb_resample: str = "bicubic_antialias") -> List[Rule]:
  """Rules from timm SigLIP keys (`{prefix}blocks.{i}...`) to `ViT(config)` params.

  Only blocks < `config.depth` are read; `norm` feeds `encoder_norm` (if
  `config.final_norm`) and `attn_pool` the MAP head (if `config.pool_type == "map"`).
  timm uses exact GELU: build the config with `gelu_approximate=False`. A position
  embedding for another grid is resampled as timm's `resample_abs_pos_embed` does
  (antialiased bicubic) unless `posemb_resample` says otherwise.
  """
  p = prefix
  entries = [("embedding/kernel", f"{p}patch_embed.proj.weight", conv2d),
             ("embedding/bias", f"{p}patch_embed.proj.bias", None)]
  if config.posemb == "learn":
    entries.append(("pos_embedding", f"{p}pos_embed", _posemb_transform(config, posemb_resample)))
  if config.final_norm:
    entries += _norm("Transformer/encoder_norm", f"{p}norm")
  if config.pool_type == "map":
    pool = f"{p}attn_pool."
    entries.append(("MAPHead_0/probe", f"{pool}latent", None))
    entries += _attention(config, "MAPHead_0/MultiHeadDotProductAttention_0", (f"{pool}q", 0, 1),
                          (f"{pool}kv", 0, 2), (f"{pool}kv", 1, 2), f"{pool}proj")
    entries += _norm("MAPHead_0/LayerNorm_0", f"{pool}norm")
    entries += _mlp("MAPHead_0/MlpBlock_0", f"{pool}mlp.fc1", f"{pool}mlp.fc2")

  def block(i: int) -> List[_Entry]:
    b = f"{p}blocks.{i}."
    qkv = f"{b}attn.qkv"
    return (_norm("LayerNorm_0", f"{b}norm1") +
            _attention(config, "MultiHeadDotProductAttention_0", (qkv, 0, 3), (qkv, 1, 3),
                       (qkv, 2, 3), f"{b}attn.proj") +
            _norm("LayerNorm_1", f"{b}norm2") +
            _mlp("MlpBlock_0", f"{b}mlp.fc1", f"{b}mlp.fc2"))

  return _rules(entries) + _block_rules(config, block)


def timm_siglip_unused(config: ViTConfig, checkpoint_depth: int, prefix: str = "") -> List[str]:
  """Regexes of timm SigLIP tensors that `config` deliberately does not load.

  A config with fewer blocks than the checkpoint (OpenVLA: depth = checkpoint_depth - 1,
  reading the last kept block's output) leaves blocks >= config.depth, the final `norm`
  and `attn_pool` behind; a config without `encoder_norm` or a MAP head leaves `norm` /
  `attn_pool` behind at any depth.
  """
  p = re.escape(prefix)
  unused = []
  truncated = checkpoint_depth > config.depth
  if truncated:
    kept_out = "|".join(str(i) for i in range(config.depth, checkpoint_depth))
    unused.append(rf"{p}blocks\.({kept_out})\..*")
  if truncated or not config.final_norm:
    unused.append(rf"{p}norm\.(weight|bias)")
  if truncated or config.pool_type != "map":
    unused.append(rf"{p}attn_pool\..*")
  return unused


def load_timm_siglip(path: str, config: ViTConfig, *, prefix: str = "",
                     posemb_resample: Optional[str] = None,
                     shardings: Any = None) -> Mapping[str, Any]:
  """Loads a timm SigLIP `state_dict` saved as safetensors, possibly truncating blocks.

  Args:
    path: `.safetensors` file (or directory / index json).
    config: the model config; `depth` may be smaller than the checkpoint's.
    prefix: prefix of the tower's keys in the file (e.g. a VLA checkpoint's).
    posemb_resample: how to resample a position embedding stored for another grid
      (default: timm's, "bicubic_antialias").
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s for `ViT(config)`.
  """
  problems = hf_config.timm_config_problems(path, "siglip", {
      "embed_dim": ("vit.width", config.width), "num_heads": ("vit.num_heads", config.num_heads),
      "patch_size": ("vit.patch_size", config.patch_size),
      "depth": ("vit.depth", None), "global_pool": ("vit.pool_type", None),
      "mlp_ratio": ("vit.mlp_dim", config.mlp_width, lambda r: int(config.width * r)),
      "act_layer": ("vit.gelu_approximate", config.gelu_approximate,
                    lambda a: {"gelu": False, "gelu_tanh": True}.get(a, a)),
      "class_token": ("a class token (never, in our SigLIP)", False),
  })
  source = open_safetensors(path)
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  found = {int(m.group(1)) for m in map(pattern.match, source.keys()) if m}
  checkpoint_depth = max(found) + 1 if found else 0
  if checkpoint_depth > config.depth:
    logging.info("SigLIP: keeping %d of the %d blocks of %s.", config.depth, checkpoint_depth,
                 path)
  method = resample_lib.check_method(posemb_resample or "bicubic_antialias")
  posemb = f"{prefix}pos_embed"
  if posemb in source and len(source.shape(posemb)) == 3:
    _log_posemb(source.shape(posemb)[1], config, path, method)
  return load_params(source, timm_siglip_rules(config, prefix, method), abstract_params(config),
                     ignore=timm_siglip_unused(config, checkpoint_depth, prefix),
                     shardings=shardings, source_name=f"timm SigLIP checkpoint {path}",
                     config_problems=problems, config_file=hf_config.config_path(path))
