"""The bundled default dataset: tabletop expert demos generated once and cached.

`bundled_dataset_dir()` returns an RLDS directory (dataset "tabletop", version 1.0.0:
`train` and `val` splits of the benchmark's training distribution at 64x64) and builds
it deterministically on first use. It is written into a temporary folder beside its final
place and renamed, so a crash never leaves a half-written dataset behind. The cache root
is `$VLA_JAX_CACHE`, else `~/.cache/vla_jax`; the folder name carries CONTENT_VERSION
(bump it whenever the simulator's content or dynamics change) and the sizes.
"""

import logging
import os
import shutil
import tempfile
from typing import Optional

from vla_jax.sim import demos

CONTENT_VERSION = 1
NUM_TRAIN = 300
NUM_VAL = 32
IMAGE_SIZE = 64
VAL_SEED_OFFSET = 1_000_000  # val seeds never collide with train seeds


def cache_root(cache_dir: Optional[str] = None) -> str:
  """`cache_dir`, else `$VLA_JAX_CACHE`, else `~/.cache/vla_jax`."""
  return cache_dir or os.environ.get("VLA_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "vla_jax")


def bundled_dataset_dir(cache_dir: Optional[str] = None, *, num_train: int = NUM_TRAIN,
                        num_val: int = NUM_VAL, image_size: int = IMAGE_SIZE,
                        progress: bool = True) -> str:
  """The RLDS directory of the bundled dataset (`.../tabletop/1.0.0`), built if missing.

  Args:
    cache_dir: cache root (default `cache_root()`).
    num_train, num_val: episodes (train seeds 0.., val seeds VAL_SEED_OFFSET..).
    image_size: image side in pixels.
  """
  root = cache_root(cache_dir)
  folder = os.path.join(root, f"tabletop_v{CONTENT_VERSION}_{num_train}x{num_val}_"
                              f"{image_size}px")
  path = os.path.join(folder, "tabletop", "1.0.0")
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  os.makedirs(root, exist_ok=True)
  logging.info("Building the bundled tabletop dataset in %s (first use).", folder)
  tmp = tempfile.mkdtemp(prefix=".tmp_tabletop_", dir=root)
  try:
    demos.write_demos(tmp, {
        "train": ("train", range(num_train)),
        "val": ("train", range(VAL_SEED_OFFSET, VAL_SEED_OFFSET + num_val)),
    }, image_size=image_size, progress=progress)
    try:
      os.rename(tmp, folder)
    except OSError:  # another process finished first; keep its copy
      if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


TOKENIZER_VOCAB = 512


def bundled_tokenizer_path(cache_dir: Optional[str] = None) -> str:
  """A Llama-style SentencePiece model trained on the bundled dataset's prompts.

  Built on first use next to the dataset (deterministic for the same dataset), so the
  embedded default needs no external tokenizer. 512 ids (byte fallback keeps any text
  encodable); OpenVLA's action tokens are its last 256 ids, as with Llama-2.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vla_jax import text  # pylint: disable=g-import-not-at-top
  dataset = bundled_dataset_dir(cache_dir)
  path = os.path.join(os.path.dirname(os.path.dirname(dataset)),
                      f"tokenizer_{TOKENIZER_VOCAB}.model")
  if os.path.exists(path):
    return path
  builder = tfds.builder_from_directory(dataset)
  instructions = sorted({
      step["language_instruction"].numpy().decode()
      for episode in builder.as_dataset(split="train")
      for step in episode["steps"].take(1)})
  prompts = [text.openvla_prompt(i) for i in instructions]
  text.train_sentencepiece(prompts, path, vocab_size=TOKENIZER_VOCAB)
  logging.info("Trained the bundled tokenizer on %d prompts: %s", len(prompts), path)
  return path
