"""Linear probes on visual-token features: how much object identity a layer keeps.

`object_image_set` renders a labelled image set from the tabletop catalogue: one class
per catalogue object (training and unseen objects alike), each shown alone on the
training tables and backgrounds at random positions. `student_features` mean-pools the
student's residual stream at the visual tokens after a chosen number of LLM blocks (0 =
the projected visual tokens); `teacher_features` mean-pools the frozen teacher's patch
features (the upper bound). `linear_probe` trains a linear classifier with the paper's
protocol (SGD, momentum 0.9, LR 0.1, batch 128, 40 epochs) on z-scored features (the
scoring keeps LR 0.1 stable for features of any scale) and reports top-1 accuracy on the
held-out split.
"""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from vla_jax.errors import InputError
from vla_jax.models.vla import VLA
from vla_jax.sim import catalogue as cat
from vla_jax.sim import render as render_lib
from vla_jax.sim import rollout as rollout_lib


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The paper's probe protocol (defaults) and the image set's size."""
  epochs: int = 40
  learning_rate: float = 0.1
  momentum: float = 0.9
  batch_size: int = 128
  images_per_object: int = 24
  test_fraction: float = 0.25
  seed: int = 0


def _object_crops(states, image_size: int, zoom: int) -> np.ndarray:
  """Renders at zoom x image_size and cuts an image_size window centred on object 0."""
  big = np.asarray(rollout_lib.render_batch(states, image_size * zoom))
  xy = np.asarray(states.obj_xy)[:, 0]
  uv = np.asarray(render_lib.project(np.concatenate([xy, np.zeros_like(xy[:, :1])], -1)))
  side = image_size * zoom
  corner = np.clip(np.round(uv * side).astype(int) - image_size // 2, 0, side - image_size)
  return np.stack([image[r:r + image_size, c:c + image_size]
                   for image, (c, r) in zip(big, corner)])


def object_image_set(images_per_object: int, image_size: int = 64, seed: int = 0,
                     objects: Sequence[int] = tuple(range(len(cat.OBJECTS))),
                     zoom: int = 3) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rendered scenes with one catalogue object each, zoomed in on the object.

  Objects are a few pixels wide in a full 64 px scene, where mean-pooled features are
  dominated by the table; so the scene is rendered at `zoom` times the resolution and
  an image_size window around the object is kept (zoom=1: the whole scene).

  Returns:
    (images uint8 [n, S, S, 3], labels int32 [n] (index into `objects`), unseen bool [n]:
    the object never appears in fine-tuning), n = len(objects) * images_per_object.
  """
  images, labels, unseen = [], [], []
  for label, obj in enumerate(objects):
    spec = dataclasses.replace(cat.SPLITS["train"], name=f"probe_{obj}", objects=(int(obj),))
    seeds = seed * 100_003 + obj * 1_000 + np.arange(images_per_object)
    states = rollout_lib.reset_batch(rollout_lib.seed_keys(seeds), spec)
    if zoom > 1:
      images.append(_object_crops(states, image_size, zoom))
    else:
      images.append(np.asarray(rollout_lib.render_batch(states, image_size)))
    labels += [label] * images_per_object
    unseen += [obj in cat.UNSEEN_OBJECTS] * images_per_object
  return np.concatenate(images), np.asarray(labels, np.int32), np.asarray(unseen)


def _bos_tokens(batch: int, bos_id: int = 1) -> np.ndarray:
  # Visual tokens follow BOS and attend causally, so the text after them cannot change
  # them: BOS alone gives exactly the visual features any prompt would.
  return np.full((batch, 1), bos_id, np.int32)


_FEATURE_FNS: Dict[Tuple[Any, int, int], Any] = {}


def _student_feature_fn(model: VLA, layer: int, bos_id: int):
  """One jitted feature extractor per (architecture, layer): params are an argument, so
  probing several checkpoints of one architecture compiles once."""
  key = (model.config, layer, bos_id)
  if key not in _FEATURE_FNS:
    def features(params, images):
      out = model.apply({"params": params}, images, _bos_tokens(images.shape[0], bos_id),
                        align_layer=layer)
      return out["align_hidden"].astype(jnp.float32).mean(axis=1)
    _FEATURE_FNS[key] = jax.jit(features)
  return _FEATURE_FNS[key]


def student_features(model: VLA, params: Any, images: np.ndarray, layer: int, *,
                     batch_size: int = 64, bos_id: int = 1) -> np.ndarray:
  """Mean-pooled visual-token hidden states after `layer` LLM blocks: float32 [n, D]."""
  depth = model.config.llm.depth
  if not 0 <= layer <= depth:
    raise InputError(f"layer must be in [0, {depth}] (blocks of the LLM), got {layer}.")
  features = _student_feature_fn(model, layer, bos_id)
  return np.concatenate([np.asarray(features(params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def teacher_features(teacher: Any, teacher_params: Any, images: np.ndarray, grid: int,
                     grid_match: str, *, batch_size: int = 64) -> np.ndarray:
  """Mean-pooled teacher patch features: float32 [n, teacher width]."""
  apply = jax.jit(lambda x: teacher.apply({"params": teacher_params}, x, grid, grid_match)
                  .astype(jnp.float32).mean(axis=1))
  images = images.astype(np.float32) / 255.0
  return np.concatenate([np.asarray(apply(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def split_indices(labels: np.ndarray, test_fraction: float, seed: int = 0
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """Stratified (train, test) index split: each class keeps `test_fraction` for testing."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in np.unique(labels):
    index = rng.permutation(np.flatnonzero(labels == label))
    cut = max(1, int(round(len(index) * test_fraction)))
    test.append(index[:cut])
    train.append(index[cut:])
  return np.concatenate(train), np.concatenate(test)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int, config: ProbeConfig = ProbeConfig(),
                 progress: bool = False,
                 extra: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None
                 ) -> Dict[str, float]:
  """Trains a linear classifier on features [n, D] and returns top-1 accuracies.

  Args:
    extra: more evaluation sets {name: (features, labels)}, reported as "<name>_top1".
  Returns:
    {"train_top1", "test_top1", "chance": 1 / num_classes, "<name>_top1"...}.
  """
  if train_x.ndim != 2 or len(train_x) != len(train_y):
    raise InputError(f"linear_probe expects features [n, D] and labels [n]; got "
                     f"{train_x.shape} and {np.shape(train_y)}.")
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  extra = {name: ((x - mean) / std, y) for name, (x, y) in (extra or {}).items()}
  dim = train_x.shape[1]
  params = {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}
  optimizer = optax.sgd(config.learning_rate, momentum=config.momentum)
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y):
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(config.seed)
  for _ in tqdm.trange(config.epochs, desc="probe", disable=not progress, leave=False):
    order = rng.permutation(len(train_x))
    for i in range(0, len(order), config.batch_size):
      batch = order[i:i + config.batch_size]
      params, opt_state = step(params, opt_state, jnp.asarray(train_x[batch], jnp.float32),
                               jnp.asarray(train_y[batch]))

  def top1(x, y):
    return float(np.mean(np.argmax(np.asarray(x @ params["w"] + params["b"]), -1) == y))

  return {"train_top1": top1(train_x, train_y), "test_top1": top1(test_x, test_y),
          "chance": 1.0 / num_classes,
          **{f"{name}_top1": top1(x, y) for name, (x, y) in extra.items()}}


def probe_features(features: np.ndarray, labels: np.ndarray, config: ProbeConfig = ProbeConfig(),
                   unseen: np.ndarray = None) -> Dict[str, float]:
  """Stratified split + `linear_probe`; also top-1 on unseen objects' test images."""
  train, test = split_indices(labels, config.test_fraction, config.seed)
  num_classes = int(labels.max()) + 1
  extra = {}
  if unseen is not None and unseen[test].any():
    sub = test[unseen[test]]
    extra["test_unseen"] = (features[sub], labels[sub])
  return linear_probe(features[train], labels[train], features[test], labels[test],
                      num_classes, config, extra=extra)
