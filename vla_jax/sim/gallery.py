"""Pictures of the tabletop benchmark: first frames of every split and an expert episode.

  python -m vla_jax.sim.gallery --out docs/images [--size 128] [--seeds 64]

Writes `tabletop_splits.png` (one labelled first frame per split), `tabletop_expert.png`
(a strip of an expert episode) and `tabletop_expert.gif`, and prints the expert's success
rate per split over `--seeds` seeds.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from vla_jax.sim import catalogue as cat
from vla_jax.sim import rollout


def _label(image: np.ndarray, text: str) -> Image.Image:
  tile = Image.new("RGB", (image.shape[1], image.shape[0] + 14), (255, 255, 255))
  tile.paste(Image.fromarray(image), (0, 14))
  ImageDraw.Draw(tile).text((2, 1), text, fill=(0, 0, 0))
  return tile


def split_grid(size: int = 128, seed: int = 1, columns: int = 5) -> Image.Image:
  """A labelled grid of each split's first frame."""
  tiles = []
  for index, name in enumerate(cat.SPLITS):
    state = rollout.reset_batch(rollout.seed_keys([seed + index]), name)
    if cat.SPLITS[name].change_step >= 0:
      name += " (t=5 move)"
    tiles.append(_label(np.asarray(rollout.render_batch(state, size))[0], name))
  rows = -(-len(tiles) // columns)
  w, h = tiles[0].size
  grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
  for i, tile in enumerate(tiles):
    grid.paste(tile, ((i % columns) * w, (i // columns) * h))
  return grid


def expert_strip(split: str = "train", seed: int = 0, size: int = 128, count: int = 8):
  """(strip image of `count` evenly spaced frames, all frames) of one expert episode."""
  result = rollout.rollout(rollout.scripted_policy(), split, [seed], image_size=size,
                           frames=True, progress=False)
  frames = result.frames[:, 0]
  picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
  strip = np.concatenate([frames[i] for i in picks], axis=1)
  return _label(strip, result.instructions[0]), frames


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/images")
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--seeds", type=int, default=64)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  split_grid(args.size).save(os.path.join(args.out, "tabletop_splits.png"), optimize=True)
  strip, frames = expert_strip(size=args.size)
  strip.save(os.path.join(args.out, "tabletop_expert.png"), optimize=True)
  gif = [Image.fromarray(f) for f in frames]
  gif[0].save(os.path.join(args.out, "tabletop_expert.gif"), save_all=True,
              append_images=gif[1:], duration=120, loop=0)
  print(f"expert success over {args.seeds} seeds:")
  for name in cat.SPLITS:
    rate = rollout.expert_success(name, range(args.seeds)).mean()
    print(f"  {name:16s} {rate:.3f}")


if __name__ == "__main__":
  main()
