"""Input-pipeline throughput: frames/s at 224 px with augmentation, and peak host RAM.

Reads the tabletop-layout dataset (written to a temp dir with the tabletop contract,
unless --tabletop points at one) and the BridgeData sample, runs the training pipeline
(shuffle, decode, resize, OpenVLA augmentation, batching, no tokenisation) and prints
the median frames/s over --repeats timed windows of --batches batches after a warm-up,
plus the process's peak resident memory (resource.getrusage).

  python benchmarks/data_throughput.py [--bridge DIR] [--tabletop DIR]
"""

import argparse
import logging
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time

from tqdm import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vla_jax.data.pipeline import DataConfig, make_iterator  # pylint: disable=g-import-not-at-top


def _tabletop(data_dir: str) -> str:
  from tests.data.conftest import tabletop_episode, write_tabletop  # pylint: disable=g-import-not-at-top
  return write_tabletop(data_dir, episodes=[tabletop_episode(i, 40) for i in range(50)])


def measure(name: str, path: str, args, stats_dir: str) -> float:
  config = DataConfig(sources=[{"name": name, "data_dir": path}], image_size=224,
                      global_batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                      stats_dir=stats_dir)
  iterator = make_iterator(config, process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(iterator)
  rates = []
  for _ in tqdm(range(args.repeats), desc=name, leave=False):
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(iterator)
    rates.append(args.batches * args.batch_size / (time.perf_counter() - start))
  assert batch["observation"]["image_primary"].shape[1:] == (224, 224, 3)
  return statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bridge", default=str(REPO.parent / "shared" / "data" / "bridge_dataset"
                                              / "1.0.0"))
  parser.add_argument("--tabletop", default=None)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--shuffle_buffer", type=int, default=1000)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    tabletop = args.tabletop or _tabletop(tmp)
    results = {name: measure(name, path, args, os.path.join(tmp, "stats"))
               for name, path in (("tabletop", tabletop), ("bridge_dataset", args.bridge))}
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"cpu cores: {os.cpu_count()}, batch {args.batch_size}, 224 px, augmentation on, "
        f"median of {args.repeats} x {args.batches} batches")
  for name, rate in results.items():
    print(f"{name:16s} {rate:8.1f} frames/s")
  print(f"ratio tabletop / bridge: {results['tabletop'] / results['bridge_dataset']:.2f}")
  print(f"peak host RAM (ru_maxrss): {peak_mb:.0f} MB")


if __name__ == "__main__":
  main()
