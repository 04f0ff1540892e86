"""A trained tiny policy reads its camera: its actions follow the image and beat any constant.

The failure this guards against: a default run that decoded the same 7 action tokens for
every frame, whatever the image (a policy that learns the action marginal because the
image never reaches its logits, or reaches them differently in training and serving).
The task is made so that only the image tells the action: a bright square sits in one of
four quadrants and the action moves toward it; the instruction is the same for every
frame. The whole path runs: RLDS on disk, tf.data with augmentation, the training loop
from random weights, the checkpoint, `load_policy` with serving preprocessing and KV-cached
greedy decoding, on frames never seen in training.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.conftest import REPO
from vla_jax.data.writer import write_rlds
from vla_jax.eval import policy as policy_lib
from vla_jax.experiment import load_config
from vla_jax.text import openvla_prompt, train_sentencepiece
from vla_jax.train import loop

pytestmark = pytest.mark.slow  # trains for 150 steps

INSTRUCTION = "put the cube on the plate"
STEP = 0.02


def _frame(rng):
  """(image uint8 [64, 64, 3], action [7]): a square in a random quadrant, move toward it."""
  right, far = rng.integers(0, 2, 2)
  image = rng.integers(0, 40, (64, 64, 3)).astype(np.uint8)
  x0 = 36 + rng.integers(0, 8) if right else 4 + rng.integers(0, 8)
  y0 = 4 + rng.integers(0, 8) if far else 36 + rng.integers(0, 8)
  image[y0:y0 + 20, x0:x0 + 20] = (230, 200, 40)
  action = np.zeros(7, np.float32)
  action[0], action[1], action[6] = STEP if right else -STEP, STEP if far else -STEP, 1.0
  return image, action


def _episodes(seed, count, length=8):
  rng = np.random.default_rng(seed)
  episodes = []
  for index in range(count):
    steps = []
    for t in range(length):
      image, action = _frame(rng)
      steps.append({"observation": {"image": image, "state": np.zeros(7, np.float32)},
                    "action": action, "language_instruction": INSTRUCTION,
                    "is_first": t == 0, "is_last": t == length - 1,
                    "is_terminal": t == length - 1, "reward": 0.0, "discount": 1.0})
    episodes.append({"steps": steps, "episode_metadata": {"seed": seed * 1000 + index}})
  return episodes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("image_dependence")
  data_dir = write_rlds(str(root / "data"), "tabletop", {
      "train": lambda: _episodes(0, 40), "val": lambda: _episodes(1, 4)},
      metadata_features={"seed": tfds.features.Scalar(dtype=np.int64)})
  tokenizer = train_sentencepiece([openvla_prompt(INSTRUCTION)] * 8, root / "tok.model",
                                  vocab_size=300, action_ids=256)
  config = load_config(REPO / "configs" / "align.py", "tiny")
  config.tokenizer = str(tokenizer.path)
  config.weights.student, config.weights.teacher = "", ""  # random weights: no pretraining
  config.align.align_coeff = 0.0
  config.data.sources[0]["data_dir"] = data_dir
  config.data.shuffle_buffer = 320
  config.data.max_length = 96  # the small test tokenizer needs more ids per prompt
  config.data.action_horizon = 1  # one action per frame: OpenVLA's policy, as when written
  config.train.schedule = "constant"
  config.model.llm.depth = 2
  config.align.align_layer = 1
  # 150 steps: on frames never seen, L1 0.004 x the best constant's, every frame's
  # direction right (measured; at 80 steps 0.14 and 88 %, too close to the bounds below).
  config.train.num_steps = 150
  config.train.warmup_steps = 20
  config.log_every, config.checkpoint_every, config.eval_every = 50, 150, 0
  workdir = str(root / "run")
  loop.train(config, workdir)
  return workdir


def test_trained_policy_actions_follow_the_image(trained):
  policy = policy_lib.load_policy(trained)
  rng = np.random.default_rng(12345)  # frames never seen in training
  frames = [_frame(rng) for _ in range(32)]
  images = np.stack([f[0] for f in frames])
  targets = np.stack([f[1] for f in frames])
  actions = policy(images, [INSTRUCTION] * len(frames), np.zeros((len(frames), 7), np.float32))
  # Different frames, different actions: the direction follows the square.
  assert len({tuple(np.sign(a[:2]).tolist()) for a in actions}) >= 3, actions[:, :2]
  l1 = np.abs(actions[:, :2] - targets[:, :2]).mean()
  best_constant = np.abs(targets[:, :2] - np.median(targets[:, :2], 0)).mean()
  assert l1 < 0.5 * best_constant, (l1, best_constant)
  # Most frames move toward the square on both axes.
  assert (np.sign(actions[:, :2]) == np.sign(targets[:, :2])).all(1).mean() >= 0.8
