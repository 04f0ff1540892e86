"""Per-device memory of the real training step, from XLA's compiled program: no arrays.

Does the paper's recipe (`configs/align.py:openvla_7b`: LoRA rank 32 on every linear
layer, batch 8, SigLIP So400m teacher + alignment) fit in the 16 GiB of a TPU v5e chip?
This script answers without a 7B model in memory: it builds the train state the way
`vla_jax/train/loop.py` does, but under `jax.eval_shape` (shapes and dtypes only), gives
every leaf the sharding `sharding.tree_shardings` would, lowers the real
`step.make_train_step` through `sharding.jit_train_step` with `jax.ShapeDtypeStruct`
arguments on a mesh of 8 fake CPU devices, compiles it ahead of time, and prints XLA's
per-device memory analysis (arguments, outputs, temporaries, generated code, bytes
aliased by the donated state, and their total) in GiB.

Variants are named `{lora|full}[_bf16][_remat]`: `lora` is the preset's trainable set
(LoRA factors only, computed inside the layers; `lora..._materialised` adds W + s·A@B to
the kernels instead, `lora.in_layer=False`), `full` fine-tunes the whole student; `_bf16` sets
`train.compute_dtype=bfloat16` (activations; parameters and Adam moments stay float32,
the models have no bf16-parameter option); `_remat` sets
`train.remat_policy=nothing_saveable` (the LLM blocks) and `remat=True` on the student's
vision towers. Meshes: `fsdp8` (data 1, fsdp 8), `fsdp4_tensor2` (data 1, fsdp 4, tensor 2),
`data8` (pure data parallelism, for reference). By default the LLM and every tower use
`scan=True` (one compiled block per stack instead of 32 + 26 + 23 + 27 copies: minutes of
compile time less on 2 cores; `--no-scan` for the looped layout the presets default to).

The numbers are XLA:CPU's buffer assignment for the partitioned program. TPU and GPU
compilers fuse, lay out and schedule differently (and CPU may keep bf16 temporaries in
float32), so treat them as an estimate to within ~20%, not as a TPU measurement.

  python benchmarks/memory.py [--presets openvla_7b,paligemma_3b]
      [--variants lora,lora_bf16,...] [--meshes fsdp8,fsdp4_tensor2] [--json out.json]
"""

import argparse
import json
import os
import sys
import time

# Before jax is imported: the CPU client reads its device count once, at start-up.
NUM_DEVICES = 8
_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" {_COUNT_FLAG}={NUM_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from vla_jax import modeling  # noqa: E402
from vla_jax.actions import ActionTokenizer  # noqa: E402
from vla_jax.experiment import load_config, parse_config  # noqa: E402
from vla_jax.models import teachers  # noqa: E402
from vla_jax.train import sharding as sharding_lib  # noqa: E402
from vla_jax.train import state as state_lib  # noqa: E402
from vla_jax.train import step as step_lib  # noqa: E402
from vla_jax.typed_config import from_mapping  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "align.py")
GIB = 2 ** 30
BUDGET_GIB = 16.0  # one TPU v5e chip
ACTION_DIM = 7
MESHES = {
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
    "data8": dict(data=8, fsdp=1, tensor=1),
}
DEFAULT_VARIANTS = "lora,lora_remat,lora_bf16,lora_bf16_remat,full,full_bf16_remat"


def parse_variant(name: str) -> dict:
  """"lora_bf16_remat" -> {trainable, compute_dtype, remat, lora_in_layer}; ValueError
  names the grammar."""
  parts = name.split("_")
  if (parts[0] not in ("lora", "full") or not set(parts[1:]) <= {"bf16", "remat", "materialised"}
      or (parts[0] == "full" and "materialised" in parts)):
    raise ValueError(f"variant {name!r}: expected {{lora|full}}[_bf16][_remat] or "
                     "lora[_bf16][_remat]_materialised, e.g. lora_bf16_remat.")
  return dict(trainable=parts[0], compute_dtype="bfloat16" if "bf16" in parts else "float32",
              remat="remat" in parts, lora_in_layer="materialised" not in parts)


def variant_config(preset: str, variant: dict, scan: bool, batch_size: int):
  """configs/align.py:PRESET with the variant's trainable set, dtype, remat and scan."""
  config = load_config(CONFIG, preset)
  lora = variant["trainable"] == "lora"
  config.lora.enabled = lora
  config.lora.in_layer = variant["lora_in_layer"]
  config.train.trainable = "lora" if lora else "full"
  config.train.compute_dtype = variant["compute_dtype"]
  config.train.remat_policy = "nothing_saveable" if variant["remat"] else "none"
  if batch_size:
    config.train.batch_size = batch_size
  teacher = config.teacher[teachers.family(config.teacher.kind).key]  # the one that runs
  towers = [config.model.siglip, config.model.dino, teacher]
  towers = [t for t in towers if t is not None]
  config.model.llm.scan = scan
  for tower in towers:
    tower.scan = scan
  # train.remat_policy reaches the LLM only (state.apply_train_overrides); the student's
  # towers are trained too (LoRA or full), so they carry activations for the backward
  # pass. The teacher runs under stop_gradient and keeps none.
  for tower in (config.model.siglip, config.model.dino):
    if tower is not None:
      tower.remat = variant["remat"]
  return config


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def abstract_batch(experiment, batch_size: int, length: int, mesh) -> dict:
  """ShapeDtypeStructs of the step's batch contract (vla_jax/train/step.py), batch-sharded."""
  sharding = sharding_lib.batch_sharding(mesh)
  size = experiment.model.image_size
  shapes = {"images": ((batch_size, size, size, 3), jnp.uint8),
            "tokens": ((batch_size, length), jnp.int32),
            "input_mask": ((batch_size, length), jnp.bool_),
            "loss_mask": ((batch_size, length), jnp.bool_),
            "actions": ((batch_size, ACTION_DIM), jnp.float32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def measure(preset: str, variant_name: str, mesh_name: str, scan: bool, batch_size: int,
            length: int) -> dict:
  """Compiles one (preset, variant, mesh) train step from abstract arguments; its memory."""
  config = variant_config(preset, parse_variant(variant_name), scan, batch_size)
  length = length or config.data.max_length
  # Mirrors loop._train: typed configs, overrides, mesh, models, state, jitted step.
  experiment = parse_config(config)
  train_config = from_mapping(state_lib.TrainConfig, config.train, "train")
  sharding_config = sharding_lib.ShardingConfig(**MESHES[mesh_name])
  experiment = state_lib.apply_train_overrides(experiment, train_config)
  state_lib.check_compatible(experiment, train_config)
  mesh = sharding_lib.make_mesh(sharding_config)
  sharding_lib.check_batch_size(train_config.batch_size, mesh, train_config.grad_accum_steps)
  models = modeling.build_models(experiment)
  params = modeling.abstract_params(models, experiment)
  abstract_state = jax.eval_shape(
      lambda p: state_lib.create_train_state(experiment, train_config, p,
                                             jax.random.key(train_config.seed + 1)), params)
  state_sharding, frozen_sharding = sharding_lib.tree_shardings(abstract_state, mesh,
                                                                sharding_config)
  state, frozen = with_shardings(abstract_state, (state_sharding, frozen_sharding))
  # The tokenizer's vocabulary is the LLM's minus OpenVLA's / PaliGemma's 64 padding ids.
  action_tokenizer = ActionTokenizer(vocab_size=experiment.model.llm.vocab_size - 64)
  train_step = sharding_lib.jit_train_step(
      step_lib.make_train_step(models, experiment, train_config, action_tokenizer),
      mesh, state_sharding, frozen_sharding)
  batch = abstract_batch(experiment, train_config.batch_size, length, mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, frozen, batch).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row = {"preset": preset, "variant": variant_name, "mesh": mesh_name,
         "batch_size": train_config.batch_size, "text_length": length,
         "sequence_length": length + experiment.model.num_visual_tokens,
         "params_total": count(params), "params_student": count(params["student"]),
         "params_trainable": count(abstract_state[0].trainable),
         "compile_s": round(seconds, 1)}
  for key, field in (("arguments", "argument_size_in_bytes"),
                     ("outputs", "output_size_in_bytes"),
                     ("temporaries", "temp_size_in_bytes"),
                     ("code", "generated_code_size_in_bytes"),
                     ("alias", "alias_size_in_bytes")):
    row[key] = getattr(stats, field) / GIB
  # What must be resident at once: inputs, outputs not written in place of a donated
  # input, the scratch buffers and the program.
  row["total"] = (row["arguments"] + row["outputs"] - row["alias"] + row["temporaries"]
                  + row["code"])
  row["fits_16gib"] = row["total"] <= BUDGET_GIB
  # XLA's count for one device's share of the partitioned step (CPU cost model).
  row["tflop_per_device"] = float(cost.get("flops", float("nan"))) / 1e12
  return row


HEADER = ("| preset | variant | mesh | args | outputs | alias | temps | code | total (GiB) "
          "| fits 16 GiB | TFLOP / device | compile (s) |")


def format_row(r: dict) -> str:
  return (f"| {r['preset']} | {r['variant']} | {r['mesh']} | {r['arguments']:.2f} | "
          f"{r['outputs']:.2f} | {r['alias']:.2f} | {r['temporaries']:.2f} | "
          f"{r['code']:.3f} | **{r['total']:.2f}** | {'yes' if r['fits_16gib'] else 'no'} | "
          f"{r['tflop_per_device']:.2f} | {r['compile_s']:.0f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="openvla_7b,paligemma_3b",
                      help="comma-separated configs/align.py presets")
  parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                      help="comma-separated {lora|full}[_bf16][_remat]")
  parser.add_argument("--meshes", default="fsdp8,fsdp4_tensor2",
                      help=f"comma-separated, from {', '.join(MESHES)}")
  parser.add_argument("--batch", type=int, default=0,
                      help="global batch size (0: the preset's train.batch_size)")
  parser.add_argument("--length", type=int, default=0,
                      help="text tokens per example (0: the preset's data.max_length)")
  parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                      help="scan the LLM and tower blocks (compiles much faster)")
  parser.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = parser.parse_args()

  presets, variants, meshes = (s.split(",") for s in (args.presets, args.variants, args.meshes))
  for name in variants:
    parse_variant(name)
  unknown = [m for m in meshes if m not in MESHES]
  if unknown:
    parser.error(f"unknown mesh(es) {unknown}; choose from {', '.join(MESHES)}")
  assert jax.device_count() == NUM_DEVICES, (
      f"expected {NUM_DEVICES} CPU devices, found {jax.devices()}; unset a conflicting "
      f"{_COUNT_FLAG} in XLA_FLAGS.")
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
        f"scan={args.scan}", flush=True)
  rows, jobs = [], [(p, v, m) for p in presets for v in variants for m in meshes]
  for i, (preset, variant, mesh) in enumerate(jobs, 1):
    print(f"[{i}/{len(jobs)}] compiling {preset} {variant} on {mesh} ...", file=sys.stderr,
          flush=True)
    row = measure(preset, variant, mesh, args.scan, args.batch, args.length)
    print(f"  {row['total']:.2f} GiB per device, compiled in {row['compile_s']:.0f} s: "
          + format_row(row), file=sys.stderr, flush=True)
    rows.append(row)
    if args.json:  # after every row: a long run stopped early keeps what it measured
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
  print()
  for preset in presets:
    counted = {r["variant"].split("_")[0]: r for r in rows if r["preset"] == preset}
    first = next(iter(counted.values()))
    print(f"{preset}: {first['params_total'] / 1e9:.3f}B parameters (student "
          f"{first['params_student'] / 1e9:.3f}B), trainable: "
          + ", ".join(f"{k} {r['params_trainable'] / 1e6:.1f}M" for k, r in counted.items())
          + f"; batch {first['batch_size']}, {first['sequence_length']} LLM tokens per example")
  print()
  print(HEADER)
  print("|" + "---|" * HEADER.count(" | ") + "---|")
  for row in rows:
    print(format_row(row))


if __name__ == "__main__":
  main()
