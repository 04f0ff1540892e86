"""Train-step speed on an accelerator: step time, tokens/s and MFU of the 7B-shaped step.

Builds `configs/align.py:PRESET` (default `openvla_7b`: its widths, heads, vocabulary,
image size, LoRA setup, teacher and batch) at reduced depth (`--llm_depth`,
`--vision_depth`: the student's SigLIP / DINOv2 towers and the teacher), so that one
accelerator holds it; random parameters are created by one jitted init whose outputs
are already sharded over all local devices (`sharding.sharded_init`: nothing is built
on one device first). The step is the real one (`step.make_train_step` through
`sharding.jit_train_step`, compiled ahead of time), on a synthetic batch of full-length
prompts ending in 7 action tokens + EOS. After `--warmup` steps it times `--steps` steps
(each waited for) and prints the median step time, frames/s, LLM tokens/s (text +
visual tokens) and the model FLOPs utilisation.

MFU = model FLOPs per step / (median step time x devices x peak FLOP/s per device).
Model FLOPs are analytic, 2 x (matmul parameters) x (tokens each part sees) per forward:
the student's LLM sees B x (text + visual) tokens, its towers and projector B x patches,
the teacher B x its own patches; training a part costs 3 forwards (forward, input
gradients, weight gradients), a LoRA-adapted part 2 (weight gradients of frozen kernels
are not needed; the adapters' own FLOPs are negligible), the frozen teacher 1. Attention
scores (S^2 terms) and rematerialised recomputation are not counted (MFU, not HFU). XLA's
own count (`compiled.cost_analysis()["flops"]`, per device) is printed beside it; XLA:CPU
and some versions count a `scan` body once, not once per layer (`--no-scan` to compare).
Peak FLOP/s per device: dense bf16 from the vendors' data sheets, picked by the device
kind (H100/H200/A100, TPU v4/v5e/v5p/v6e); `--peak_tflops` overrides (e.g. for fp32).

On an accelerator (one GPU, or every chip of a TPU VM; `--fsdp`/`--tensor` lay out the
mesh, default FSDP over all devices):
  python benchmarks/gpu_step.py --llm_depth=4 --vision_depth=4 [--steps 20]
      [--trainable lora|full] [--dtype bfloat16] [--remat nothing_saveable]
On CPU, as the tests run it (tiny preset, seconds):
  python benchmarks/gpu_step.py --smoke
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vla_jax import modeling  # noqa: E402
from vla_jax.actions import ActionTokenizer  # noqa: E402
from vla_jax.experiment import load_config, parse_config  # noqa: E402
from vla_jax.models import teachers  # noqa: E402
from vla_jax.train import sharding as sharding_lib  # noqa: E402
from vla_jax.train import state as state_lib  # noqa: E402
from vla_jax.train import step as step_lib  # noqa: E402
from vla_jax.typed_config import from_mapping  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "align.py")
ACTION_DIM = 7
# Dense bf16 peak FLOP/s per device (data sheets), first substring of device_kind to match.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5" or "TPU v5p"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
)


def peak_flops(device_kind: str) -> float:
  """Dense bf16 FLOP/s of one device of this kind; 0 when unknown (CPU)."""
  for key, flops in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return flops
  return 0.0


def build_config(args):
  """configs/align.py:PRESET at the requested depth, dtype, trainable set and layout."""
  config = load_config(CONFIG, args.preset)
  if args.trainable:
    config.lora.enabled = args.trainable == "lora"
    config.train.trainable = args.trainable
  config.train.compute_dtype = args.dtype
  config.train.remat_policy = args.remat
  if args.batch:
    config.train.batch_size = args.batch
  config.model.llm.depth = args.llm_depth
  config.align.align_layer = args.llm_depth // 2
  teacher = config.teacher[teachers.family(config.teacher.kind).key]  # the one that runs
  towers = [t for t in (config.model.siglip, config.model.dino, teacher) if t is not None]
  config.model.llm.scan = args.scan
  for tower in towers:
    tower.scan = args.scan
    tower.depth = args.vision_depth
  for tower in (config.model.siglip, config.model.dino):  # the trained towers follow --remat
    if tower is not None:
      tower.remat = args.remat != "none"
  if config.teacher.layer is not None and config.teacher.layer >= args.vision_depth:
    config.teacher.layer = None
  config.sharding.data, config.sharding.fsdp, config.sharding.tensor = (
      args.data, args.fsdp, args.tensor)
  return config


def synthetic_batch(experiment, batch_size: int, length: int, seed: int = 0):
  """Full-length rows: BOS, random prompt ids, 7 action tokens, EOS (no padding)."""
  rng = np.random.default_rng(seed)
  vocab = experiment.model.llm.vocab_size - 64  # the tokenizer's ids (64 padding ids)
  tokenizer = ActionTokenizer(vocab_size=vocab)
  actions = rng.uniform(-1, 1, (batch_size, ACTION_DIM)).astype(np.float32)
  prompt = length - ACTION_DIM - 1
  if prompt < 2:
    raise ValueError(f"--length {length} leaves no room for a prompt before "
                     f"{ACTION_DIM} action tokens + EOS; use at least {ACTION_DIM + 3}.")
  tokens = np.concatenate([
      np.ones((batch_size, 1), np.int32),
      rng.integers(3, vocab - 300, (batch_size, prompt - 1), dtype=np.int32),
      np.asarray(tokenizer.encode(actions), np.int32),
      np.full((batch_size, 1), 2, np.int32)], axis=1)
  loss_mask = np.zeros((batch_size, length), bool)
  loss_mask[:, prompt:] = True
  size = experiment.model.image_size
  images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  return {"images": images, "tokens": tokens, "input_mask": np.ones_like(loss_mask),
          "loss_mask": loss_mask, "actions": actions}, tokenizer


def _count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def model_flops(params, experiment, train_config, batch_size: int, length: int) -> float:
  """Analytic model FLOPs of one step (see the module docstring)."""
  model, student = experiment.model, params["student"]
  patches = batch_size * model.num_visual_tokens
  llm = student["llm"]
  llm_matmul = _count(llm) - _count(llm.get("embedder", {}))
  if model.llm.effective_tie_embeddings:  # the output layer reuses the embedding table
    llm_matmul += model.llm.vocab_size * model.llm.width
  towers = sum(_count(student[k]) for k in ("siglip", "dino", "projector") if k in student)
  teacher_cfg = experiment.teacher.tower
  teacher_patches = batch_size * (teacher_cfg.image_size // teacher_cfg.patch_size) ** 2
  passes = 3 if train_config.trainable == "full" else 2
  # freeze_vision trains no tower: forward + input gradients only into the projector.
  tower_passes = 1 if train_config.trainable == "freeze_vision" else passes
  flops = 2 * passes * llm_matmul * batch_size * (length + model.num_visual_tokens)
  flops += 2 * tower_passes * towers * patches
  if experiment.align.align_coeff > 0:
    flops += 2 * _count(params["teacher"]) * teacher_patches
    flops += 2 * 2 * _count(params["projector"]) * patches  # frozen: forward + input grads
  return float(flops)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="openvla_7b")
  parser.add_argument("--llm_depth", type=int, default=4)
  parser.add_argument("--vision_depth", type=int, default=4,
                      help="blocks of the student's towers and of the teacher")
  parser.add_argument("--trainable", default="", choices=("", "lora", "full"),
                      help="'' = the preset's (openvla_7b: lora)")
  parser.add_argument("--dtype", default="bfloat16", choices=state_lib.COMPUTE_DTYPES,
                      help="train.compute_dtype (parameters stay float32)")
  parser.add_argument("--remat", default="none", choices=state_lib.REMAT_POLICIES,
                      help="train.remat_policy of the LLM blocks (any value but none also "
                      "rematerialises the student's towers)")
  parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--batch", type=int, default=0, help="0: the preset's batch size")
  parser.add_argument("--length", type=int, default=0,
                      help="text tokens per row (0: the preset's data.max_length)")
  parser.add_argument("--data", type=int, default=1)
  parser.add_argument("--fsdp", type=int, default=-1)
  parser.add_argument("--tensor", type=int, default=1)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s per device (0: from the device kind)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny preset, 2 LLM / 1 vision blocks, batch 2, 3 steps (CPU)")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args()
  if args.smoke:
    args.preset, args.llm_depth, args.vision_depth = "tiny", 2, 1
    args.batch, args.length, args.steps, args.warmup = args.batch or 2, args.length or 16, 3, 1

  config = build_config(args)
  length = args.length or config.data.max_length
  # (1) Typed configs and the mesh, as vla_jax/train/loop.py does.
  experiment = parse_config(config)
  train_config = from_mapping(state_lib.TrainConfig, config.train, "train")
  sharding_config = from_mapping(sharding_lib.ShardingConfig, config.sharding, "sharding")
  experiment = state_lib.apply_train_overrides(experiment, train_config)
  state_lib.check_compatible(experiment, train_config)
  mesh = sharding_lib.make_mesh(sharding_config)
  sharding_lib.check_batch_size(train_config.batch_size, mesh, train_config.grad_accum_steps)
  models = modeling.build_models(experiment)

  # (2) Random parameters and the train state, created sharded by one jitted init.
  def init(key):
    params_key, state_key = jax.random.split(key)
    params = modeling.init_params(models, experiment, params_key)
    return state_lib.create_train_state(experiment, train_config, params, state_key)

  start = time.perf_counter()
  (state, frozen), (state_sharding, frozen_sharding) = sharding_lib.sharded_init(
      init, mesh, sharding_config, jax.random.key(train_config.seed))
  jax.block_until_ready((state, frozen))
  init_s = time.perf_counter() - start
  params = modeling.abstract_params(models, experiment)

  # (3) The real step, compiled ahead of time on the sharded arguments.
  host_batch, action_tokenizer = synthetic_batch(experiment, train_config.batch_size, length)
  batch = sharding_lib.shard_batch(host_batch, mesh)
  train_step = sharding_lib.jit_train_step(
      step_lib.make_train_step(models, experiment, train_config, action_tokenizer),
      mesh, state_sharding, frozen_sharding)
  start = time.perf_counter()
  compiled = train_step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per module
  xla_flops = float((cost or {}).get("flops", 0.0))
  memory = compiled.memory_analysis()

  # (4) Warm up, then time each step to completion.
  for _ in range(args.warmup):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)

  devices = jax.devices()
  kind = devices[0].device_kind
  peak = args.peak_tflops * 1e12 or peak_flops(kind)
  flops = model_flops(params, experiment, train_config, train_config.batch_size, length)
  llm_tokens = train_config.batch_size * (length + experiment.model.num_visual_tokens)
  mfu = flops / (step_s * len(devices) * peak) if peak else float("nan")
  xla_mfu = xla_flops / (step_s * peak) if peak else float("nan")  # already per device
  stats = devices[0].memory_stats() or {}
  result = {
      "preset": args.preset, "llm_depth": args.llm_depth, "vision_depth": args.vision_depth,
      "trainable": train_config.trainable, "dtype": train_config.compute_dtype,
      "remat": train_config.remat_policy, "scan": args.scan,
      "device": f"{len(devices)} x {kind}", "mesh": dict(mesh.shape),
      "batch_size": train_config.batch_size, "text_length": length,
      "params": _count(params), "params_trainable": _count(state.trainable),
      "init_s": init_s, "compile_s": compile_s, "step_s": step_s,
      "step_s_min": min(times), "frames_per_s": train_config.batch_size / step_s,
      "tokens_per_s": llm_tokens / step_s, "model_flops": flops,
      "xla_flops_per_device": xla_flops, "peak_flops_per_device": peak, "mfu": mfu,
      "xla_mfu": xla_mfu, "loss": float(metrics["loss/total"]),
      "compiled_gib": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 2 ** 30,
      "peak_in_use_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30,
  }
  print(f"{args.preset} at LLM depth {args.llm_depth}, vision depth {args.vision_depth} on "
        f"{result['device']} (mesh {result['mesh']}): {result['params'] / 1e9:.3f}B params, "
        f"{result['params_trainable'] / 1e6:.1f}M trainable ({result['trainable']}), "
        f"{result['dtype']} compute, remat {result['remat']}, scan {args.scan}")
  print(f"batch {result['batch_size']} x {length} text + "
        f"{experiment.model.num_visual_tokens} visual tokens; init {init_s:.1f} s, "
        f"compile {compile_s:.1f} s; compiled footprint {result['compiled_gib']:.2f} GiB/device"
        + (f", peak in use {result['peak_in_use_gib']:.2f} GiB" if stats else ""))
  print(f"step time (median of {args.steps}): {step_s * 1e3:.1f} ms; "
        f"{result['frames_per_s']:.1f} frames/s; {result['tokens_per_s']:.0f} tokens/s; "
        f"loss {result['loss']:.3f}")
  peak_note = f"peak {peak / 1e12:.0f} TFLOP/s per device" if peak else "peak unknown"
  print(f"model FLOPs/step (analytic) {flops / 1e12:.3f} T, XLA cost analysis "
        f"{xla_flops / 1e12:.3f} T per device; MFU {mfu:.1%} (analytic), {xla_mfu:.1%} (XLA); "
        f"{peak_note} ({kind}; --peak_tflops to set)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
