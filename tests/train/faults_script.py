"""Runs a small training job in its own process, for tests that signal or kill it.

Usage: python -m tests.train.faults_script DATA_DIR TOKENIZER WORKDIR NUM_STEPS
Errors end the process like `vla_jax.main` does: "error: <message>" on stderr, status 1.
"""

import sys

from tests.conftest import REPO
from vla_jax.errors import VlaJaxError
from vla_jax.experiment import load_config
from vla_jax.train import loop


def main(data_dir: str, tokenizer: str, workdir: str, num_steps: str) -> None:
  config = load_config(REPO / "configs" / "align.py", "tiny")
  config.tokenizer = tokenizer
  config.weights.student, config.weights.teacher = "", ""  # random weights: fast
  config.data.sources[0]["data_dir"] = data_dir
  config.data.shuffle_buffer = 64
  config.train.update(num_steps=int(num_steps), batch_size=4, warmup_steps=0,
                      schedule="constant")  # the program tests/train/test_faults.py compiles
  config.log_every, config.checkpoint_every, config.eval_every = 1, 100_000, 0
  try:
    loop.train(config, workdir)
  except VlaJaxError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(*sys.argv[1:])
