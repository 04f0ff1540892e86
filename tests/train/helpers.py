"""Small experiments and synthetic batches shared by the training tests."""

import dataclasses

import jax
import numpy as np

from configs.align import get_config
from vla_jax.actions import ActionTokenizer
from vla_jax.experiment import parse_config
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib

VOCAB = 384
ACTION_TOKENIZER = ActionTokenizer(vocab_size=VOCAB, n_bins=64)
ACTION_DIM = 3


def small_experiment(preset: str = "tiny", *, align_coeff: float = 0.2, lora: bool = False,
                     vocab_size: int = VOCAB, depth: int = 2, scan: bool = False):
  """The tiny preset with a small vocabulary and LLM depth, so steps compile in seconds;
  `scan` runs the LLM's and the towers' blocks under `nn.scan`."""
  config = get_config(preset)
  if scan:
    for part in ("llm", "siglip", "dino"):
      if config.model.get(part) is not None:
        config.model[part].scan = True
  config.model.llm.vocab_size = vocab_size
  config.model.llm.depth = depth
  config.align.align_layer = depth // 2
  config.align.align_coeff = align_coeff
  config.lora.enabled = lora
  config.lora.rank = 4
  return parse_config(config)


def make_batch(seed: int, batch_size: int = 4, length: int = 12, image_size: int = 64,
               tokenizer: ActionTokenizer = ACTION_TOKENIZER, action_dim: int = ACTION_DIM):
  """A right-padded OpenVLA-style batch: BOS, prompt of varying length, actions, EOS."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch_size, length), np.int32)
  input_mask = np.zeros((batch_size, length), bool)
  loss_mask = np.zeros((batch_size, length), bool)
  actions = rng.uniform(-1, 1, (batch_size, action_dim)).astype(np.float32)
  action_ids = tokenizer.encode(actions)
  for row in range(batch_size):
    prompt_len = int(rng.integers(3, length - action_dim - 1))
    prompt = [1] + list(rng.integers(3, 200, prompt_len - 1))
    ids = prompt + list(action_ids[row]) + [2]
    tokens[row, :len(ids)] = ids
    input_mask[row, :len(ids)] = True
    loss_mask[row, prompt_len:len(ids)] = True
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  return {"images": images, "tokens": tokens, "input_mask": input_mask,
          "loss_mask": loss_mask, "actions": actions}


def _config(**kwargs):
  return state_lib.TrainConfig(**{"trainable": "full", "batch_size": 4, "learning_rate": 1e-3,
                                  **kwargs})


def _with_coeff(experiment, coeff):
  return dataclasses.replace(experiment,
                             align=dataclasses.replace(experiment.align, align_coeff=coeff))


_TRAIN_STEPS = {}


def jitted_train_step(models, experiment, train_config):
  """The jitted train step of (experiment, train_config), built once per process.

  Tests that train the same setup share one function, so it is traced and compiled once
  (compiling, not running, is what a tiny model's step costs on the CPU).
  """
  key = (experiment, train_config)
  if key not in _TRAIN_STEPS:
    _TRAIN_STEPS[key] = jax.jit(step_lib.make_train_step(models, experiment, train_config,
                                                         ACTION_TOKENIZER))
  return _TRAIN_STEPS[key]


def _run(experiment, models, params, train_config, batches):
  state, frozen = state_lib.create_train_state(experiment, train_config, params,
                                               jax.random.key(1))
  train_step = jitted_train_step(models, experiment, train_config)
  history = []
  for batch in batches:
    state, metrics = train_step(state, frozen, batch)
    history.append(jax.device_get(metrics))
  return state, frozen, history
