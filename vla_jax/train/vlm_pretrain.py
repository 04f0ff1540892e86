"""VLM pretraining: the CPU-sized student learns to answer spatial questions about renders.

The paper fine-tunes a VLM, a model that already answers questions about images, into a
VLA. Our CPU-sized student has no such checkpoint, and a freshly initialised LLM, even over
pretrained vision towers (`vla_jax.train.pretrain`), does not learn to read its visual
tokens within a CPU-sized fine-tuning run: the default policy decoded almost the same
first action token for every frame. This stage is our stand-in for the VLM's web
pretraining. The whole student (towers, projector, LLM) is trained with the fine-tuning
step's own loss on question answering over renders of every split's content:

  where is the {object}?                    -> x, y on the table
  where is the {receptacle}?                -> x, y
  where is the gripper?                     -> x, y, height
  where is the {object} from the gripper?   -> dx, dy
  where is the {receptacle} from the gripper? -> dx, dy
  is the gripper open, holding the {object}, turned to it? -> opening, holding, yaw error

Answers are numbers scaled to [-1, 1] (table coordinates / 0.22 m, height / 0.1 m - 1,
yaw error / 0.8 rad) and written with the tokenizer's 256 reserved number ids, the ids
that fine-tuning then uses for action bins, as PaliGemma writes locations with its
<loc> tokens. The prompt follows OpenVLA's layout (BOS, visual tokens, "In: ...\\nOut:",
"▁", answer, EOS). The labels are the simulator's scene state; no demonstration action is
used, and none of the questions asks what to do.
"""

import dataclasses
import logging
from typing import Any, Dict, Sequence, Tuple

import jax
import numpy as np
import tqdm

from vla_jax.actions import ActionTokenizer
from vla_jax.data import batching
from vla_jax.errors import InputError
from vla_jax.experiment import Experiment
from vla_jax.text import Tokenizer

TABLE_SCALE = 0.22  # m: half the table's side
HEIGHT_SCALE = 0.1  # m
YAW_SCALE = 0.8  # rad
MAX_ANSWER = 3  # numbers per answer
QUESTIONS = (
    "where is the {object}?",
    "where is the {receptacle}?",
    "where is the gripper?",
    "where is the {object} from the gripper?",
    "where is the {receptacle} from the gripper?",
    "is the gripper open, holding the {object}, turned to it?",
)


@dataclasses.dataclass(frozen=True)
class VLMPretrainConfig:
  """Optimisation of the question-answering stage (AdamW, warmup + cosine decay)."""
  steps: int = 1500
  batch_size: int = 16
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  max_length: int = 48
  seed: int = 0


def answer(scene: Dict[str, np.ndarray], row: int, kind: int) -> Tuple[str, np.ndarray]:
  """(question, answer numbers in [-1, 1]) of question `kind` about frame `row`."""
  obj, rec, ee = scene["object_xy"][row], scene["receptacle_xy"][row], scene["effector"][row]
  values = (
      obj / TABLE_SCALE,
      rec / TABLE_SCALE,
      np.append(ee[:2] / TABLE_SCALE, ee[2] / HEIGHT_SCALE - 1.0),
      (obj - ee[:2]) / TABLE_SCALE,
      (rec - ee[:2]) / TABLE_SCALE,
      np.array([2 * scene["gripper"][row] - 1, 2 * scene["holding"][row] - 1,
                scene["yaw_error"][row] / YAW_SCALE]),
  )[kind]
  question = QUESTIONS[kind].format(object=scene["object_name"][row],
                                    receptacle=scene["receptacle_name"][row])
  return question, np.clip(np.asarray(values, np.float64), -1.0, 1.0)


def question_batch(scene: Dict[str, np.ndarray], rows: Sequence[int], kinds: Sequence[int],
                   tokenizer: Tokenizer, action_tokenizer: ActionTokenizer, max_length: int,
                   pad_id: int) -> Dict[str, np.ndarray]:
  """A train-step batch (`vla_jax.train.step` contract) of questions about `rows`.

  "actions" holds the answer numbers, zero-padded to MAX_ANSWER (only the answered ones
  are supervised, so `action/l1` is the answers' mean absolute error).
  """
  space = tokenizer.token_to_id("\u2581")
  tokens = np.full((len(rows), max_length), pad_id, np.int32)
  loss_mask = np.zeros((len(rows), max_length), bool)
  input_mask = np.zeros((len(rows), max_length), bool)
  numbers = np.zeros((len(rows), MAX_ANSWER), np.float32)
  for i, (row, kind) in enumerate(zip(rows, kinds)):
    question, values = answer(scene, row, kind)
    prompt = tokenizer.encode(f"In: {question}\nOut:", add_bos=True) + [space]
    batching.check_prompt_ids(np.asarray(prompt), action_tokenizer, tokenizer, question)
    ids = prompt + action_tokenizer.encode(values).tolist() + [tokenizer.eos_id]
    if len(ids) > max_length:
      raise InputError(f"Question {question!r} needs {len(ids)} tokens > max_length "
                       f"{max_length}; raise VLMPretrainConfig.max_length.")
    tokens[i, :len(ids)] = ids
    loss_mask[i, len(prompt):len(ids)] = True
    input_mask[i, :len(ids)] = True
    numbers[i, :len(values)] = values
  return {"images": scene["images"][np.asarray(rows)], "tokens": tokens,
          "input_mask": input_mask, "loss_mask": loss_mask, "actions": numbers}


def pretrain_vlm(models: Any, experiment: Experiment, params: Dict[str, Any],
                 scene: Dict[str, np.ndarray], tokenizer: Tokenizer,
                 config: VLMPretrainConfig = VLMPretrainConfig(), *, progress: bool = True
                 ) -> Tuple[Dict[str, Any], Dict[str, float]]:
  """Trains the whole student on `scene` questions with the fine-tuning step's loss.

  Args:
    models, experiment: as built for fine-tuning (`modeling.build_models`).
    params: {"student", "teacher", "projector"}; only the student changes.
    scene: `pretrain.render_keypoint_data` output; its last 5 % of frames (at least 48,
      at most a quarter) are held out.
  Returns:
    (trained student params, held-out {"token_accuracy", "l1"} of teacher-forced answers,
     averaged over all questions, with "l1_before" of the initial student and
     "l1_constant" of the best constant answer to each question for comparison).
  """
  from vla_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  experiment = dataclasses.replace(
      experiment, align=dataclasses.replace(experiment.align, align_coeff=0.0))
  train_config = state_lib.TrainConfig(
      trainable="full", batch_size=config.batch_size, learning_rate=config.learning_rate,
      schedule="warmup_cosine", warmup_steps=config.warmup_steps, num_steps=config.steps,
      seed=config.seed)
  action_tokenizer = ActionTokenizer(vocab_size=tokenizer.vocab_size)
  state, frozen = state_lib.create_train_state(experiment, train_config, params,
                                               jax.random.key(config.seed))
  train_step = jax.jit(step_lib.make_train_step(models, experiment, train_config,
                                                action_tokenizer), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(models, experiment, action_tokenizer))
  num = len(scene["images"])
  train_rows = num - max(num // 20, min(48, num // 4))  # the rest is held out
  test_rows = np.arange(train_rows, num)[:240]
  test_kinds = np.arange(len(test_rows)) % len(QUESTIONS)
  make_batch = lambda rows, kinds: question_batch(
      scene, rows, kinds, tokenizer, action_tokenizer, config.max_length, tokenizer.vocab_size)
  # The best constant answer to each question (per-number median over the training frames).
  constant = [np.median([answer(scene, r, k)[1] for r in range(0, train_rows, 7)], axis=0)
              for k in range(len(QUESTIONS))]
  l1_constant = np.mean([np.abs(answer(scene, r, k)[1] - constant[k]).mean()
                         for r, k in zip(test_rows, test_kinds)])

  def evaluate(state):
    totals = {"action/token_accuracy": [], "action/l1": []}
    for start in range(0, len(test_rows), 48):
      metrics = eval_step(state, frozen, make_batch(test_rows[start:start + 48],
                                                    test_kinds[start:start + 48]))
      for key in totals:
        totals[key].append(float(metrics[key]))
    return {"token_accuracy": float(np.mean(totals["action/token_accuracy"])),
            "l1": float(np.mean(totals["action/l1"]))}

  before = evaluate(state)
  rng = np.random.default_rng(config.seed)
  for _ in tqdm.trange(config.steps, desc="pretrain VLM (question answering)",
                       disable=not progress, leave=False):
    rows = rng.integers(0, train_rows, config.batch_size)
    state, _ = train_step(state, frozen, make_batch(rows, rng.integers(0, len(QUESTIONS),
                                                                       config.batch_size)))
  metrics = {**evaluate(state), "l1_before": before["l1"], "l1_constant": float(l1_constant)}
  logging.info("VLM pretrained: held-out %s", metrics)
  return jax.device_get(state_lib.student_params(state, frozen, experiment.lora)), metrics
