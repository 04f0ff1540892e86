"""Resampling a grid of learned position embeddings to another grid, as each framework does.

A ViT run at a resolution other than its checkpoint's needs its `[G, G, D]` table of
position embeddings on the new grid. The frameworks that publish our towers do this
differently, and the difference is not a rounding error (0.03-0.2 on embeddings of
unit scale at 40-96 px), so the method is part of loading a checkpoint faithfully:

| method | what | used by |
|---|---|---|
| `bilinear_align_corners` | linear, the grid's corner samples map onto each other (`scipy.ndimage.zoom(order=1)`) | big_vision (`vit.resample_posemb`): SigLIP and PaliGemma `.npz` |
| `bicubic` | cubic convolution with a = -0.75, half-pixel centres, edges clamped, no antialiasing (`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`) | transformers SigLIP / PaliGemma (`interpolate_pos_encoding`), transformers `Dinov2Model` |
| `bicubic_antialias` | cubic a = -0.5 (PIL's), half-pixel centres, the kernel widened by the scale when shrinking, weights renormalised at the edges (`interpolate(..., antialias=True)`) | timm (`resample_abs_pos_embed`): OpenVLA's towers; transformers `Dinov2WithRegistersModel` |

Every loader picks its format's method by default and takes `posemb_resample=` to
override it (`vla_jax.weights`). Resampling happens once, on the host, at load time.
"""

from typing import Callable, Dict, Tuple

import numpy as np

from vla_jax.errors import ConfigError, InputError

RESAMPLE_METHODS = ("bilinear_align_corners", "bicubic", "bicubic_antialias")


def _bilinear_align_corners(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights: output i samples input i * (n_in - 1) / (n_out - 1)."""
  weights = np.zeros((n_out, n_in))
  if n_out == 1 or n_in == 1:
    weights[:, 0] = 1.0
    return weights
  source = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  left = np.clip(np.floor(source).astype(int), 0, n_in - 2)
  frac = source - left
  weights[np.arange(n_out), left] = 1.0 - frac
  weights[np.arange(n_out), left + 1] += frac
  return weights


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bicubic (a = -0.75, align_corners=False)."""
  scale = n_in / n_out
  source = (np.arange(n_out) + 0.5) * scale - 0.5  # not clamped at 0 for cubic
  base = np.floor(source).astype(int)
  frac = source - base
  weights = np.zeros((n_out, n_in))
  for offset in (-1, 0, 1, 2):
    index = np.clip(base + offset, 0, n_in - 1)
    np.add.at(weights, (np.arange(n_out), index), _cubic(frac - offset, -0.75))
  return weights


def _bicubic_antialias(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's antialiased bicubic (PIL's filter, a = -0.5)."""
  scale = n_in / n_out
  support = 2.0 * max(scale, 1.0)
  inverse = 1.0 / max(scale, 1.0)
  weights = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = scale * (i + 0.5)
    low = max(int(centre - support + 0.5), 0)
    high = min(int(centre + support + 0.5), n_in)
    taps = np.arange(low, high)
    w = _cubic((taps - centre + 0.5) * inverse, -0.5)
    weights[i, low:high] = w / w.sum()
  return weights


_WEIGHTS: Dict[str, Callable[[int, int], np.ndarray]] = {
    "bilinear_align_corners": _bilinear_align_corners,
    "bicubic": _bicubic,
    "bicubic_antialias": _bicubic_antialias,
}


def check_method(method: str) -> str:
  """`method` if it is one of RESAMPLE_METHODS, else a ConfigError naming them."""
  if method not in _WEIGHTS:
    raise ConfigError(f"posemb_resample={method!r} is not a resampling method; choose one of "
                      f"{RESAMPLE_METHODS} (see vla_jax/models/posemb_resample.py), or leave "
                      "it unset for the checkpoint format's own.")
  return method


def resample_grid(grid: np.ndarray, new_size: Tuple[int, int], method: str) -> np.ndarray:
  """Resamples a [H, W, D] grid to [new_h, new_w, D] with `method` (float64 inside).

  Returns float32; the input itself (as float32) when the size already matches.
  """
  check_method(method)
  grid = np.asarray(grid, np.float64)
  if grid.ndim != 3:
    raise InputError(f"resample_grid expects a [H, W, D] grid, got shape {grid.shape}.")
  (h, w), (new_h, new_w) = grid.shape[:2], new_size
  if (h, w) == (new_h, new_w):
    return grid.astype(np.float32)
  rows, cols = _WEIGHTS[method](h, new_h), _WEIGHTS[method](w, new_w)
  return np.einsum("ih,jw,hwd->ijd", rows, cols, grid).astype(np.float32)


def resample_posemb_table(posemb: np.ndarray, num_prefix: int, new_grid: int,
                          method: str) -> np.ndarray:
  """[1, P + G*G, D] -> [1, P + new_grid**2, D]: the square grid resampled, the P leading
  (CLS) rows kept as they are."""
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise InputError(f"A position-embedding table must be [1, N, D], got shape {posemb.shape}.")
  prefix, rows = posemb[:, :num_prefix], posemb[0, num_prefix:]
  side = int(round(np.sqrt(rows.shape[0])))
  if side * side != rows.shape[0]:
    raise InputError(f"The position embedding has {rows.shape[0]} grid rows after "
                     f"{num_prefix} prefix rows, which is not a square grid; is a class-token "
                     "row mixed in (posemb_covers_cls)?")
  grid = resample_grid(rows.reshape(side, side, -1), (new_grid, new_grid), method)
  return np.concatenate([prefix, grid.reshape(1, new_grid * new_grid, -1)], axis=1)
