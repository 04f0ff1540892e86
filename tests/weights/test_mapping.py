"""The rule engine: everything wrong with a checkpoint is reported at once, before reading."""

import jax
import numpy as np
import pytest

from vla_jax.errors import CheckpointError
from vla_jax.weights.mapping import Rule, linear, load_params, nest, stacked


class _CountingSource(dict):
  """A checkpoint mapping that records which tensors were read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.reads = []

  def __getitem__(self, key):
    self.reads.append(key)
    return super().__getitem__(key)

  def shape(self, key):  # like the lazy readers: shapes and dtypes come from headers
    return dict.__getitem__(self, key).shape

  def dtype(self, key):
    return dict.__getitem__(self, key).dtype


def _expected():
  return {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), np.float32)},
          "layers": {"w": jax.ShapeDtypeStruct((2, 5), np.float32)}}


def _rules():
  return [Rule.copy("dense/kernel", "fc.weight", linear),
          stacked("layers/w", ["l.0.w", "l.1.w"])]


def test_loads_transforms_and_stacks():
  source = {"fc.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "l.0.w": np.zeros(5, np.float32), "l.1.w": np.ones(5, np.float32)}
  params = load_params(source, _rules(), _expected())
  np.testing.assert_array_equal(params["dense"]["kernel"], source["fc.weight"].T)
  np.testing.assert_array_equal(params["layers"]["w"], np.stack([np.zeros(5), np.ones(5)]))


def test_all_problems_listed_before_any_read():
  source = _CountingSource({"fc.weight": np.zeros((3, 5), np.float32),  # mis-shaped
                            "l.0.w": np.zeros(5, np.float32),  # l.1.w missing
                            "extra.bias": np.zeros(2, np.float32)})  # unexpected
  expected = dict(_expected(), norm={"scale": jax.ShapeDtypeStruct((3,), np.float32)})
  with pytest.raises(CheckpointError) as info:
    load_params(source, _rules(), expected)
  message = str(info.value)
  assert "missing from the checkpoint (1): l.1.w" in message
  assert "unexpected in the checkpoint (1): extra.bias" in message
  assert "dense/kernel: model wants (4, 3)" in message
  assert "no tensor maps to (1): norm/scale" in message
  assert source.reads == []  # validated on shapes only


def test_ignore_patterns_and_nest():
  source = {"fc.weight": np.zeros((3, 4), np.float32), "l.0.w": np.zeros(5, np.float32),
            "l.1.w": np.zeros(5, np.float32), "rotary.inv_freq": np.zeros(2, np.float32)}
  load_params(source, _rules(), _expected(), ignore=[r".*inv_freq"])
  nested = load_params(source, nest("tower/", _rules()), {"tower": _expected()},
                       ignore=[r".*inv_freq"])
  assert nested["tower"]["dense"]["kernel"].shape == (4, 3)


def test_casts_to_the_model_dtype():
  import ml_dtypes
  source = {"fc.weight": np.ones((3, 4), ml_dtypes.bfloat16),
            "l.0.w": np.zeros(5, np.float16), "l.1.w": np.zeros(5, np.float16)}
  params = load_params(source, _rules(), _expected())
  assert params["dense"]["kernel"].dtype == np.float32


def test_integer_tensor_for_float_parameter_is_reported():
  source = {"fc.weight": np.zeros((3, 4), np.int64), "l.0.w": np.zeros(5, np.float32),
            "l.1.w": np.zeros(5, np.float32)}
  with pytest.raises(CheckpointError, match="wrong dtype .*fc.weight is int64"):
    load_params(source, _rules(), _expected())
