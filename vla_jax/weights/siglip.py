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
A position embedding stored for another grid is resampled bilinearly at load (logged).
Every loader validates names and shapes through `mapping.load_params` before reading data.
"""

import re
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from vla_jax.errors import CheckpointError
from vla_jax.models.vit import ViTConfig, abstract_params, resample_posemb
from vla_jax.weights import npz
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


def _posemb_transform(config: ViTConfig, add_batch_axis: bool = False):
  """Checkpoint position embedding -> [1, grid**2, D], resampled if its grid differs."""
  def transform(posemb):
    if add_batch_axis:
      posemb = posemb[None]
    if posemb.ndim != 3 or posemb.shape[1] == config.num_patches:
      return posemb  # right already, or malformed: `check_rules` reports the shape.
    side = int(round(np.sqrt(posemb.shape[1])))
    if side * side != posemb.shape[1]:
      return posemb  # not a square grid: reported as mis-shaped.
    return np.asarray(resample_posemb(posemb, config.grid_size))
  return transform


def _log_posemb(num_stored: int, config: ViTConfig, source: str) -> None:
  if config.posemb == "learn" and num_stored != config.num_patches:
    side = int(round(np.sqrt(num_stored)))
    logging.info("SigLIP: resampling pos_embedding of %s from a %dx%d to a %dx%d grid "
                 "(bilinear).", source, side, side, config.grid_size, config.grid_size)


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


def big_vision_rules(config: ViTConfig, *, checkpoint_scanned: bool,
                     prefix: str = "") -> List[Rule]:
  """Rules from a big_vision checkpoint (flat `/` names under `prefix`) to `ViT(config)`.

  Converts between scanned and looped layouts when the checkpoint's (`checkpoint_scanned`)
  differs from `config.scan`, and resamples `pos_embedding` to the config's grid.
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
      rules.append(Rule.copy(target, prefix + target, _posemb_transform(config)))
    else:
      rules.append(Rule.copy(target, prefix + target))
  return rules


def load_big_vision(path: str, config: ViTConfig, *, shardings: Any = None) -> Mapping[str, Any]:
  """Loads a big_vision `.npz` (or `file.npz:subtree`) into params for `ViT(config)`.

  Args:
    path: `.npz` file, optionally with `:subtree` (e.g. `pg.npz:img`).
    config: the model config; its `scan` picks the returned layout.
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
  if "pos_embedding" in source and np.ndim(source["pos_embedding"]) == 3:
    _log_posemb(source["pos_embedding"].shape[1], config, path)
  rules = big_vision_rules(config, checkpoint_scanned=checkpoint_scanned)
  return load_params(source, rules, abstract_params(config), shardings=shardings,
                     source_name=f"big_vision checkpoint {path}")


def save_big_vision(path: str, params: Mapping[str, Any]) -> None:
  """Saves ViT params as a big_vision `.npz` (flat `/` keys; bf16 kept as `|V2`)."""
  npz.save_npz(path, params)


# ---------------------------------------------------------------------------
# HuggingFace SiglipVisionModel / SiglipModel
# ---------------------------------------------------------------------------
def hf_siglip_rules(config: ViTConfig, prefix: str = "vision_model.") -> List[Rule]:
  """Rules from HF SigLIP vision keys (`{prefix}embeddings...`) to `ViT(config)` params.

  Covers the patch and position embeddings, the blocks (looped or stacked per
  `config.scan`), `post_layernorm` (if `config.final_norm`) and the MAP `head` (if
  `config.pool_type == "map"`).
  """
  p = prefix
  entries = [("embedding/kernel", f"{p}embeddings.patch_embedding.weight", conv2d),
             ("embedding/bias", f"{p}embeddings.patch_embedding.bias", None)]
  if config.posemb == "learn":
    entries.append(("pos_embedding", f"{p}embeddings.position_embedding.weight",
                    _posemb_transform(config, add_batch_axis=True)))
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


def load_hf_siglip(path: str, config: ViTConfig, *, shardings: Any = None) -> Mapping[str, Any]:
  """Loads a HF `SiglipVisionModel` or `SiglipModel` safetensors checkpoint.

  Args:
    path: a `save_pretrained` directory, a `.safetensors` file or an index json.
    config: the model config (HF SigLIP uses tanh-GELU: `gelu_approximate=True`).
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s for `ViT(config)`.
  """
  source = open_safetensors(path)
  names = list(source.keys())
  # transformers >= 5 saves SiglipVisionModel without the `vision_model.` prefix.
  prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
  ignore = hf_siglip_unused(config, prefix)
  if prefix and any(n.startswith("text_model.") for n in names):
    logging.info("SigLIP: %s is a full SiglipModel; ignoring its text tower.", path)
    ignore += [r"text_model\..*", "logit_scale", "logit_bias"]
  posemb = f"{prefix}embeddings.position_embedding.weight"
  if posemb in source and len(source.shape(posemb)) == 2:
    _log_posemb(source.shape(posemb)[0], config, path)
  return load_params(source, hf_siglip_rules(config, prefix), abstract_params(config),
                     ignore=ignore, shardings=shardings,
                     source_name=f"HF SigLIP checkpoint {path}")


# ---------------------------------------------------------------------------
# timm vit_*_siglip_*
# ---------------------------------------------------------------------------
def timm_siglip_rules(config: ViTConfig, prefix: str = "") -> List[Rule]:
  """Rules from timm SigLIP keys (`{prefix}blocks.{i}...`) to `ViT(config)` params.

  Only blocks < `config.depth` are read; `norm` feeds `encoder_norm` (if
  `config.final_norm`) and `attn_pool` the MAP head (if `config.pool_type == "map"`).
  timm uses exact GELU: build the config with `gelu_approximate=False`.
  """
  p = prefix
  entries = [("embedding/kernel", f"{p}patch_embed.proj.weight", conv2d),
             ("embedding/bias", f"{p}patch_embed.proj.bias", None)]
  if config.posemb == "learn":
    entries.append(("pos_embedding", f"{p}pos_embed", _posemb_transform(config)))
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
                     shardings: Any = None) -> Mapping[str, Any]:
  """Loads a timm SigLIP `state_dict` saved as safetensors, possibly truncating blocks.

  Args:
    path: `.safetensors` file (or directory / index json).
    config: the model config; `depth` may be smaller than the checkpoint's.
    prefix: prefix of the tower's keys in the file (e.g. a VLA checkpoint's).
    shardings: optional pytree of `jax.sharding.Sharding` like the params.
  Returns:
    Nested dict of float32 `jax.Array`s for `ViT(config)`.
  """
  source = open_safetensors(path)
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  found = {int(m.group(1)) for m in map(pattern.match, source.keys()) if m}
  checkpoint_depth = max(found) + 1 if found else 0
  if checkpoint_depth > config.depth:
    logging.info("SigLIP: keeping %d of the %d blocks of %s.", config.depth, checkpoint_depth,
                 path)
  posemb = f"{prefix}pos_embed"
  if posemb in source and len(source.shape(posemb)) == 3:
    _log_posemb(source.shape(posemb)[1], config, path)
  return load_params(source, timm_siglip_rules(config, prefix), abstract_params(config),
                     ignore=timm_siglip_unused(config, checkpoint_depth, prefix),
                     shardings=shardings, source_name=f"timm SigLIP checkpoint {path}")
