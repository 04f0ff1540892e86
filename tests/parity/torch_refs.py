"""Imports of the PyTorch reference implementations used by the parity tests.

Import this module (tests/conftest.py does) before `transformers` or `timm`.

PyPI's torchvision wheel is linked against CUDA; next to a CPU build of torch its
compiled detection ops (`nms`, `qnms`) cannot load, and its import then fails while
registering fake kernels for them. timm needs only torchvision's pure-Python parts, so we
declare those two operator schemas (no kernels) before importing it. Nothing in the
parity path calls them.
"""

import numpy as np
import torch


_LIBRARY = []


def make_torchvision_importable() -> None:
  """Lets `import torchvision` succeed beside CPU torch (transformers imports it too)."""
  if _LIBRARY:
    return
  try:
    import torchvision  # noqa: F401
    _LIBRARY.append(None)
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.append(lib)  # the schemas live as long as this object
    import torchvision  # noqa: F401,F811


def import_timm():
  """Returns the `timm` module, working around the CUDA-only torchvision ops."""
  make_torchvision_importable()
  import timm
  return timm


def to_numpy(t: "torch.Tensor") -> np.ndarray:
  return t.detach().to(torch.float32).cpu().numpy()


# --------------------------------------------------------------------------- OpenVLA
# Prismatic (OpenVLA) written against the reference modules: timm towers, the fused
# projector and a transformers Llama. Used by the parity tests and the benchmarks.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def torch_pixels(images: np.ndarray, mean, std) -> "torch.Tensor":
  """[B, H, W, 3] floats in [0, 1] -> normalised NCHW torch tensor."""
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


class PrismaticProjector(torch.nn.Module):
  """Prismatic's fused projector: fc1 -> GELU -> fc2 -> GELU -> fc3."""

  def __init__(self, vision_dim: int, llm_dim: int):
    super().__init__()
    self.fc1 = torch.nn.Linear(vision_dim, 4 * vision_dim)
    self.fc2 = torch.nn.Linear(4 * vision_dim, llm_dim)
    self.fc3 = torch.nn.Linear(llm_dim, llm_dim)

  def forward(self, x):
    gelu = torch.nn.functional.gelu
    return self.fc3(gelu(self.fc2(gelu(self.fc1(x)))))


def make_openvla_reference(image_size: int, patch: int, dino_width: int, siglip_width: int,
                           tower_depth: int, tower_heads: int, llama_config) -> dict:
  """Random-weight OpenVLA parts: {"dino", "siglip", "projector", "llama"} in eval mode."""
  import transformers
  timm = import_timm()
  dino = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                           img_size=image_size, patch_size=patch, embed_dim=dino_width,
                           depth=tower_depth, num_heads=tower_heads, init_values=0.5)
  siglip = timm.create_model("vit_so400m_patch14_siglip_224", pretrained=False, num_classes=0,
                             img_size=image_size, patch_size=patch, embed_dim=siglip_width,
                             depth=tower_depth, num_heads=tower_heads, mlp_ratio=2)
  projector = PrismaticProjector(dino_width + siglip_width, llama_config.hidden_size)
  llama = transformers.LlamaForCausalLM(llama_config)
  return {k: v.eval() for k, v in dict(dino=dino, siglip=siglip, projector=projector,
                                       llama=llama).items()}


def openvla_state_dict(refs: dict) -> dict:
  """The parts' weights under the `openvla/openvla-7b` key layout."""
  state = {}
  for k, v in refs["dino"].state_dict().items():  # OpenVLA's export renames LayerScale gamma
    state["vision_backbone.featurizer." + k.replace(".gamma", ".scale_factor")] = v
  for prefix, module in (("vision_backbone.fused_featurizer.", refs["siglip"]),
                         ("projector.", refs["projector"]), ("language_model.", refs["llama"])):
    state.update({prefix + k: v for k, v in module.state_dict().items()})
  return {k: v.contiguous() for k, v in state.items()}


def prismatic_forward(refs: dict, images: np.ndarray, input_ids: np.ndarray,
                      attention_mask: np.ndarray, output_hidden_states: bool = False):
  """Prismatic's multimodal forward: second-to-last block patches of both towers,
  concatenated, projected, spliced in after BOS, through the Llama."""
  with torch.no_grad():
    take = [len(refs["dino"].blocks) - 2]
    dino_patches = refs["dino"].get_intermediate_layers(
        torch_pixels(images, IMAGENET_MEAN, IMAGENET_STD), n=take)[0]
    siglip_patches = refs["siglip"].get_intermediate_layers(
        torch_pixels(images, SIGLIP_MEAN, SIGLIP_STD), n=take)[0]
    visual = refs["projector"](torch.cat([dino_patches, siglip_patches], dim=2))
    text = refs["llama"].get_input_embeddings()(torch.from_numpy(input_ids).long())
    embeds = torch.cat([text[:, :1], visual, text[:, 1:]], dim=1)
    mask = torch.from_numpy(np.asarray(attention_mask)).long()
    ones = torch.ones(mask.shape[0], visual.shape[1], dtype=torch.long)
    mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
    return refs["llama"](inputs_embeds=embeds, attention_mask=mask,
                         output_hidden_states=output_hidden_states)


# --------------------------------------------------------------------------- big_vision
def gemma_to_big_vision(config, state_dict, prefix: str = "") -> dict:
  """HF Gemma weights -> big_vision's PaliGemma npz layout (`llm/...`, layers stacked).

  Written from big_vision's parameter shapes, independently of our loaders.
  `config` is a HF GemmaConfig; `prefix` is where `layers.N...` sit in `state_dict`.
  """
  heads, kv_heads, head_dim, width = (config.num_attention_heads, config.num_key_value_heads,
                                      config.head_dim, config.hidden_size)
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  depth = config.num_hidden_layers

  def stack(fn):
    return np.stack([fn(i) for i in range(depth)])

  def layer(i, name):
    return sd[f"{prefix}layers.{i}.{name}"]

  def einsum_in(i, name, n):  # torch [n * hd, D] -> [n, D, hd]
    return layer(i, name).reshape(n, head_dim, width).transpose(0, 2, 1)

  q = stack(lambda i: einsum_in(i, "self_attn.q_proj.weight", heads))
  k = stack(lambda i: einsum_in(i, "self_attn.k_proj.weight", kv_heads))
  v = stack(lambda i: einsum_in(i, "self_attn.v_proj.weight", kv_heads))
  tree = {
      "llm/embedder/input_embedding": sd[f"{prefix}embed_tokens.weight"],
      "llm/final_norm/scale": sd[f"{prefix}norm.weight"],
      "llm/layers/pre_attention_norm/scale": stack(lambda i: layer(i, "input_layernorm.weight")),
      "llm/layers/pre_ffw_norm/scale": stack(
          lambda i: layer(i, "post_attention_layernorm.weight")),
      "llm/layers/attn/attn_vec_einsum/w": stack(
          lambda i: layer(i, "self_attn.o_proj.weight").T.reshape(heads, head_dim, width)),
      "llm/layers/mlp/gating_einsum": stack(lambda i: np.stack(
          [layer(i, "mlp.gate_proj.weight").T, layer(i, "mlp.up_proj.weight").T])),
      "llm/layers/mlp/linear": stack(lambda i: layer(i, "mlp.down_proj.weight").T),
  }
  if kv_heads == heads:  # big_vision fuses q, k and v when there is no GQA
    tree["llm/layers/attn/qkv_einsum/w"] = np.stack([q, k, v], axis=1)
  else:
    tree["llm/layers/attn/q_einsum/w"] = q
    tree["llm/layers/attn/kv_einsum/w"] = np.stack([k, v], axis=1)
  return tree


make_torchvision_importable()  # on import, so `import transformers` after this works
