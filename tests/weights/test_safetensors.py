"""Our safetensors reader against files written by the reference `safetensors` package."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from vla_jax.errors import CheckpointError
from vla_jax.weights.safetensors import open_safetensors, save_safetensors


def test_reads_reference_file_lazily_with_all_dtypes(tmp_path):
  tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
             "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
             "d": torch.randn(2, 2).to(torch.float16)}
  path = tmp_path / "m.safetensors"
  safetensors.torch.save_file(tensors, str(path))
  reader = open_safetensors(str(path))
  assert sorted(reader) == ["a", "b", "c", "d"]
  assert isinstance(reader["a"], np.memmap) or isinstance(reader["a"].base, np.memmap)
  assert reader["b"].dtype == ml_dtypes.bfloat16
  for name, tensor in tensors.items():
    np.testing.assert_array_equal(np.asarray(reader[name], np.float32),
                                  tensor.to(torch.float32).numpy())
  assert reader.shape("c") == (2, 3)


def test_sharded_index_and_directory(tmp_path):
  safetensors.numpy.save_file({"x": np.ones((2,), np.float32)}, str(tmp_path / "s1.safetensors"))
  safetensors.numpy.save_file({"y": np.zeros((3,), np.float32)}, str(tmp_path / "s2.safetensors"))
  index = {"metadata": {}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  for path in (tmp_path, tmp_path / "model.safetensors.index.json"):
    reader = open_safetensors(str(path))
    assert sorted(reader) == ["x", "y"] and reader["y"].shape == (3,)


def test_missing_shard_is_named(tmp_path):
  index = {"weight_map": {"x": "gone.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match="gone.safetensors"):
    open_safetensors(str(tmp_path))


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
  path = tmp_path / "m.safetensors"
  safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:keep] if keep > 0 else data[:keep])
  with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
    open_safetensors(str(path))


def test_missing_path_and_ambiguous_directory(tmp_path):
  with pytest.raises(CheckpointError, match="No checkpoint"):
    open_safetensors(str(tmp_path / "nope"))
  for name in ("a", "b"):
    safetensors.numpy.save_file({"x": np.ones(1, np.float32)}, str(tmp_path / f"{name}.safetensors"))
  with pytest.raises(CheckpointError, match="no \\*.safetensors.index.json"):
    open_safetensors(str(tmp_path))


def test_our_writer_is_readable_by_reference(tmp_path):
  path = str(tmp_path / "o.safetensors")
  arrays = {"k": np.arange(12, dtype=np.float32).reshape(3, 4),
            "h": np.ones(3, ml_dtypes.bfloat16)}
  save_safetensors(path, arrays, metadata={"format": "np"})
  loaded = safetensors.torch.load_file(path)
  np.testing.assert_array_equal(loaded["k"].numpy(), arrays["k"])
  assert loaded["h"].dtype == torch.bfloat16
