"""The one image preprocessing function shared by training, evaluation and serving.

`preprocess_image` decodes (if given encoded bytes), resizes with antialiasing to the
model's square input, and then either augments (train) or centre-crops (eval/serving)
exactly as OpenVLA fine-tuning does: a crop covering 90 % of the area with aspect
ratio 1 (random at train time, central at eval time) resized back to the input size,
then at train time brightness +-0.2, contrast and saturation in [0.8, 1.2] and hue
+-0.05, in that order. Output is uint8 [size, size, 3]: per-tower pixel normalisation
(SigLIP [-1, 1], DINOv2 ImageNet mean/std) lives inside the model, so it cannot differ
between training and serving. Randomness is stateless (a [2] seed per frame), so a
frame's augmentation depends only on the pipeline seed and its position in the stream.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf

from vla_jax.errors import InputError
from vla_jax.typed_config import require


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """OpenVLA's fine-tuning augmentation (the defaults are its values).

  Attributes:
    enabled: False = plain resize at train and eval time (no crop, no colour jitter).
    crop_scale: area fraction of the crop (random at train time, central at eval time).
    brightness: max absolute brightness delta (images in [0, 1]).
    contrast, saturation: (low, high) factors.
    hue: max absolute hue delta.
  """
  enabled: bool = True
  crop_scale: float = 0.9
  brightness: float = 0.2
  contrast: tuple = (0.8, 1.2)
  saturation: tuple = (0.8, 1.2)
  hue: float = 0.05

  def __post_init__(self):
    require(0.0 < self.crop_scale <= 1.0,
            f"augment.crop_scale must be in (0, 1], got {self.crop_scale}.")
    for name in ("contrast", "saturation"):
      low, high = getattr(self, name)
      require(0 <= low <= high, f"augment.{name} must be (low, high) with 0 <= low <= high, "
              f"got {getattr(self, name)}.")
    require(0 <= self.hue <= 0.5, f"augment.hue must be in [0, 0.5], got {self.hue}.")


def decode_image(image: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG bytes (scalar string) or uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  return tf.ensure_shape(tf.cast(image, tf.uint8), [None, None, 3])


def _crop_box(seed: Optional[tf.Tensor], scale: float) -> tf.Tensor:
  """[1, 4] normalised (y0, x0, y1, x1) of a square-ratio crop of `scale` area."""
  side = math.sqrt(scale)
  if seed is None:
    start = tf.fill([2], (1.0 - side) / 2.0)
  else:
    start = tf.random.stateless_uniform([2], seed, 0.0, 1.0 - side)
  return tf.concat([start, start + side], axis=0)[None]


def preprocess_image(image, size: int, *, train: bool,
                     config: AugmentConfig = AugmentConfig(),
                     seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """One camera frame -> the model's uint8 [size, size, 3] input.

  Args:
    image: encoded bytes (scalar tf.string) or uint8 [H, W, 3] (tf or numpy).
    size: output side (224 for OpenVLA).
    train: random crop + colour jitter (needs `seed`); False = the matching centre crop.
    config: AugmentConfig; `enabled=False` skips crops and jitter in both modes.
    seed: int [2] stateless seed, required when train and config.enabled.
  Returns:
    uint8 [size, size, 3].
  """
  image = decode_image(tf.convert_to_tensor(image))
  x = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [size, size], method="lanczos3",
                      antialias=True)
  x = tf.clip_by_value(x, 0.0, 1.0)
  if config.enabled:
    if train:
      if seed is None:
        raise ValueError("preprocess_image(train=True) with augmentation needs a [2] seed.")
      seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
      box = _crop_box(seeds[0], config.crop_scale)
    else:
      box = _crop_box(None, config.crop_scale)
    x = tf.image.crop_and_resize(x[None], box, [0], [size, size], method="bilinear")[0]
    if train:
      x = tf.clip_by_value(tf.image.stateless_random_brightness(
          x, config.brightness, seeds[1]), 0.0, 1.0)
      x = tf.clip_by_value(tf.image.stateless_random_contrast(
          x, *config.contrast, seed=seeds[2]), 0.0, 1.0)
      x = tf.clip_by_value(tf.image.stateless_random_saturation(
          x, *config.saturation, seed=seeds[3]), 0.0, 1.0)
      x = tf.clip_by_value(tf.image.stateless_random_hue(x, config.hue, seeds[4]), 0.0, 1.0)
  return tf.cast(tf.round(x * 255.0), tf.uint8)


def preprocess_for_serving(image: np.ndarray, size: int,
                           config: AugmentConfig = AugmentConfig()) -> np.ndarray:
  """Serving-time entry point: camera frame uint8 [H, W, 3] -> uint8 [size, size, 3].

  The evaluation branch of `preprocess_image` (centre crop when the model was trained
  with augmentation), so a served policy sees exactly what evaluation saw.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise InputError(f"preprocess_for_serving expects a uint8 [H, W, 3] frame, got "
                     f"{image.dtype} {image.shape}; convert the camera image to RGB uint8.")
  return preprocess_image(image, size, train=False, config=config).numpy()
