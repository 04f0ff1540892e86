"""Forward-pass speed of our jitted Flax models vs the PyTorch references, same run.

For each model the PyTorch reference (transformers / timm, random weights, eval mode,
`torch.no_grad`) is built first, its weights are loaded into our model through our own
loaders (so both compute the same function; outputs are checked to agree), then both are
timed on the same inputs: `--repeats` runs after warm-up, median reported, ratio =
torch time / jax time (> 1 means we are faster).

Models: the SigLIP teacher (S/16 at 224 px by default), the `tiny` OpenVLA-layout
student of configs/align.py and a `small` one (bigger towers and LLM).

  python benchmarks/forward_vs_torch.py [--repeats 10] [--batch 4] [--only teacher,tiny]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.parity import torch_refs  # noqa: E402  (also makes transformers importable)
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vla_jax.models import dinov2 as dinov2_lib  # noqa: E402
from vla_jax.models import llm as llm_lib  # noqa: E402
from vla_jax.models import vit as vit_lib  # noqa: E402
from vla_jax.models.vla import VLA, VLAConfig  # noqa: E402
from vla_jax.weights import siglip as siglip_weights  # noqa: E402
from vla_jax.weights import vla as vla_weights  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (and compile, for jax)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_teacher(args, tmp):
  width, depth, heads, size, patch = 384, 12, 6, 224, 16
  torch.manual_seed(0)
  ref = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
      num_attention_heads=heads, image_size=size, patch_size=patch)).eval()
  ref.save_pretrained(tmp)
  config = vit_lib.ViTConfig(width=width, depth=depth, mlp_dim=4 * width, num_heads=heads,
                             patch_size=patch, image_size=size, pool_type="map")
  params = siglip_weights.load_hf_siglip(tmp, config)
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  forward = jax.jit(lambda p, x: vit_lib.ViT(config).apply({"params": p}, x)[1]["encoded"])
  x = jnp.asarray(images)

  def run_torch():
    with torch.no_grad():
      return ref(pixel_values=pixels).last_hidden_state

  diff = np.abs(np.asarray(forward(params, x)) - run_torch().numpy()).max()
  return (f"SigLIP teacher (w{width} d{depth}, {size}px, batch {args.batch})", diff,
          _median_seconds(lambda: forward(params, x).block_until_ready(), args.repeats),
          _median_seconds(run_torch, args.repeats))


def _student(name):
  if name == "tiny":  # configs/align.py:tiny
    return dict(size=64, patch=8, tower_width=64, tower_depth=3, tower_heads=4,
                llm=dict(vocab_size=576, width=128, depth=4, num_heads=4, num_kv_heads=2,
                         mlp_dim=256))
  return dict(size=112, patch=14, tower_width=256, tower_depth=7, tower_heads=4,
              llm=dict(vocab_size=32064, width=512, depth=8, num_heads=8, num_kv_heads=8,
                       mlp_dim=1376))


def bench_student(args, tmp, name):
  spec = _student(name)
  llm = spec["llm"]
  torch.manual_seed(0)
  refs = torch_refs.make_openvla_reference(
      spec["size"], spec["patch"], spec["tower_width"], spec["tower_width"],
      spec["tower_depth"], spec["tower_heads"], transformers.LlamaConfig(
          vocab_size=llm["vocab_size"], hidden_size=llm["width"], intermediate_size=llm["mlp_dim"],
          num_hidden_layers=llm["depth"], num_attention_heads=llm["num_heads"],
          num_key_value_heads=llm["num_kv_heads"], rms_norm_eps=1e-5))
  path = os.path.join(tmp, "model.safetensors")
  safetensors.torch.save_file(torch_refs.openvla_state_dict(refs), path)
  common = dict(width=spec["tower_width"], depth=spec["tower_depth"] - 1,
                num_heads=spec["tower_heads"], patch_size=spec["patch"], image_size=spec["size"],
                final_norm=False)
  config = VLAConfig(
      "openvla", llm_lib.LLMConfig(family="llama", norm_eps=1e-5, **llm),
      vit_lib.ViTConfig(mlp_dim=2 * spec["tower_width"], pool_type="none",
                        gelu_approximate=False, **common),
      dinov2_lib.DinoV2Config(num_registers=4, posemb_covers_cls=False, **common), spec["size"])
  params = vla_weights.load_hf_openvla(path, config)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(args.batch, spec["size"], spec["size"], 3)).astype(np.float32)
  tokens = rng.integers(3, llm["vocab_size"] - 64, size=(args.batch, 24)).astype(np.int32)
  tokens[:, 0] = 1
  mask = np.ones_like(tokens, dtype=bool)
  model = VLA(config)
  forward = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, align_layer=llm["depth"] // 2)
                    ["logits"])
  i, t = jnp.asarray(images), jnp.asarray(tokens)

  def run_torch():
    return torch_refs.prismatic_forward(refs, images, tokens, mask).logits

  diff = np.abs(np.asarray(forward(params, i, t)) - run_torch().numpy()).max()
  n_params = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  return (f"OpenVLA-layout student '{name}' ({n_params:.0f}M params, {spec['size']}px, "
          f"batch {args.batch})", diff,
          _median_seconds(lambda: forward(params, i, t).block_until_ready(), args.repeats),
          _median_seconds(run_torch, args.repeats))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--only", default="teacher,tiny,small")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | {os.cpu_count()} cores")
  rows = []
  for name in args.only.split(","):
    with tempfile.TemporaryDirectory() as tmp:
      rows.append(bench_teacher(args, tmp) if name == "teacher" else
                  bench_student(args, tmp, name))
  print("\n| model | max abs diff | jax (ms) | torch (ms) | torch / jax |")
  print("|---|---|---|---|---|")
  for title, diff, jax_s, torch_s in rows:
    print(f"| {title} | {diff:.1e} | {jax_s * 1e3:.1f} | {torch_s * 1e3:.1f} | "
          f"{torch_s / jax_s:.2f}x |")


if __name__ == "__main__":
  main()
