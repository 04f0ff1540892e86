"""Each resampling method of `models.posemb_resample` equals the framework it names.

big_vision resamples with `scipy.ndimage.zoom(order=1)`, transformers and timm with
`torch.nn.functional.interpolate` (bicubic, without / with antialiasing); every size pair
(up, down, odd, to one patch) must match them to float32 rounding.
"""

import numpy as np
import pytest
import scipy.ndimage
import torch

from vla_jax.errors import ConfigError
from vla_jax.models import posemb_resample

SIZES = [(4, 6), (4, 3), (16, 24), (37, 16), (5, 7), (7, 2), (3, 1), (16, 64)]


def _grid(n, seed=0):
  return np.random.default_rng(seed).standard_normal((n, n, 5)).astype(np.float32)


def _torch(grid, n_out, antialias):
  x = torch.from_numpy(grid.transpose(2, 0, 1)[None].copy())
  y = torch.nn.functional.interpolate(x, size=(n_out, n_out), mode="bicubic",
                                      align_corners=False, antialias=antialias)
  return y[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_methods_equal_their_reference(n_in, n_out):
  grid = _grid(n_in)
  ours = {m: posemb_resample.resample_grid(grid, (n_out, n_out), m)
          for m in posemb_resample.RESAMPLE_METHODS}
  np.testing.assert_allclose(ours["bicubic"], _torch(grid, n_out, False), atol=1e-5)
  np.testing.assert_allclose(ours["bicubic_antialias"], _torch(grid, n_out, True), atol=1e-5)
  zoom = n_out / n_in
  np.testing.assert_allclose(ours["bilinear_align_corners"],
                             scipy.ndimage.zoom(grid, (zoom, zoom, 1), order=1), atol=1e-5)
  if n_out > 1:  # the three are different functions
    assert np.abs(ours["bicubic"] - ours["bicubic_antialias"]).max() > 1e-3
    assert np.abs(ours["bicubic"] - ours["bilinear_align_corners"]).max() > 1e-3


def test_table_keeps_prefix_rows_and_refuses_unknown_methods():
  table = np.concatenate([np.full((1, 1, 5), 7.0), _grid(4).reshape(1, 16, 5)], axis=1)
  out = posemb_resample.resample_posemb_table(table, 1, 6, "bicubic")
  assert out.shape == (1, 37, 5) and np.all(out[0, 0] == 7.0)
  with pytest.raises(ConfigError, match="posemb_resample='bilinear'"):
    posemb_resample.resample_grid(_grid(4), (6, 6), "bilinear")
