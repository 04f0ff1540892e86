"""Run by test_multiprocess.py: one process of a short run of the tiny preset.

Usage: `python -m tests.train.multiprocess_script WORKDIR STEPS DATA_DIR TOKENIZER`.
The run is test_loop.py's small end-to-end config (random student and teacher, constant
learning rate, a log line per step) at global batch 8 with a 2-layer LLM, saving every
2 steps. It is multi-process exactly when the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID settings are in the environment, as a user's
`python -m vla_jax.main --config.distributed=True` launched by hand would be.
"""

import json
import os
import sys

from tests.train.test_loop import _config
from vla_jax.train import loop


def main():
  workdir, steps, data_dir, tokenizer = sys.argv[1:]
  config = _config((data_dir, tokenizer), int(steps), **{
      "train.batch_size": 8, "checkpoint_every": 2,
      # Two layers instead of four: compiling, not running, is what a step costs here.
      "model.llm.depth": 2, "align.align_layer": 1,
      "model.llm.vocab_size": 576,  # the test tokenizer's 556 ids + <PAD>, padded to 64
      "distributed": "JAX_NUM_PROCESSES" in os.environ})
  summary = loop.train(config, workdir)
  print(json.dumps({"summary": summary}, default=str))


if __name__ == "__main__":
  main()
