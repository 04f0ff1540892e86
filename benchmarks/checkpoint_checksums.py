"""What checkpoint checksums cost: a save and a restore with and without them.

  python benchmarks/checkpoint_checksums.py [--preset tiny] [--repeats 5] [--mib 256]

Builds the preset's train state the way `train/loop.py` does (random weights, one
device) and times, after one warm-up call of each (compiles and first writes):
`checksums.make_record` alone (one jitted pass over the train state and the inference
params); a synchronous `checkpoint.save` (checksums included) against the same four Orbax
items saved without them (what `save` wrote before); and `checkpoint.restore` (checksums
verified) against a plain Orbax restore of the same items. Repeats interleave the two
sides, so a busy machine slows both alike; the script prints medians. A last line gives
the checksum throughput on one `--mib` MiB float32 array.
"""

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vla_jax import modeling
from vla_jax.actions import NormStats
from vla_jax.experiment import load_config, parse_config
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import checksums
from vla_jax.train import state as state_lib
from vla_jax.typed_config import from_mapping

STATS = {"tabletop": NormStats(mean=[0.0] * 7, std=[1.0] * 7, min=[-1.0] * 7, max=[1.0] * 7,
                               q01=[-1.0] * 7, q99=[1.0] * 7, mask=[True] * 6 + [False])}


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--mib", type=int, default=256)
  args = parser.parse_args()

  config = load_config("configs/align.py", args.preset)
  train_config = from_mapping(state_lib.TrainConfig, config.train, "train")
  experiment = state_lib.apply_train_overrides(parse_config(config), train_config)
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))
  state, frozen = state_lib.create_train_state(experiment, train_config, params,
                                               jax.random.key(1))
  inference = state_lib.student_params(state, frozen, experiment.lora)
  assets = ckpt_lib.make_assets(experiment, STATS)
  storable = state.replace(rng=jax.random.key_data(state.rng))
  leaves = len(jax.tree.leaves(storable)) + len(jax.tree.leaves(inference))
  size = _nbytes(storable) + _nbytes(inference)
  print(f"preset {args.preset}: train state {_nbytes(storable) / 2**20:.1f} MiB + inference "
        f"params {_nbytes(inference) / 2**20:.1f} MiB, {leaves} arrays, on "
        f"{jax.devices()[0].platform}")

  record = lambda: checksums.make_record({"train_state": storable, "params": inference},
                                         {"assets": assets, "data_iterator": {}})
  first = _timed(record)
  with tempfile.TemporaryDirectory() as directory:
    manager = ckpt_lib.make_manager(directory, max_to_keep=0, async_save=False)
    step = iter(range(1, 10_000))

    def save_with() -> None:
      ckpt_lib.save(manager, next(step), state, inference, assets, {})

    def save_without() -> None:
      manager.save(next(step), args=ocp.args.Composite(
          train_state=ocp.args.StandardSave(storable), params=ocp.args.StandardSave(inference),
          assets=ocp.args.JsonSave(assets), data_iterator=ocp.args.JsonSave({})))

    abstract = jax.eval_shape(lambda: state)
    target = ckpt_lib._with_shardings(  # pylint: disable=protected-access
        jax.eval_shape(lambda: storable), None)

    def restore_with() -> None:
      ckpt_lib.restore(manager, abstract, step=1)

    def restore_without() -> None:
      manager.restore(1, args=ocp.args.Composite(
          train_state=ocp.args.StandardRestore(target), assets=ocp.args.JsonRestore(),
          data_iterator=ocp.args.JsonRestore()))

    timings = {name: [] for name in ("record", "save_with", "save_without", "restore_with",
                                     "restore_without")}
    for fn in (save_with, save_without, restore_with, restore_without):
      fn()  # warm-up
    for _ in range(args.repeats):
      timings["record"].append(_timed(record))
      for name, fn in (("save_with", save_with), ("save_without", save_without),
                       ("restore_with", restore_with), ("restore_without", restore_without)):
        timings[name].append(_timed(lambda: fn() or 0))
    manager.close()
  med = {name: statistics.median(values) for name, values in timings.items()}
  print(f"checksums alone: {med['record'] * 1e3:.1f} ms ({size / med['record'] / 1e9:.2f} GB/s;"
        f" first call incl. compile {first:.2f} s)")
  for what in ("save", "restore"):
    with_, without = med[f"{what}_with"], med[f"{what}_without"]
    print(f"{what}: {with_ * 1e3:.1f} ms with checksums, {without * 1e3:.1f} ms without "
          f"(+{(with_ - without) * 1e3:.1f} ms, {100 * (with_ / without - 1):+.1f} %)")

  big = jnp.asarray(np.random.default_rng(0).normal(size=args.mib * 2**18), jnp.float32)
  checksums.array_checksums([big])  # compile
  seconds = statistics.median(_timed(lambda: checksums.array_checksums([big]) and 0)
                              for _ in range(args.repeats))
  print(f"one {args.mib} MiB float32 array: {seconds * 1e3:.0f} ms "
        f"({args.mib * 2**20 / seconds / 1e9:.2f} GB/s)")


if __name__ == "__main__":
  main()
