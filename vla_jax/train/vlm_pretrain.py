"""VLM pretraining: the CPU-sized student learns to answer questions about renders.

The paper fine-tunes a VLM, a model that already answers questions about images, into a
VLA. Our CPU-sized student has no such checkpoint, and a freshly initialised LLM, even over
pretrained vision towers (`vla_jax.train.pretrain`), does not learn to read its visual
tokens within a CPU-sized fine-tuning run: the default policy decoded almost the same
first action token for every frame. This stage is our stand-in for the VLM's web
pretraining. The whole student (towers, projector, LLM) is trained with the fine-tuning
step's own loss on vision-language tasks over renders of every split's content
(`VLMPretrainConfig.tasks`):

"spatial" (the default; spatial question answering):
  where is the {object}?                    -> x, y on the table
  where is the {receptacle}?                -> x, y
  where is the gripper?                     -> x, y, height
  where is the {object} from the gripper?   -> dx, dy
  where is the {receptacle} from the gripper? -> dx, dy
  is the gripper open, holding the {object}, turned to it? -> opening, holding, yaw error
"caption": what is in the image? -> the scene's caption, in words (the caption the
  image-text teacher learns, `siglip_pretrain.caption`: target object and where it is
  relative to the target receptacle, the other objects and receptacles or VL-Think
  boards, table, background, gripper).
"vlthink" (VL-Think-style concept questions, on renders of every VL-Think family, whose
  boards show shapes, colours, arrows, digits, traffic signs and weather symbols):
  where is {the board with the star}?        -> x, y   (parity: "the board with the odd
                                                         number", the one odd or even digit)
  what shape is on the left board?           -> "star" (colour / arrow / number / sign /
                                                         symbol questions per family)
  is the number on the middle board odd or even? -> "odd"

Numbers are scaled to [-1, 1] (table coordinates / 0.22 m, height / 0.1 m - 1, yaw error
/ 0.8 rad) and written with the tokenizer's 256 reserved number ids, the ids that
fine-tuning then uses for action bins, as PaliGemma writes locations with its <loc>
tokens; words are ordinary text tokens. The prompt follows OpenVLA's layout (BOS, visual
tokens, "In: ...\\nOut:", then the answer and EOS). The labels are the simulator's scene
state; no demonstration action is used, and none of the questions asks what to do.
"""

import dataclasses
import logging
from typing import Any, Dict, List, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vla_jax.actions import ActionTokenizer
from vla_jax.data import batching
from vla_jax.errors import ConfigError, InputError
from vla_jax.experiment import Experiment
from vla_jax.text import Tokenizer
from vla_jax.typed_config import from_mapping

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
TASKS = ("spatial", "caption", "vlthink")
CAPTION_QUESTION = "what is in the image?"
BOARD_SLOTS = ("left", "middle", "right")  # VL-Think boards by slot; slot x grows to the right
# "what is on a board" per VL-Think family; {slot} is a BOARD_SLOTS word.
BOARD_QUESTIONS = {
    "shape": "what shape is on the {slot} board?",
    "colour": "what colour is the {slot} board?",
    "arrow": "where does the arrow on the {slot} board point?",
    "parity": "what number is on the {slot} board?",
    "sign": "what sign is on the {slot} board?",
    "weather": "what symbol is on the {slot} board?",
}
PARITY_QUESTION = "is the number on the {slot} board odd or even?"
# VL-Think kinds: 0-2 where is the board in slot k, 3-5 what is on it, 6-8 odd or even
# (parity; the other families ask 3-5 again).
VLTHINK_KINDS = 9
Answer = Union[np.ndarray, str]  # numbers in [-1, 1], or words


@dataclasses.dataclass(frozen=True)
class VLMPretrainConfig:
  """Tasks and optimisation of the VLM stage (AdamW, warmup + cosine decay).

  Attributes:
    tasks: which of TASKS the student learns (module docstring); "vlthink" renders every
      VL-Think family on top of the vision pretraining's splits.
    task_weights: how often each task's batch is drawn (one task per step, same order as
      `tasks`; empty: equally often).
    max_length: text tokens of a question batch; caption_max_length: of a caption batch.
    continue_from: the VLM stage this one continues (a VLMPretrainConfig, or a mapping of
      its overrides; `{}` is the default spatial-only stage): its pretrained student,
      built first if missing, is where this stage starts (fresh optimizer, warmup and
      cosine decay over `steps`), instead of the pretrained vision towers over a random
      LLM. None (the default): start from the vision towers.
  """
  steps: int = 1500
  batch_size: int = 16
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  max_length: int = 48
  seed: int = 0
  tasks: Tuple[str, ...] = ("spatial",)
  task_weights: Tuple[float, ...] = ()
  caption_max_length: int = 144
  continue_from: Any = None

  def __post_init__(self):
    if self.continue_from is not None and not isinstance(self.continue_from,
                                                         VLMPretrainConfig):
      object.__setattr__(self, "continue_from", from_mapping(
          VLMPretrainConfig, self.continue_from, "vlm_pretrain.continue_from"))
    unknown = [t for t in self.tasks if t not in TASKS]
    if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
      raise ConfigError(f"vlm_pretrain.tasks={tuple(self.tasks)!r}: name each of "
                        f"{', '.join(TASKS)} at most once (at least one).")
    if self.task_weights and (len(self.task_weights) != len(self.tasks) or
                              min(self.task_weights) <= 0):
      raise ConfigError(f"vlm_pretrain.task_weights={tuple(self.task_weights)!r} needs one "
                        f"positive weight per task of {tuple(self.tasks)!r} (or none).")

  def cache_setup(self) -> Dict[str, Any]:
    """The settings the pretrained VLM depends on (hashed into its cache key).

    A spatial-only stage hashes as before the task options existed, so the VLMs already
    cached stay valid.
    """
    setup = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if tuple(self.tasks) == ("spatial",):
      for key in ("tasks", "task_weights", "caption_max_length"):
        del setup[key]
    if self.continue_from is None:
      del setup["continue_from"]
    else:
      setup["continue_from"] = self.continue_from.cache_setup()
    return setup

  def probabilities(self) -> np.ndarray:
    weights = np.asarray(self.task_weights or [1.0] * len(self.tasks), np.float64)
    return weights / weights.sum()


def answer(scene: Dict[str, np.ndarray], row: int, kind: int) -> Tuple[str, np.ndarray]:
  """(question, answer numbers in [-1, 1]) of spatial question `kind` about frame `row`."""
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


def vlthink_answer(scene: Dict[str, np.ndarray], row: int, kind: int) -> Tuple[str, Answer]:
  """(question, answer) of VL-Think question `kind` (VLTHINK_KINDS) about frame `row`.

  The frame must show VL-Think boards (`scene["vlthink_family"][row]` non-empty).
  """
  from vla_jax.sim import catalogue  # pylint: disable=g-import-not-at-top
  family_name = str(scene["vlthink_family"][row])
  if not family_name:
    raise InputError(f"Frame {row} shows no VL-Think boards; VL-Think questions need "
                     "renders of a vlthink_* split.")
  family = catalogue.VLTHINK[family_name]
  items = str(scene["board_items"][row]).split("|")
  slot = kind % 3
  if kind < 3:
    if family_name == "parity":
      # Only the target's parity is unique on the table: ask where that board is.
      phrase, xy = str(scene["receptacle_name"][row]), scene["receptacle_xy"][row]
    else:
      phrase = family.phrase.format(item=items[slot])
      xy = np.array([catalogue.VLTHINK_BOARD_X[slot], catalogue.VLTHINK_BOARD_Y])
    return (f"where is {phrase}?",
            np.clip(np.asarray(xy, np.float64) / TABLE_SCALE, -1.0, 1.0))
  if kind >= 6 and family_name == "parity":
    return (PARITY_QUESTION.format(slot=BOARD_SLOTS[slot]),
            "odd" if int(items[slot]) % 2 else "even")
  return BOARD_QUESTIONS[family_name].format(slot=BOARD_SLOTS[slot]), items[slot]


def caption_answer(scene: Dict[str, np.ndarray], row: int, kind: int = 0) -> Tuple[str, str]:
  """(CAPTION_QUESTION, the caption of frame `row`); `kind` is unused."""
  del kind
  from vla_jax.train import siglip_pretrain  # pylint: disable=g-import-not-at-top
  return CAPTION_QUESTION, siglip_pretrain.caption(scene, row)


def example_batch(images: np.ndarray, examples: Sequence[Tuple[str, Answer]],
                  tokenizer: Tokenizer, action_tokenizer: ActionTokenizer, max_length: int,
                  pad_id: int) -> Dict[str, np.ndarray]:
  """A train-step batch (`vla_jax.train.step` contract) of (question, answer) pairs.

  Number answers follow "Out:" as "▁" and number ids, word answers as text tokens; then
  EOS, all supervised. "actions" holds the number answers zero-padded to MAX_ANSWER (only
  the answered ones count, so `action/l1` is the number answers' mean absolute error).
  """
  space = tokenizer.token_to_id("\u2581")
  tokens = np.full((len(examples), max_length), pad_id, np.int32)
  loss_mask = np.zeros((len(examples), max_length), bool)
  input_mask = np.zeros((len(examples), max_length), bool)
  numbers = np.zeros((len(examples), MAX_ANSWER), np.float32)
  for i, (question, value) in enumerate(examples):
    prompt = tokenizer.encode(f"In: {question}\nOut:", add_bos=True)
    batching.check_prompt_ids(np.asarray(prompt), action_tokenizer, tokenizer, question)
    if isinstance(value, str):
      target = tokenizer.encode(value, add_bos=False)
    else:
      prompt = prompt + [space]
      target = action_tokenizer.encode(value).tolist()
      numbers[i, :len(value)] = value
    ids = prompt + target + [tokenizer.eos_id]
    if len(ids) > max_length:
      raise InputError(f"Question {question!r} and its answer need {len(ids)} tokens > "
                       f"max_length {max_length}; raise VLMPretrainConfig.max_length "
                       "(caption_max_length for captions).")
    tokens[i, :len(ids)] = ids
    loss_mask[i, len(prompt):len(ids)] = True
    input_mask[i, :len(ids)] = True
  return {"images": np.asarray(images), "tokens": tokens, "input_mask": input_mask,
          "loss_mask": loss_mask, "actions": numbers}


def question_batch(scene: Dict[str, np.ndarray], rows: Sequence[int], kinds: Sequence[int],
                   tokenizer: Tokenizer, action_tokenizer: ActionTokenizer, max_length: int,
                   pad_id: int) -> Dict[str, np.ndarray]:
  """`example_batch` of spatial questions `kinds` about frames `rows`."""
  return example_batch(scene["images"][np.asarray(rows)],
                       [answer(scene, r, k) for r, k in zip(rows, kinds)],
                       tokenizer, action_tokenizer, max_length, pad_id)


_ASK = {"spatial": (answer, len(QUESTIONS)), "caption": (caption_answer, 1),
        "vlthink": (vlthink_answer, VLTHINK_KINDS)}


def _nearest_board(x: np.ndarray) -> np.ndarray:
  """VL-Think board slot (0, 1, 2) nearest each table x in answer units."""
  from vla_jax.sim import catalogue  # pylint: disable=g-import-not-at-top
  slots = np.asarray(catalogue.VLTHINK_BOARD_X) / TABLE_SCALE
  return np.argmin(np.abs(np.asarray(x, np.float64)[:, None] - slots), axis=1)


def _score_answers(predicted: np.ndarray, batch: Dict[str, np.ndarray],
                   action_tokenizer: ActionTokenizer, into: Dict[str, List[Any]]) -> None:
  """Adds one batch's teacher-forced answer statistics to the lists in `into`.

  right / tokens: answer tokens (and EOS) right / counted, per row; exact: whole answer
  right, per row; number_right / numbers: number tokens right / counted; l1: |decoded
  number - the true value| per answered number (the fine-tuning step's action/l1).
  """
  mask = batch["loss_mask"] & batch["input_mask"]
  right = (predicted == batch["tokens"]) & mask
  into["right"] += right.sum(1).tolist()
  into["tokens"] += mask.sum(1).tolist()
  into["exact"] += np.all(right | ~mask, axis=1).tolist()
  is_number = mask & action_tokenizer.is_action_token(batch["tokens"])
  into["number_right"].append(int((right & is_number).sum()))
  into["numbers"].append(int(is_number.sum()))
  for row in np.flatnonzero(is_number.any(1)):
    values = action_tokenizer.decode(predicted[row][is_number[row]])
    into["l1"] += np.abs(values - batch["actions"][row, :len(values)]).tolist()


def _held_out(start: int, stop: int) -> int:
  """First held-out row of frames [start, stop): the last 5 % (at least 48, at most 1/4)."""
  num = stop - start
  return stop - max(num // 20, min(48, num // 4))


def _task_rows(config: VLMPretrainConfig, num_spatial: int, num_total: int
               ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{task: (training rows, held-out rows)}; rows [0, num_spatial) are the vision
  pretraining's frames, [num_spatial, num_total) the VL-Think renders."""
  pools = {"spatial": (0, num_spatial), "vlthink": (num_spatial, num_total)}
  split = {name: (np.arange(a, _held_out(a, b)), np.arange(_held_out(a, b), b))
           for name, (a, b) in pools.items() if b > a}
  rows = {}
  for task in config.tasks:
    if task == "caption":  # every frame has a caption
      parts = list(split.values())
      rows[task] = (np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1][:120] for p in parts]))
    else:
      if task not in split:
        raise InputError(f"The {task!r} task has no frames to ask about; pass the VL-Think "
                         "renders (pretrain_vlm's vlthink_scene).")
      rows[task] = (split[task][0], split[task][1][:240])
  return rows


def pretrain_vlm(models: Any, experiment: Experiment, params: Dict[str, Any],
                 scene: Dict[str, np.ndarray], tokenizer: Tokenizer,
                 config: VLMPretrainConfig = VLMPretrainConfig(), *, progress: bool = True,
                 vlthink_scene: Union[Dict[str, np.ndarray], None] = None
                 ) -> Tuple[Dict[str, Any], Dict[str, float]]:
  """Trains the whole student on `config.tasks` with the fine-tuning step's loss.

  Args:
    models, experiment: as built for fine-tuning (`modeling.build_models`).
    params: {"student", "teacher", "projector"}; only the student changes.
    scene: `pretrain.render_keypoint_data` output of the vision pretraining's splits;
      vlthink_scene: the same of the VL-Think splits (needed by the "vlthink" task). The
      last 5 % of each (at least 48 frames, at most a quarter) are held out.
  Returns:
    (trained student params, held-out metrics of teacher-forced answers: "token_accuracy"
     (number tokens) and "l1" of the spatial questions (averaged over all six), with
     "l1_before" of the initial student and "l1_constant" of the best constant answer to
     each question; per task "<task>/token_accuracy" (every answer token and EOS),
     "<task>/exact" (whole answers right) and, for tasks with number answers, "<task>/l1"
     and "<task>/number_accuracy"; "vlthink/board_accuracy": "where is ..." answers whose
     x is nearest the right board (chance 1/3); each also as "..._before", of the
     initial student).
  """
  from vla_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if "vlthink" in config.tasks and vlthink_scene is None:
    raise InputError("VLMPretrainConfig.tasks includes 'vlthink' but no VL-Think renders "
                     "were given (vlthink_scene).")
  num_spatial = len(scene["images"])
  if "vlthink" in config.tasks:  # (checked above: its renders were given)
    boards = np.flatnonzero(vlthink_scene["vlthink_family"] != "")  # VL-Think frames only
    scene = {k: np.concatenate([scene[k], vlthink_scene[k][boards]]) for k in scene}
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

  @jax.jit
  def predict(student, batch):
    """Teacher-forced argmax token at every text position [B, T]."""
    out = step_lib.student_forward(models.student, student, batch)
    return jnp.argmax(step_lib.target_logits(experiment.model, out["logits"]), -1)

  rows = _task_rows(config, num_spatial, len(scene["images"]))
  # Kinds of the held-out questions: every kind in turn, so each one is measured.
  test_kinds = {t: np.arange(len(rows[t][1])) % _ASK[t][1] for t in config.tasks}
  lengths = {t: config.caption_max_length if t == "caption" else config.max_length
             for t in config.tasks}
  if "caption" in config.tasks:  # a too-long caption fails now, not after hours of training
    for r in range(len(scene["images"])):
      example_batch(scene["images"][:0], [caption_answer(scene, r)], tokenizer,
                    action_tokenizer, lengths["caption"], tokenizer.vocab_size)

  def make_batch(task, batch_rows, kinds):
    ask = _ASK[task][0]
    return example_batch(scene["images"][np.asarray(batch_rows)],
                         [ask(scene, r, k) for r, k in zip(batch_rows, kinds)], tokenizer,
                         action_tokenizer, lengths[task], tokenizer.vocab_size)

  def evaluate(state):
    student = state_lib.student_params(state, frozen, experiment.lora)
    out = {}
    for task in config.tasks:
      test_rows, kinds = rows[task][1], test_kinds[task]
      answers = {"right": [], "tokens": [], "exact": [], "number_right": [], "numbers": [],
                 "l1": [], "boards": []}
      for start in range(0, len(test_rows), 48):
        batch_kinds = kinds[start:start + 48]
        batch = make_batch(task, test_rows[start:start + 48], batch_kinds)
        predicted = np.asarray(predict(student, batch))
        _score_answers(predicted, batch, action_tokenizer, answers)
        if task == "vlthink":  # "where is ...": is the predicted x nearest the right board?
          where = batch_kinds < 3
          first = np.argmax(batch["loss_mask"][where], axis=1)
          x = action_tokenizer.decode(predicted[where][np.arange(len(first)), first])
          answers["boards"] += list(_nearest_board(x) ==
                                    _nearest_board(batch["actions"][where, 0]))
      right, count, exact = sum(answers["right"]), sum(answers["tokens"]), answers["exact"]
      out[f"{task}/token_accuracy"] = right / max(count, 1)
      out[f"{task}/exact"] = float(np.mean(exact))
      if answers["boards"]:
        out[f"{task}/board_accuracy"] = float(np.mean(answers["boards"]))
      if answers["l1"]:
        out[f"{task}/l1"] = float(np.mean(answers["l1"]))
        out[f"{task}/number_accuracy"] = sum(answers["number_right"]) / sum(answers["numbers"])
    return out

  before = evaluate(state)
  rng = np.random.default_rng(config.seed)
  probabilities = config.probabilities()
  for _ in tqdm.trange(config.steps, desc="pretrain VLM (" + ", ".join(config.tasks) + ")",
                       disable=not progress, leave=False):
    # A single task draws nothing here: the spatial-only stream is the one cached VLMs saw.
    task = (config.tasks[rng.choice(len(config.tasks), p=probabilities)]
            if len(config.tasks) > 1 else config.tasks[0])
    train_rows = rows[task][0]
    batch_rows = train_rows[rng.integers(0, len(train_rows), config.batch_size)]
    kinds = rng.integers(0, _ASK[task][1], config.batch_size)
    state, _ = train_step(state, frozen, make_batch(task, batch_rows, kinds))
  after = evaluate(state)
  metrics = {**after, **{f"{k}_before": v for k, v in before.items()}}
  if "spatial" in config.tasks:
    test_rows, kinds = rows["spatial"][1], test_kinds["spatial"]
    # The best constant answer to each question (per-number median over the training frames).
    train_rows = rows["spatial"][0]
    constant = [np.median([answer(scene, r, k)[1] for r in train_rows[::7]], axis=0)
                for k in range(len(QUESTIONS))]
    metrics.update(
        token_accuracy=after["spatial/number_accuracy"], l1=after["spatial/l1"],
        l1_before=before["spatial/l1"],
        l1_constant=float(np.mean([np.abs(answer(scene, r, k)[1] - constant[k]).mean()
                                   for r, k in zip(test_rows, kinds)])))
  logging.info("VLM pretrained: held-out %s", metrics)
  return jax.device_get(state_lib.student_params(state, frozen, experiment.lora)), metrics
