"""Loads DINOv2 checkpoints (HuggingFace and timm layouts) into `models.dinov2.DinoV2`.

HuggingFace `Dinov2Model` / `Dinov2WithRegistersModel` checkpoints (`save_pretrained` and
the hub files) name tensors `embeddings.*`, `encoder.layer.{i}.*` and `layernorm.*`; the
in-memory `state_dict()` of transformers >= 5 renames the attention to
`attention.{q,k,v,o}_proj` and splits SwiGLU into `mlp.{gate,up,down}_proj`, and both
spellings are accepted (`layout=`). timm's `vit_*_dinov2` models use `blocks.{i}.*` with a
fused `attn.qkv`; OpenVLA's HuggingFace export of that tower prefixes it with
`vision_backbone.featurizer.` and renames layer scale `gamma` to `scale_factor`.
A position embedding stored for another grid is resampled bicubically once, at load.
"""

import re
from typing import Any, List, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging

from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.models.dinov2 import DinoV2, DinoV2Config, resample_pos_embedding
from vla_jax.weights.mapping import Rule, conv2d, identity, linear, load_params, stacked
from vla_jax.weights.safetensors import open_safetensors

HF_LAYOUTS = ("hub", "state_dict")


def _posemb_transform(config: DinoV2Config):
  """Checkpoint position embedding -> ours, resampling the grid when sizes differ."""
  num_prefix = 1 if config.posemb_covers_cls else 0

  def transform(posemb):
    rows = posemb.shape[1] - num_prefix
    side = int(round(np.sqrt(max(rows, 0))))
    if posemb.ndim != 3 or rows == config.num_patches or side * side != rows:
      return posemb  # already right, or not a grid: `check_rules` reports the shape
    return np.asarray(resample_pos_embedding(posemb, num_prefix, config.grid_size))

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


def _stem_rules(config: DinoV2Config, names: Mapping[str, str], target_prefix: str):
  rules = [
      Rule.copy(f"{target_prefix}patch_embed/kernel", names["patch"] + ".weight", conv2d),
      Rule.copy(f"{target_prefix}patch_embed/bias", names["patch"] + ".bias"),
      Rule.copy(f"{target_prefix}cls_token", names["cls"]),
      Rule.copy(f"{target_prefix}pos_embedding", names["pos"], _posemb_transform(config)),
  ]
  if config.num_registers:
    rules.append(Rule.copy(f"{target_prefix}register_tokens", names["registers"]))
  if config.final_norm:
    rules += [Rule.copy(f"{target_prefix}norm/scale", names["norm"] + ".weight"),
              Rule.copy(f"{target_prefix}norm/bias", names["norm"] + ".bias")]
  return rules


def hf_dinov2_rules(config: DinoV2Config, prefix: str = "", *, layout: str = "hub",
                    target_prefix: str = "") -> List[Rule]:
  """Rules from a HF `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint to DinoV2 params.

  Args:
    config: the model config (scan decides stacked vs per-block targets).
    prefix: checkpoint key prefix, e.g. "dinov2." for `Dinov2ForImageClassification`.
    layout: "hub" (hub files and `save_pretrained`: `attention.attention.query`,
      `mlp.weights_in`) or "state_dict" (transformers >= 5 module names:
      `attention.q_proj`, `mlp.gate_proj`).
    target_prefix: prepended to our parameter paths (e.g. "dino/").
  """
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
      "registers": f"{p}embeddings.register_tokens", "norm": f"{p}layernorm"}, target_prefix)
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
                      layer_scale_key: str = "gamma", target_prefix: str = "") -> List[Rule]:
  """Rules from a timm `vit_*_dinov2` state dict (blocks < config.depth) to DinoV2 params.

  Args:
    config: the model config; `posemb_covers_cls=False` for the `*_reg4_dinov2` models
      (`no_embed_class`), True for the register-free ones.
    prefix: checkpoint key prefix, e.g. "vision_backbone.featurizer." in OpenVLA.
    layer_scale_key: "gamma" (timm) or "scale_factor" (OpenVLA's HF export).
    target_prefix: prepended to our parameter paths.
  """
  p = prefix

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
      "registers": f"{p}reg_token", "norm": f"{p}norm"}, target_prefix)
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


def _log_resampling(source, name: str, config: DinoV2Config) -> None:
  if name not in source:
    return
  rows = _shape(source, name)[1] - (1 if config.posemb_covers_cls else 0)
  if rows != config.num_patches:
    side = int(round(np.sqrt(max(rows, 0))))
    logging.info("DINOv2: resampling position embedding %s from a %dx%d to a %dx%d grid "
                 "(bicubic) for image_size %d.", name, side, side, config.grid_size,
                 config.grid_size, config.image_size)


def load_hf_dinov2(path, config: DinoV2Config, *, prefix: str = "",
                   shardings: Optional[Any] = None):
  """Loads a HF DINOv2 checkpoint (path or opened mapping) -> DinoV2 params pytree."""
  source, name = _open(path)
  layout = "state_dict" if any(".attention.q_proj." in k for k in source) else "hub"
  _log_resampling(source, f"{prefix}embeddings.position_embeddings", config)
  return load_params(source, hf_dinov2_rules(config, prefix, layout=layout),
                     _expected_params(config), ignore=hf_dinov2_unused(prefix),
                     shardings=shardings, source_name=name)


def load_timm_dinov2(path, config: DinoV2Config, *, prefix: str = "",
                     shardings: Optional[Any] = None):
  """Loads a timm (or OpenVLA-exported) DINOv2 state dict -> DinoV2 params pytree.

  Blocks beyond `config.depth`, and the final norm when `config.final_norm` is False,
  are skipped on purpose (see `timm_dinov2_unused`).
  """
  source, name = _open(path)
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  depths = [int(m.group(1)) + 1 for k in source for m in [pattern.match(k)] if m]
  if not depths:
    raise CheckpointError(f"{name} has no '{prefix}blocks.<i>.' tensors; it is not a timm "
                          "ViT state dict under that prefix. Check the path and prefix.")
  layer_scale_key = ("scale_factor" if f"{prefix}blocks.0.ls1.scale_factor" in source
                     else "gamma")
  _log_resampling(source, f"{prefix}pos_embed", config)
  return load_params(source, timm_dinov2_rules(config, prefix, layer_scale_key=layer_scale_key),
                     _expected_params(config),
                     ignore=timm_dinov2_unused(config, max(depths), prefix),
                     shardings=shardings, source_name=name)
