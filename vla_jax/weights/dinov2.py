"""Loads DINOv2 checkpoints (HuggingFace and timm layouts) into `models.dinov2.DinoV2`.

HuggingFace `Dinov2Model` / `Dinov2WithRegistersModel` checkpoints (`save_pretrained` and
the hub files) name tensors `embeddings.*`, `encoder.layer.{i}.*` and `layernorm.*`; the
in-memory `state_dict()` of transformers >= 5 renames the attention to
`attention.{q,k,v,o}_proj` and splits SwiGLU into `mlp.{gate,up,down}_proj`, and both
spellings are accepted (`layout=`). timm's `vit_*_dinov2` models use `blocks.{i}.*` with a
fused `attn.qkv`; OpenVLA's HuggingFace export of that tower prefixes it with
`vision_backbone.featurizer.` and renames layer scale `gamma` to `scale_factor`.
A position embedding stored for another grid is resampled once, at load, as the
checkpoint's framework does (`vla_jax.models.posemb_resample`): transformers'
`Dinov2Model` with plain bicubic, `Dinov2WithRegistersModel` and timm with antialiased
bicubic; `posemb_resample=` overrides it. The HF loader reads `config.json` and refuses
settings our DinoV2 does not compute (`dinov2_config_problems`); `config_from_hf` builds
the matching `DinoV2Config`.
"""

import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.models import posemb_resample as resample_lib
from vla_jax.models.dinov2 import DinoV2, DinoV2Config, resample_pos_embedding
from vla_jax.weights import hf_config
from vla_jax.weights.mapping import Rule, conv2d, identity, linear, load_params, stacked
from vla_jax.weights.safetensors import open_safetensors

HF_LAYOUTS = ("hub", "state_dict")


def _posemb_transform(config: DinoV2Config, method: str):
  """Checkpoint position embedding -> ours, resampled by `method` when sizes differ."""
  num_prefix = 1 if config.posemb_covers_cls else 0

  def transform(posemb):
    rows = posemb.shape[1] - num_prefix
    side = int(round(np.sqrt(max(rows, 0))))
    if posemb.ndim != 3 or rows == config.num_patches or side * side != rows:
      return posemb  # already right, or not a grid: `check_rules` reports the shape
    return np.asarray(resample_pos_embedding(posemb, num_prefix, config.grid_size, method))

  return transform


def _heads_in(config: DinoV2Config):
  """torch [D_out, D_in] q/k/v weight -> kernel [D_in, heads, head_dim]."""
  head_dim = config.width // config.num_heads
  return lambda w: linear(w).reshape(w.shape[1], config.num_heads, head_dim)


def _heads_in_bias(config: DinoV2Config):
  head_dim = config.width // config.num_heads
  return lambda b: b.reshape(config.num_heads, head_dim)


def _heads_out(config: DinoV2Config):
  """torch [D_out, D_in] output weight -> kernel [heads, head_dim, D_out]."""
  head_dim = config.width // config.num_heads
  return lambda w: linear(w).reshape(config.num_heads, head_dim, w.shape[0])


def _block_rules(config: DinoV2Config, block_sources, target_prefix: str) -> List[Rule]:
  """Rules for every block; `block_sources(i)` -> [(our name, source name, transform)]."""
  rules = []
  per_block = [block_sources(i) for i in range(config.depth)]
  for j, (name, _, transform) in enumerate(per_block[0]):
    if config.scan:
      rules.append(stacked(f"{target_prefix}blocks/{name}",
                           [entries[j][1] for entries in per_block], transform))
    else:
      rules += [Rule.copy(f"{target_prefix}blocks_{i}/{name}", entries[j][1], transform)
                for i, entries in enumerate(per_block)]
  return rules



def _norm(ours: str, theirs: str):
  """LayerNorm: torch weight/bias -> flax scale/bias."""
  return [(f"{ours}/scale", f"{theirs}.weight", identity),
          (f"{ours}/bias", f"{theirs}.bias", identity)]


def _dense(ours: str, theirs: str, weight=linear, bias=identity):
  """Linear: torch weight [out, in] / bias -> our kernel / bias via the transforms."""
  return [(f"{ours}/kernel", f"{theirs}.weight", weight),
          (f"{ours}/bias", f"{theirs}.bias", bias)]


def _stem_rules(config: DinoV2Config, names: Mapping[str, str], target_prefix: str,
                method: str):
  rules = [
      Rule.copy(f"{target_prefix}patch_embed/kernel", names["patch"] + ".weight", conv2d),
      Rule.copy(f"{target_prefix}patch_embed/bias", names["patch"] + ".bias"),
      Rule.copy(f"{target_prefix}cls_token", names["cls"]),
      Rule.copy(f"{target_prefix}pos_embedding", names["pos"], _posemb_transform(config, method)),
  ]
  if config.num_registers:
    rules.append(Rule.copy(f"{target_prefix}register_tokens", names["registers"]))
  if config.final_norm:
    rules += [Rule.copy(f"{target_prefix}norm/scale", names["norm"] + ".weight"),
              Rule.copy(f"{target_prefix}norm/bias", names["norm"] + ".bias")]
  return rules


def hf_dinov2_rules(config: DinoV2Config, prefix: str = "", *, layout: str = "hub",
                    target_prefix: str = "", posemb_resample: Optional[str] = None
                    ) -> List[Rule]:
  """Rules from a HF `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint to DinoV2 params.

  Args:
    config: the model config (scan decides stacked vs per-block targets).
    prefix: checkpoint key prefix, e.g. "dinov2." for `Dinov2ForImageClassification`.
    layout: "hub" (hub files and `save_pretrained`: `attention.attention.query`,
      `mlp.weights_in`) or "state_dict" (transformers >= 5 module names:
      `attention.q_proj`, `mlp.gate_proj`).
    target_prefix: prepended to our parameter paths (e.g. "dino/").
    posemb_resample: how a position embedding for another grid is resampled (default:
      transformers' own, `hf_posemb_resample(config)`).
  """
  posemb_resample = resample_lib.check_method(posemb_resample or hf_posemb_resample(config))
  if layout not in HF_LAYOUTS:
    raise ConfigError(f"layout must be one of {HF_LAYOUTS}, found {layout!r}.")
  if not config.posemb_covers_cls:
    raise ConfigError("HF DINOv2 checkpoints store a position embedding with a CLS slot "
                      "([1, 1+N, D]); set dinov2.posemb_covers_cls=True to load them.")
  p = prefix
  hub = layout == "hub"
  attn = "attention.attention." if hub else "attention."
  names = {"q": "query" if hub else "q_proj", "k": "key" if hub else "k_proj",
           "v": "value" if hub else "v_proj",
           "o": "attention.output.dense" if hub else "attention.o_proj"}

  def block(i):
    layer = f"{p}encoder.layer.{i}."
    entries = _norm("norm1", layer + "norm1")
    for ours in ("query", "key", "value"):
      theirs = layer + attn + names[ours[0]]
      entries += _dense(f"attn/{ours}", theirs, _heads_in(config), _heads_in_bias(config))
    entries += _dense("attn/out", layer + names["o"], _heads_out(config))
    entries += _norm("norm2", layer + "norm2")
    if config.layer_scale:
      entries += [("ls1/gamma", layer + "layer_scale1.lambda1", identity),
                  ("ls2/gamma", layer + "layer_scale2.lambda1", identity)]
    if config.ffn == "mlp":
      entries += _dense("mlp/fc1", layer + "mlp.fc1") + _dense("mlp/fc2", layer + "mlp.fc2")
    elif hub:  # hub SwiGLU packs [gate; up] on the output axis, as our fc1 does
      entries += (_dense("mlp/fc1", layer + "mlp.weights_in") +
                  _dense("mlp/fc2", layer + "mlp.weights_out"))
    else:
      entries += _dense("mlp/fc2", layer + "mlp.down_proj")
    return entries

  rules = _stem_rules(config, {
      "patch": f"{p}embeddings.patch_embeddings.projection", "cls": f"{p}embeddings.cls_token",
      "pos": f"{p}embeddings.position_embeddings",
      "registers": f"{p}embeddings.register_tokens", "norm": f"{p}layernorm"}, target_prefix,
      posemb_resample)
  rules += _block_rules(config, block, target_prefix)
  if config.ffn == "swiglu" and not hub:
    rules += _packed_fc1_rules(config, [
        (f"{p}encoder.layer.{i}.mlp.gate_proj", f"{p}encoder.layer.{i}.mlp.up_proj")
        for i in range(config.depth)], target_prefix)
  return rules


def _packed_fc1_rules(config: DinoV2Config, gate_up: Sequence, target_prefix: str):
  """Separate gate / up projections -> our packed fc1 ([D, 2F] = [gate | up])."""
  def kernel(gate, up):
    return np.concatenate([linear(gate), linear(up)], axis=1)

  def bias(gate, up):
    return np.concatenate([gate, up])

  rules = []
  for suffix, fn in (("kernel", kernel), ("bias", bias)):
    kind = "weight" if suffix == "kernel" else "bias"
    sources = [(f"{g}.{kind}", f"{u}.{kind}") for g, u in gate_up]
    if config.scan:
      flat = tuple(s for pair in sources for s in pair)
      rules.append(Rule(f"{target_prefix}blocks/mlp/fc1/{suffix}", flat,
                        lambda *xs, fn=fn: np.stack([fn(*xs[k:k + 2])
                                                     for k in range(0, len(xs), 2)])))
    else:
      rules += [Rule(f"{target_prefix}blocks_{i}/mlp/fc1/{suffix}", pair, fn)
                for i, pair in enumerate(sources)]
  return rules


def hf_dinov2_unused(prefix: str = "") -> List[str]:
  """Regexes of HF DINOv2 checkpoint keys deliberately not loaded (the MAE mask token)."""
  return [re.escape(f"{prefix}embeddings.mask_token")]


def _qkv_part(config: DinoV2Config, part: int, bias: bool):
  """Slice q (0), k (1) or v (2) out of timm's fused qkv and shape it per head."""
  width = config.width
  if bias:
    return lambda b: _heads_in_bias(config)(b[part * width:(part + 1) * width])
  return lambda w: _heads_in(config)(w[part * width:(part + 1) * width])


def timm_dinov2_rules(config: DinoV2Config, prefix: str = "", *,
                      layer_scale_key: str = "gamma", target_prefix: str = "",
                      posemb_resample: str = "bicubic_antialias") -> List[Rule]:
  """Rules from a timm `vit_*_dinov2` state dict (blocks < config.depth) to DinoV2 params.

  Args:
    config: the model config; `posemb_covers_cls=False` for the `*_reg4_dinov2` models
      (`no_embed_class`), True for the register-free ones.
    prefix: checkpoint key prefix, e.g. "vision_backbone.featurizer." in OpenVLA.
    layer_scale_key: "gamma" (timm) or "scale_factor" (OpenVLA's HF export).
    target_prefix: prepended to our parameter paths.
    posemb_resample: how a position embedding for another grid is resampled (default:
      timm's `resample_abs_pos_embed`, antialiased bicubic).
  """
  p = prefix
  posemb_resample = resample_lib.check_method(posemb_resample)

  def block(i):
    layer = f"{p}blocks.{i}."
    entries = _norm("norm1", layer + "norm1")
    for part, ours in enumerate(("query", "key", "value")):
      entries += [
          (f"attn/{ours}/kernel", layer + "attn.qkv.weight", _qkv_part(config, part, False)),
          (f"attn/{ours}/bias", layer + "attn.qkv.bias", _qkv_part(config, part, True))]
    entries += _dense("attn/out", layer + "attn.proj", _heads_out(config))
    entries += _norm("norm2", layer + "norm2")
    if config.layer_scale:
      entries += [("ls1/gamma", f"{layer}ls1.{layer_scale_key}", identity),
                  ("ls2/gamma", f"{layer}ls2.{layer_scale_key}", identity)]
    # timm packs SwiGLU as fc1 = [gate; up] too (`SwiGLUPacked`), so both FFNs map alike.
    entries += _dense("mlp/fc1", layer + "mlp.fc1") + _dense("mlp/fc2", layer + "mlp.fc2")
    return entries

  rules = _stem_rules(config, {
      "patch": f"{p}patch_embed.proj", "cls": f"{p}cls_token", "pos": f"{p}pos_embed",
      "registers": f"{p}reg_token", "norm": f"{p}norm"}, target_prefix, posemb_resample)
  return rules + _block_rules(config, block, target_prefix)


def timm_dinov2_unused(config: DinoV2Config, checkpoint_depth: int,
                       prefix: str = "") -> List[str]:
  """Regexes of timm checkpoint keys a tower of `config.depth` blocks does not use.

  OpenVLA reads the second-to-last block, so it keeps `checkpoint_depth - 1` blocks;
  the dropped blocks, the final norm (when `config.final_norm` is False), and any
  classifier head (`head.*`, `fc_norm.*`) are then deliberately unused.
  """
  if config.depth > checkpoint_depth:
    raise ConfigError(f"dinov2.depth ({config.depth}) exceeds the checkpoint's "
                      f"{checkpoint_depth} blocks; lower depth to at most {checkpoint_depth}.")
  p = re.escape(prefix)
  unused = [rf"{p}blocks\.{i}\..+" for i in range(config.depth, checkpoint_depth)]
  if not config.final_norm:
    unused.append(rf"{p}norm\.(weight|bias)")
  unused += [rf"{p}head\..+", rf"{p}fc_norm\..+"]
  return unused


def _expected_params(config: DinoV2Config):
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                               np.float32)
  return jax.eval_shape(DinoV2(config).init, jax.random.key(0), image)["params"]


def _open(path_or_source):
  if isinstance(path_or_source, Mapping):
    return path_or_source, "checkpoint"
  return open_safetensors(path_or_source), str(path_or_source)


def _shape(source, name):
  return tuple(source.shape(name)) if hasattr(source, "shape") and callable(
      source.shape) else tuple(np.shape(source[name]))


def _log_resampling(source, name: str, config: DinoV2Config, method: str) -> None:
  if name not in source:
    return
  rows = _shape(source, name)[1] - (1 if config.posemb_covers_cls else 0)
  if rows != config.num_patches:
    side = int(round(np.sqrt(max(rows, 0))))
    logging.info("DINOv2: resampling position embedding %s from a %dx%d to a %dx%d grid "
                 "(%s) for image_size %d.", name, side, side, config.grid_size,
                 config.grid_size, method, config.image_size)


def hf_posemb_resample(config: DinoV2Config, model_type: Optional[str] = None) -> str:
  """transformers' resampling: `Dinov2Model` ("dinov2") plain bicubic,
  `Dinov2WithRegistersModel` ("dinov2_with_registers") antialiased bicubic; without a
  model_type, the model with `config`'s registers."""
  if model_type is None:
    model_type = "dinov2_with_registers" if config.num_registers else "dinov2"
  return "bicubic_antialias" if model_type == "dinov2_with_registers" else "bicubic"


# transformers' Dinov2Config / Dinov2WithRegistersConfig defaults, for omitted fields.
DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, image_size=224,
                       patch_size=14, num_channels=3, qkv_bias=True, use_swiglu_ffn=False)
_REGISTER_DEFAULTS = {"dinov2": 0, "dinov2_with_registers": 4}


def _hidden_dim(check: hf_config.ConfigCheck) -> int:
  """transformers' feed-forward width: int(D * mlp_ratio), SwiGLU's rounded 2/3 of it."""
  hidden = int(check.get("hidden_size") * check.get("mlp_ratio"))
  if check.get("use_swiglu_ffn"):
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
  return hidden


def dinov2_config_problems(hf: Mapping[str, Any], config: DinoV2Config, where: str
                           ) -> List[str]:
  """Every setting of a HF DINOv2 config.json that `DinoV2(config)` does not compute.

  The checkpoint's `image_size` is not one of them: a position embedding for another
  grid is resampled at load.
  """
  check = hf_config.ConfigCheck(hf, where, DINOV2_DEFAULTS)
  model_type = hf.get("model_type")
  if model_type not in _REGISTER_DEFAULTS:
    check.refuse("model_type", model_type, "DINOv2 ('dinov2', 'dinov2_with_registers')",
                 "Use a DINOv2 checkpoint (DINOv3's RoPE is not implemented).")
    return check.problems
  swiglu = bool(check.get("use_swiglu_ffn"))
  check.equal("use_swiglu_ffn", "dinov2.ffn", config.ffn,
              convert=lambda v: "swiglu" if v else "mlp")
  if not swiglu and check.get("hidden_act") != "gelu":
    check.refuse("hidden_act", check.get("hidden_act"), "DINOv2's exact GELU ('gelu') MLP",
                 "Use a checkpoint with hidden_act='gelu'.")
  if not check.get("qkv_bias"):
    check.refuse("qkv_bias", check.get("qkv_bias"), "attention with query/key/value biases",
                 "Use a checkpoint with qkv_bias=True.")
  check.equal("layer_norm_eps", "dinov2.layernorm_eps", config.layernorm_eps, rtol=1e-3)
  registers = hf.get("num_register_tokens", _REGISTER_DEFAULTS[model_type])
  if model_type == "dinov2":
    registers = 0  # Dinov2Model has no registers whatever the field says
  if registers != config.num_registers:
    check.differs("num_register_tokens", registers, "dinov2.num_registers",
                  config.num_registers)
  if config.ffn == ("swiglu" if swiglu else "mlp") and _hidden_dim(check) != config.hidden_dim:
    check.differs("mlp_ratio", check.get("mlp_ratio"), "dinov2.mlp_dim", config.hidden_dim,
                  f"Set dinov2.mlp_dim={_hidden_dim(check)} (transformers' feed-forward "
                  "width for that ratio).")
  if not config.layer_scale:
    check.differs("layerscale_value", check.get("layerscale_value", 1.0),
                  "dinov2.layer_scale", False, "transformers' DINOv2 blocks always scale "
                  "their residual branches: set dinov2.layer_scale=True.")
  for key, ours_name, ours in (("hidden_size", "dinov2.width", config.width),
                               ("num_hidden_layers", "dinov2.depth", config.depth),
                               ("num_attention_heads", "dinov2.num_heads", config.num_heads),
                               ("patch_size", "dinov2.patch_size", config.patch_size),
                               ("num_channels", "dinov2.channels", config.channels)):
    check.equal(key, ours_name, ours)
  return check.problems


def _hf_problems(path, config: DinoV2Config) -> Tuple[List[str], str, Optional[str]]:
  """(problems, config.json path, its model_type) for a checkpoint path."""
  if isinstance(path, Mapping):
    return [], "config.json", None
  hf, where = hf_config.read_config(path)
  if hf is None:
    hf_config.warn_unchecked(path, "DINOv2")
    return [], where, None
  return dinov2_config_problems(hf, config, "config.json"), where, hf.get("model_type")


def config_from_hf(path: str, image_size: Optional[int] = None, **overrides: Any
                   ) -> DinoV2Config:
  """The `DinoV2Config` of a HF `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint.

  Args:
    path: the checkpoint directory (or a file beside its config.json).
    image_size: the resolution to run at (default: the checkpoint's, 518 for the
      published models; another one resamples the position embedding at load).
    overrides: our settings HF does not fix (scan, remat, dtype, final_norm, ...).
  """
  hf, where = hf_config.read_config(path)
  if hf is None or hf.get("model_type") not in _REGISTER_DEFAULTS:
    raise CheckpointError(f"config_from_hf needs a DINOv2 config.json; {where} "
                          f"{'does not exist' if hf is None else 'holds none'}.")
  check = hf_config.ConfigCheck(hf, where, DINOV2_DEFAULTS)
  fields = dict(
      width=check.get("hidden_size"), depth=check.get("num_hidden_layers"),
      num_heads=check.get("num_attention_heads"), mlp_dim=_hidden_dim(check),
      patch_size=check.get("patch_size"), image_size=image_size or check.get("image_size"),
      channels=check.get("num_channels"),
      num_registers=(hf.get("num_register_tokens", 4)
                     if hf["model_type"] == "dinov2_with_registers" else 0),
      layer_scale=True, ffn="swiglu" if check.get("use_swiglu_ffn") else "mlp",
      layernorm_eps=float(check.get("layer_norm_eps")), posemb_covers_cls=True,
      final_norm=True)
  config = DinoV2Config(**{**fields, **overrides})
  hf_config.raise_problems(dinov2_config_problems(hf, config, where), path, where)
  return config


def load_hf_dinov2(path, config: DinoV2Config, *, prefix: str = "",
                   posemb_resample: Optional[str] = None, shardings: Optional[Any] = None):
  """Loads a HF DINOv2 checkpoint (path or opened mapping) -> DinoV2 params pytree.

  The config.json beside a path is checked against `config` (`dinov2_config_problems`;
  `config_from_hf(path)` builds a matching one). `posemb_resample` (default:
  transformers' own for the model, `hf_posemb_resample`) resamples a position embedding
  stored for another grid.
  """
  problems, where, model_type = _hf_problems(path, config)
  source, name = _open(path)
  layout = "state_dict" if any(".attention.q_proj." in k for k in source) else "hub"
  method = resample_lib.check_method(posemb_resample or hf_posemb_resample(config, model_type))
  _log_resampling(source, f"{prefix}embeddings.position_embeddings", config, method)
  return load_params(source, hf_dinov2_rules(config, prefix, layout=layout,
                                             posemb_resample=method),
                     _expected_params(config), ignore=hf_dinov2_unused(prefix),
                     shardings=shardings, source_name=name, config_problems=problems,
                     config_file=where)


def load_timm_dinov2(path, config: DinoV2Config, *, prefix: str = "",
                     posemb_resample: Optional[str] = None, shardings: Optional[Any] = None):
  """Loads a timm (or OpenVLA-exported) DINOv2 state dict -> DinoV2 params pytree.

  Blocks beyond `config.depth`, and the final norm when `config.final_norm` is False,
  are skipped on purpose (see `timm_dinov2_unused`). A timm config.json beside the file
  is checked (`hf_config.timm_config_problems`); a position embedding for another grid
  is resampled as timm does (antialiased bicubic) unless `posemb_resample` says otherwise.
  """
  problems = []
  if not isinstance(path, Mapping):
    problems = hf_config.timm_config_problems(path, "dinov2", {
        "embed_dim": ("dinov2.width", config.width),
        "num_heads": ("dinov2.num_heads", config.num_heads),
        "patch_size": ("dinov2.patch_size", config.patch_size), "depth": ("dinov2.depth", None),
        "mlp_ratio": ("dinov2.mlp_dim", config.hidden_dim, lambda r: int(config.width * r)),
        "reg_tokens": ("dinov2.num_registers", config.num_registers),
        "no_embed_class": ("dinov2.posemb_covers_cls", not config.posemb_covers_cls),
        "init_values": ("dinov2.layer_scale", None), "global_pool": ("pooling", None),
        "class_token": ("a class token (always, in our DINOv2)", True),
    })
  source, name = _open(path)
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  depths = [int(m.group(1)) + 1 for k in source for m in [pattern.match(k)] if m]
  if not depths:
    raise CheckpointError(f"{name} has no '{prefix}blocks.<i>.' tensors; it is not a timm "
                          "ViT state dict under that prefix. Check the path and prefix.")
  layer_scale_key = ("scale_factor" if f"{prefix}blocks.0.ls1.scale_factor" in source
                     else "gamma")
  method = resample_lib.check_method(posemb_resample or "bicubic_antialias")
  _log_resampling(source, f"{prefix}pos_embed", config, method)
  return load_params(source, timm_dinov2_rules(config, prefix, layer_scale_key=layer_scale_key,
                                               posemb_resample=method),
                     _expected_params(config),
                     ignore=timm_dinov2_unused(config, max(depths), prefix),
                     shardings=shardings, source_name=name, config_problems=problems,
                     config_file="" if isinstance(path, Mapping) else
                     hf_config.config_path(path))
