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

CONTENT_VERSION = 4
NUM_TRAIN = 1500
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


TOKENIZER_TEXT_PIECES = 512
TOKENIZER_ACTION_IDS = 256
TOKENIZER_VERSION = 2  # bump when the training texts or settings change


def benchmark_instructions() -> list:
  """Every instruction any tabletop split can produce, sorted (tokenizer training text).

  Templates x objects x receptacles, and every VL-Think phrase with every object: the
  bundled tokenizer then knows the words of the OOD splits too, not only the training
  split's 16 instructions.
  """
  from vla_jax.sim import catalogue as cat  # pylint: disable=g-import-not-at-top
  texts = {t.format(object=o.name, receptacle=r.name)
           for t in cat.TEMPLATES for o in cat.OBJECTS for r in cat.RECEPTACLES}
  for name, family in cat.VLTHINK.items():
    items = ("odd", "even") if name == "parity" else family.items
    texts |= {f"put the {o.name} on " + family.phrase.format(item=item)
              for item in items for o in cat.OBJECTS}
  return sorted(texts)


def bundled_tokenizer_path(cache_dir: Optional[str] = None) -> str:
  """A Llama-style SentencePiece model for the tabletop benchmark, with action ids of its own.

  Built on first use in the cache root (deterministic: single-threaded training on
  `benchmark_instructions()` as OpenVLA prompts), so the embedded default needs no
  external tokenizer. Ids: 0/1/2 = unk/BOS/EOS, up to TOKENIZER_TEXT_PIECES text pieces
  (byte fallback keeps any text encodable), then TOKENIZER_ACTION_IDS reserved control
  pieces that no text encodes to: the action tokenizer's bins are those last ids, so
  actions never share an embedding with a word (OpenVLA's overwrite of Llama-2's last
  256 ids is only safe because those pieces are rare in English).
  """
  from vla_jax import text  # pylint: disable=g-import-not-at-top
  root = cache_root(cache_dir)
  path = os.path.join(root, f"tokenizer_v{TOKENIZER_VERSION}_{TOKENIZER_TEXT_PIECES}"
                            f"+{TOKENIZER_ACTION_IDS}.model")
  if os.path.exists(path):
    return path
  prompts = [text.openvla_prompt(i) for i in benchmark_instructions()]
  # Write beside the final path and rename: concurrent first uses never read half a file.
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_tokenizer_", dir=root)
  try:
    text.train_sentencepiece(prompts, os.path.join(tmp, "tok.model"),
                             vocab_size=TOKENIZER_TEXT_PIECES, action_ids=TOKENIZER_ACTION_IDS)
    os.replace(os.path.join(tmp, "tok.model"), path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Trained the bundled tokenizer on %d prompts: %s", len(prompts), path)
  return path
