"""Vision pretraining on tabletop renders, so that a CPU-sized VLA starts out seeing.

A real VLA fine-tunes a VLM whose vision towers were pretrained on the web, and the paper's
teacher is a pretrained vision model. The CPU-sized student and teacher have no such
checkpoints, and from random weights the student does not learn to read its camera within
a CPU-sized fine-tuning run: it memorises the action marginals and decodes the same tokens
for every frame. This module is our stand-in for that pretraining. A vision path (the
student's towers + projector, or the teacher's tower) learns from renders of every split's
content (all objects, receptacles, tables, backgrounds, blend textures, arm poses) to
  * locate the target object, the target receptacle, the end effector and the effector's
    ground point (where it is over the table; the oblique camera lifts the effector up the
    image with its height, so the two differ): per keypoint, a softmax over the
    visual-token grid and the offset inside the winning patch;
  * read, from the *mean* of the visual tokens, the effector's height, gripper opening,
    whether it holds the object, its yaw error to the object (modulo the object's grasp
    period), the keypoints, and the object's and receptacle's offsets from the effector
    on the table (metres / 0.1). The mean matters: a freshly initialised LLM attends almost uniformly over
    the visual tokens, so what the mean carries is what fine-tuning can use from step one
    (without these targets the fine-tuned policy still ignored the image).
Labels come from the simulator's state through the camera model (`sim.render.project`);
no demonstration action is used. The heads are thrown away afterwards. The teacher can
instead learn the way SigLIP did, from image-caption pairs with a sigmoid loss
(`PretrainConfig.teacher_objective="siglip"`, `vla_jax.train.siglip_pretrain`).

`ensure_pretrained(experiment)` builds both checkpoints on first use (rendering the data
once) and caches them by a hash of the architecture and `PretrainConfig`: the student's
vision subtrees in `student_vision.npz` (our parameter names, plus the config they were
made for) and the teacher tower in big_vision's `.npz` layout, so that it loads through
the normal teacher loader (`weights.teacher`, format big_vision).
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from vla_jax.errors import CheckpointError, ConfigError
from vla_jax.experiment import Experiment
from vla_jax.text import Tokenizer
from vla_jax.train import siglip_pretrain
from vla_jax.weights import npz

VERSION = 3  # bump when the data, labels or objective change (3: the expert's 8 mm XY_TOL)
STUDENT_VISION = ("siglip", "dino", "projector")
NUM_KEYPOINTS = 4  # target object, target receptacle, end effector, its ground point
# Effector height, gripper opening, holding, yaw error, the keypoints (u, v), object and
# receptacle offsets from the effector on the table (dx, dy).
NUM_GLOBAL = 4 + 2 * NUM_KEYPOINTS + 4
PRETRAIN_SPLITS = ("train", "carrot", "plate", "multi_plate", "vision_img", "tex03",
                   "whole03", "position", "ee_pose")
RENDER_SEED_BASE = 3_000_000  # render seeds, disjoint from demos and evaluation episodes
TEACHER_OBJECTIVES = ("keypoints", "siglip")
TEACHER_EXTRA_SPLITS = ("vlthink_shape", "vlthink_colour", "vlthink_arrow", "vlthink_parity",
                        "vlthink_sign", "vlthink_weather")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Data and optimisation of the vision pretraining.

  Attributes:
    splits: tabletop splits whose expert episodes are rendered.
    episodes_per_split, frames_per_episode: how many renders (random steps per episode).
    steps, batch_size, learning_rate, warmup_steps: AdamW with warmup + cosine decay.
    seed: data and initialisation seed.
    teacher_objective: how the teacher tower learns: "keypoints" (the heads above, as the
      student's vision) or "siglip" (`vla_jax.train.siglip_pretrain`: image-caption pairs
      with SigLIP's sigmoid loss, as big_vision trains SigLIP).
    teacher_extra_splits: splits the "siglip" teacher renders on top of `splits`
      (default: every VL-Think family, so the teacher sees every symbol).
  """
  splits: Tuple[str, ...] = PRETRAIN_SPLITS
  episodes_per_split: int = 200
  frames_per_episode: int = 6
  steps: int = 1200
  batch_size: int = 32
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  seed: int = 0
  teacher_objective: str = "keypoints"
  teacher_extra_splits: Tuple[str, ...] = TEACHER_EXTRA_SPLITS

  def __post_init__(self):
    if self.teacher_objective not in TEACHER_OBJECTIVES:
      raise ConfigError(f"teacher_objective={self.teacher_objective!r} is not one of "
                        f"{', '.join(TEACHER_OBJECTIVES)}.")

  def student_setup(self) -> Dict[str, Any]:
    """The settings the student's pretraining depends on (hashed into its cache key)."""
    setup = dataclasses.asdict(self)
    del setup["teacher_objective"], setup["teacher_extra_splits"]
    return setup

  def teacher_setup(self) -> Dict[str, Any]:
    """The settings the teacher's depends on (keypoint teachers hash as before the option)."""
    setup = self.student_setup()
    if self.teacher_objective != "keypoints":
      setup.update(teacher_objective=self.teacher_objective,
                   teacher_extra_splits=self.teacher_extra_splits)
    return setup


# ------------------------------------------------------------------------------- data
def render_keypoint_data(config: PretrainConfig, image_size: int, first_index: int = 0
                         ) -> Dict[str, np.ndarray]:
  """Renders expert-episode frames with their labels.

  Split i of `config.splits` renders episodes of seeds RENDER_SEED_BASE + 10_000 *
  (first_index + i) + 1_000 * config.seed + [0, episodes_per_split).

  Returns:
    {"images": uint8 [N, S, S, 3], "keypoints": float32 [N, 4, 2] image coordinates
     (u, v) in [0, 1] of the object, receptacle, effector and its ground point, "global": float32
     [N, NUM_GLOBAL] (module docstring), each target scaled to roughly unit range}, and the
    scene in world units for question answering (`vla_jax.train.vlm_pretrain`):
    "object_xy", "receptacle_xy" [N, 2] (m), "effector" [N, 3] (m), "gripper" (opening),
    "holding" (0/1), "yaw_error" (rad) [N], "object_name", "receptacle_name",
    "other_objects", "other_receptacles" ("|"-joined), "table_name", "background_name",
    "vlthink_family" (the split's VL-Think family or ""), "board_items" (VL-Think: the
    boards' items left to right, "|"-joined; else "") str [N].
  """
  from vla_jax.sim import catalogue, env, rollout  # pylint: disable=g-import-not-at-top
  from vla_jax.sim import render as render_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(config.seed)
  parts = []
  for index, split in enumerate(tqdm.tqdm(config.splits, desc="pretrain renders",
                                          leave=False)):
    start = RENDER_SEED_BASE + 10_000 * (first_index + index) + config.seed * 1_000
    keys = rollout.seed_keys(range(start, start + config.episodes_per_split))
    _, traj = rollout.expert_episodes(keys, split, render=False)
    lengths = np.asarray(traj["active"]).sum(axis=1)
    rows, cols = [], []
    for episode, length in enumerate(lengths):
      steps = rng.choice(int(length), min(config.frames_per_episode, int(length)), False)
      rows += [episode] * len(steps)
      cols += steps.tolist()
    states = jax.tree.map(lambda x: x[np.asarray(rows), np.asarray(cols)], traj["env_state"])
    receptacle = jax.vmap(lambda s: env.target_receptacle(s)[0])(states)
    zero = jnp.zeros_like(receptacle[:, :1])
    points = jnp.stack([
        jnp.concatenate([states.obj_xy[:, 0], states.obj_z[:, :1]], -1),
        jnp.concatenate([receptacle, zero], -1),
        states.ee,
        jnp.concatenate([states.ee[:, :2], zero], -1)], axis=1)
    yaw_error = env.yaw_error(states.obj_yaw[:, 0], states.ee_yaw,
                              env.grasp_periods(states.obj_id[:, 0]))
    keypoints = render_lib.project(points)  # [N, 4, 2]
    offsets = points[:, :2, :2] - states.ee[:, None, :2]  # object / receptacle - effector
    glob = jnp.concatenate([
        jnp.stack([states.ee[:, 2] / 0.1, states.gripper,
                   (states.held == 0).astype(jnp.float32), yaw_error / 0.8], -1),
        4.0 * (keypoints.reshape(-1, 2 * NUM_KEYPOINTS) - 0.5),
        offsets.reshape(-1, 4) / 0.1], -1)
    spec = catalogue.get_split(split)
    object_ids = np.asarray(states.obj_id[:, 0])
    receptacle_ids = np.asarray(jnp.take_along_axis(states.rec_id, states.target_rec[:, None],
                                                    axis=1)[:, 0])
    parts.append({"images": np.asarray(rollout.render_batch(states, image_size)),
                  "keypoints": np.asarray(keypoints, np.float32),
                  "global": np.asarray(glob, np.float32),
                  "object_xy": np.asarray(states.obj_xy[:, 0], np.float32),
                  "receptacle_xy": np.asarray(receptacle, np.float32),
                  "effector": np.asarray(states.ee, np.float32),
                  "gripper": np.asarray(states.gripper, np.float32),
                  "holding": np.asarray(states.held == 0, np.float32),
                  "yaw_error": np.asarray(yaw_error, np.float32),
                  "object_name": np.asarray([catalogue.OBJECTS[i].name for i in object_ids]),
                  "receptacle_name": np.asarray([env.receptacle_name(spec, int(i))
                                                 for i in receptacle_ids]),
                  **_scene_names(spec, states)})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _scene_names(spec: Any, states: Any) -> Dict[str, np.ndarray]:
  """Names of what else a frame shows (for `siglip_pretrain` captions): str [N] each."""
  from vla_jax.sim import catalogue, env  # pylint: disable=g-import-not-at-top
  rec_ids, targets = np.asarray(states.rec_id), np.asarray(states.target_rec)
  others = lambda ids, skip: "|".join(n for j, n in enumerate(ids) if j != skip)
  texture = lambda ids: np.asarray([catalogue.TEXTURES[int(i)].name for i in ids])
  family = spec.vlthink and catalogue.VLTHINK[spec.vlthink]
  return {
      "vlthink_family": np.asarray([spec.vlthink] * len(rec_ids)),
      # The boards' items left to right (rec_id is in slot order), e.g. "3|8|6".
      "board_items": np.asarray(["|".join(family.items[int(i)] for i in row) if family else ""
                                 for row in rec_ids]),
      "other_receptacles": np.asarray([
          others([env.receptacle_name(spec, int(i)) for i in row], int(target))
          for row, target in zip(rec_ids, targets)]),
      "other_objects": np.asarray([others([catalogue.OBJECTS[int(i)].name for i in row], 0)
                                   for row in np.asarray(states.obj_id)]),
      "table_name": texture(np.asarray(states.table_tex)),
      "background_name": texture(np.asarray(states.background_tex))}


# ------------------------------------------------------------------------------- objective
class KeypointHeads(nn.Module):
  """Per-patch (score, du, dv) for each keypoint and a global regression on the mean token."""

  @nn.compact
  def __call__(self, tokens):
    """tokens [B, N, D] -> ([B, N, NUM_KEYPOINTS, 3], [B, NUM_GLOBAL])."""
    batch, num, _ = tokens.shape
    per_patch = nn.Dense(NUM_KEYPOINTS * 3, name="patch")(tokens.astype(jnp.float32))
    glob = nn.Dense(NUM_GLOBAL, name="global")(tokens.astype(jnp.float32).mean(1))
    return per_patch.reshape(batch, num, NUM_KEYPOINTS, 3), glob


def keypoint_loss(per_patch, glob_pred, keypoints, glob, grid: int):
  """Cross-entropy over patches + offset and global squared errors.

  Returns:
    (loss, {"cross_entropy", "offset_mse", "global_mse", "patch_accuracy"}).
  """
  cell = jnp.clip(jnp.floor(keypoints * grid), 0, grid - 1).astype(jnp.int32)  # [B, K, 2]
  index = cell[..., 1] * grid + cell[..., 0]  # row-major over (v, u)
  scores = jnp.moveaxis(per_patch[..., 0], 1, 2)  # [B, K, N]
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(scores, index).mean()
  offsets = jnp.take_along_axis(jnp.moveaxis(per_patch[..., 1:], 1, 2),
                                index[..., None, None], axis=2)[:, :, 0]  # [B, K, 2]
  offset_mse = jnp.mean((jax.nn.sigmoid(offsets) - (keypoints * grid - cell)) ** 2)
  global_mse = jnp.mean((glob_pred - glob) ** 2)
  metrics = {"cross_entropy": cross_entropy, "offset_mse": offset_mse,
             "global_mse": global_mse,
             "patch_accuracy": jnp.mean(jnp.argmax(scores, -1) == index)}
  return cross_entropy + 10.0 * offset_mse + global_mse, metrics


def pretrain_tokens(encode: Callable[[Any, jax.Array], jax.Array], params: Any,
                    data: Dict[str, np.ndarray], grid: int, config: PretrainConfig,
                    *, desc: str = "pretrain", progress: bool = True
                    ) -> Tuple[Any, Dict[str, float]]:
  """Trains `params` so that `encode(params, images) -> [B, grid**2, D]` locates things.

  Returns:
    (trained params, held-out metrics of the last 5 % of the renders, never trained on).
  """
  held_out = max(len(data["images"]) // 20, 1)
  train = {k: v[:-held_out] for k, v in data.items()}
  test = {k: v[-held_out:][:256] for k, v in data.items()}
  heads = KeypointHeads()
  sample = encode(params, jnp.asarray(train["images"][:1]))
  trainable = {"vision": params,
               "heads": heads.init(jax.random.key(config.seed), sample)["params"]}
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.steps,
      config.learning_rate * 0.05))
  opt_state = optimizer.init(trainable)

  def loss_fn(trainable, images, keypoints, glob):
    per_patch, glob_pred = heads.apply({"params": trainable["heads"]},
                                       encode(trainable["vision"], images))
    return keypoint_loss(per_patch, glob_pred, keypoints, glob, grid)

  @jax.jit
  def step(trainable, opt_state, images, keypoints, glob):
    grads, _ = jax.grad(loss_fn, has_aux=True)(trainable, images, keypoints, glob)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  rng = np.random.default_rng(config.seed)
  for _ in tqdm.trange(config.steps, desc=desc, disable=not progress, leave=False):
    rows = rng.integers(0, len(train["images"]), config.batch_size)
    trainable, opt_state = step(trainable, opt_state, train["images"][rows],
                                train["keypoints"][rows], train["global"][rows])
  _, metrics = jax.jit(loss_fn)(trainable, test["images"], test["keypoints"], test["global"])
  return trainable["vision"], {k: float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------- files
def _vision_config(experiment: Experiment) -> Dict[str, Any]:
  """What the student's vision subtrees depend on (compute dtype and remat excluded)."""
  model = dataclasses.asdict(experiment.model)
  drop = ("dtype", "remat")
  tower = lambda t: None if t is None else {k: v for k, v in t.items() if k not in drop}
  return {"siglip": tower(model["siglip"]), "dino": tower(model["dino"]),
          "image_size": model["image_size"], "arch": model["arch"],
          "llm_width": model["llm"]["width"]}


def save_student_vision(path: str, params: Dict[str, Any], experiment: Experiment) -> None:
  """Writes the student's vision subtrees and the config they belong to as one `.npz`."""
  flat = npz.flatten({k: params[k] for k in STUDENT_VISION})
  flat["__config__"] = np.asarray(json.dumps(_vision_config(experiment), sort_keys=True))
  np.savez(path, **flat)


def _read_with_config(path: str, writer: str, missing: str
                      ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(flat arrays, the stored `__config__`) of an `.npz` written by `writer`."""
  if not os.path.exists(path):
    raise CheckpointError(missing)
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files}
  if "__config__" not in flat:
    raise CheckpointError(f"{path} holds no '__config__' entry; it was not written by "
                          f"{writer}.")
  return flat, json.loads(str(flat.pop("__config__")))


def load_student_vision(path: str, experiment: Experiment) -> Dict[str, Any]:
  """The vision subtrees in `path`; CheckpointError if they were made for other towers."""
  flat, stored = _read_with_config(
      path, "save_student_vision", f"No pretrained student vision at {path!r}; set "
      "weights.student_vision to a file written by save_student_vision, 'bundled', or '' "
      "for random towers.")
  wanted = json.loads(json.dumps(_vision_config(experiment), sort_keys=True))
  if stored != wanted:
    differs = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    raise CheckpointError(f"{path} was pretrained for other vision towers (differing: "
                          f"{differs}); pretrain for this model (weights.student_vision="
                          "'bundled' builds a matching one) or use '' for random towers.")
  return _unflatten(flat)


def _digest(*parts: Any) -> str:
  text = json.dumps([VERSION, *parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _student_config(experiment: Experiment) -> Dict[str, Any]:
  """What the whole student's parameters depend on (compute dtype and remat excluded)."""
  drop = ("dtype", "remat", "remat_policy")
  clean = lambda tree: {k: clean(v) if isinstance(v, dict) else v
                        for k, v in tree.items() if k not in drop}
  return clean(dataclasses.asdict(experiment.model))


def save_student(path: str, params: Dict[str, Any], experiment: Experiment,
                 tokenizer_digest: str) -> None:
  """Writes a whole student, the config it belongs to and its tokenizer's digest (.npz)."""
  flat = npz.flatten(params)
  flat["__config__"] = np.asarray(json.dumps(
      {"model": _student_config(experiment), "tokenizer": tokenizer_digest}, sort_keys=True))
  np.savez(path, **flat)


def _unflatten(flat: Dict[str, np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(value)
  return tree


def load_student(path: str, experiment: Experiment,
                 tokenizer_digest: Optional[str] = None) -> Dict[str, Any]:
  """The student in `path` (`save_student`); CheckpointError for another model/tokenizer."""
  flat, stored = _read_with_config(
      path, "save_student", f"No pretrained student at {path!r}; set weights.student to a "
      "checkpoint, 'bundled', or '' for a random student.")
  wanted = json.loads(json.dumps(_student_config(experiment), sort_keys=True))
  if stored["model"] != wanted:
    differs = sorted(k for k in set(stored["model"]) | set(wanted)
                     if stored["model"].get(k) != wanted.get(k))
    raise CheckpointError(f"{path} was pretrained for another student (differing: "
                          f"{differs}); weights.student='bundled' builds one for this model.")
  if tokenizer_digest is not None and stored["tokenizer"] != tokenizer_digest:
    raise CheckpointError(f"{path} was pretrained with another tokenizer; its token ids "
                          "would mean other words. Use the tokenizer it was built with "
                          "(config.tokenizer='bundled').")
  return _unflatten(flat)


def metrics_path(path: str) -> str:
  """Where the held-out metrics of the pretrained checkpoint `path` are written (.json)."""
  return os.path.splitext(path)[0] + ".json"


def file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


def _vlm_setup(vlm_config: Any, config: PretrainConfig) -> Dict[str, Any]:
  """What a VLM stage's student depends on besides the model, the vision pretraining's
  renders and the tokenizer (hashed into its cache key), with the stages it continues."""
  setup = vlm_config.cache_setup()
  if "vlthink" in vlm_config.tasks:
    if not any(split.startswith("vlthink_") for split in config.teacher_extra_splits):
      raise ConfigError("vlm_pretrain.tasks includes 'vlthink', whose questions are asked "
                        "about renders of pretrain.teacher_extra_splits, but those name no "
                        f"vlthink_* split ({tuple(config.teacher_extra_splits)!r}); keep "
                        "the default (every VL-Think family).")
    setup["vlthink_splits"] = config.teacher_extra_splits
  if vlm_config.continue_from is not None:
    setup["continue_from"] = _vlm_setup(vlm_config.continue_from, config)
  return setup


def ensure_pretrained(experiment: Experiment, config: PretrainConfig = PretrainConfig(),
                      cache_dir: Optional[str] = None, *, progress: bool = True,
                      parts: Tuple[str, ...] = ("student_vision", "teacher"),
                      vlm_config: Optional[Any] = None) -> Dict[str, str]:
  """Paths of the pretrained student (vision, whole VLM) and teacher, built on first use.

  Args:
    parts: which of "student_vision", "teacher" and "student" to build if missing (all
      are returned; a part not asked for may name a file that does not exist yet).
      "student" (`vla_jax.train.vlm_pretrain`) starts from the student vision and uses
      the bundled tokenizer.
    vlm_config: `vlm_pretrain.VLMPretrainConfig` of the "student" stage (default: its
      defaults); a stage that continues another (`continue_from`) builds that one first
      if it is missing (cached under its own key).
  Returns:
    {"student_vision": .npz of the student's towers + projector, "teacher": big_vision
     .npz of the teacher tower (a SigLIP teacher; a DINOv2 teacher is not pretrained
     here and gets ""), "student": .npz of the whole question-answering student}.
  """
  from vla_jax.train import vlm_pretrain  # pylint: disable=g-import-not-at-top
  from vla_jax import modeling  # pylint: disable=g-import-not-at-top
  from vla_jax.models import vla as vla_lib  # pylint: disable=g-import-not-at-top
  from vla_jax.sim import bundled  # pylint: disable=g-import-not-at-top
  from vla_jax.weights import siglip as siglip_weights  # pylint: disable=g-import-not-at-top
  root = os.path.join(bundled.cache_root(cache_dir), "pretrained")
  setup = config.student_setup()
  # Hashed in the layout it had before the teacher registry ({kind, vit, dino, layer}),
  # so the teachers already cached stay valid.
  teacher_config = {"dino": None, **experiment.teacher.to_mapping()}
  teacher_digest = _digest(teacher_config, experiment.model.grid, config.teacher_setup())
  paths = {
      "student_vision": os.path.join(
          root, f"student_vision_{_digest(_vision_config(experiment), setup)}.npz"),
      "teacher": "" if experiment.teacher.kind != "siglip" else os.path.join(
          root, f"teacher_{teacher_digest}.npz"),
  }
  vlm_config = vlm_config or vlm_pretrain.VLMPretrainConfig()
  tokenizer_path = bundled.bundled_tokenizer_path(cache_dir)
  tokenizer_digest = file_digest(tokenizer_path)
  paths["student"] = os.path.join(root, "student_" + _digest(
      _student_config(experiment), setup, _vlm_setup(vlm_config, config),
      tokenizer_digest) + ".npz")
  if ("student" in parts and not os.path.exists(paths["student"]) and
      vlm_config.continue_from is None):
    parts = tuple(parts) + ("student_vision",)  # the VLM stage starts from it
  missing = [k for k, p in paths.items() if k in parts and p and not os.path.exists(p)]
  if not missing:
    return paths
  start_student = ""  # the VLM this stage continues (built first if missing)
  if "student" in missing and vlm_config.continue_from is not None:
    start_student = ensure_pretrained(experiment, config, cache_dir, progress=progress,
                                      parts=("student",),
                                      vlm_config=vlm_config.continue_from)["student"]
  os.makedirs(root, exist_ok=True)
  start = time.perf_counter()
  logging.info("Pretraining %s on tabletop renders (first use; cached in %s).",
               " and ".join(missing), root)
  data = render_keypoint_data(config, experiment.model.image_size)
  extra = None  # renders of teacher_extra_splits (image-text teacher, VL-Think questions)
  if config.teacher_extra_splits and (
      ("teacher" in missing and config.teacher_objective == "siglip") or
      ("student" in missing and "vlthink" in vlm_config.tasks)):
    extra = render_keypoint_data(dataclasses.replace(config, splits=config.teacher_extra_splits),
                                 experiment.model.image_size, first_index=len(config.splits))
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(config.seed))
  grid = experiment.model.grid
  tmp = tempfile.mkdtemp(prefix=".tmp_pretrain_", dir=root)
  try:
    if "student_vision" in missing:
      student = params["student"]
      encode = lambda p, images: models.student.apply(
          {"params": {**student, **p}}, images, method=vla_lib.VLA.encode_images)
      vision, metrics = pretrain_tokens(encode, {k: student[k] for k in STUDENT_VISION},
                                        data, grid, config, desc="pretrain student vision",
                                        progress=progress)
      logging.info("Student vision pretrained: held-out %s", metrics)
      save_student_vision(os.path.join(tmp, "student_vision.npz"), vision, experiment)
      os.replace(os.path.join(tmp, "student_vision.npz"), paths["student_vision"])
    if "student" in missing:
      tokenizer = Tokenizer.from_path(tokenizer_path)
      if start_student:
        params = {**params, "student": load_student(start_student, experiment,
                                                    tokenizer_digest)}
      else:
        vision = load_student_vision(paths["student_vision"], experiment)
        params = {**params, "student": {**params["student"], **vision}}
      student, metrics = vlm_pretrain.pretrain_vlm(models, experiment, params, data,
                                                   tokenizer, vlm_config, progress=progress,
                                                   vlthink_scene=extra)
      save_student(os.path.join(tmp, "student.npz"), student, experiment, tokenizer_digest)
      with open(metrics_path(paths["student"]), "w") as f:
        json.dump(metrics, f, indent=1)
      os.replace(os.path.join(tmp, "student.npz"), paths["student"])
    if "teacher" in missing:
      encode = lambda p, images: models.teacher.apply(
          {"params": p}, images, grid, experiment.align.grid_match)
      if config.teacher_objective == "siglip":
        captioned = data
        if config.teacher_extra_splits:
          captioned = {k: np.concatenate([data[k], extra[k]]) for k in data}
        teacher, metrics = siglip_pretrain.pretrain_siglip(
            encode, params["teacher"], experiment.teacher.tower, captioned,
            Tokenizer.from_path(tokenizer_path), config, progress=progress)
      else:
        teacher, metrics = pretrain_tokens(encode, params["teacher"], data, grid, config,
                                           desc="pretrain teacher", progress=progress)
      with open(metrics_path(paths["teacher"]), "w") as f:
        json.dump(metrics, f, indent=1)
      logging.info("Teacher pretrained: held-out %s", metrics)
      siglip_weights.save_big_vision(os.path.join(tmp, "teacher.npz"),
                                     jax.device_get(teacher["tower"]))
      os.replace(os.path.join(tmp, "teacher.npz"), paths["teacher"])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Vision pretraining took %.0f s.", time.perf_counter() - start)
  return paths
