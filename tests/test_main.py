"""The command-line entry point: describe and convert on the embedded tiny default."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from vla_jax import main as main_lib
from vla_jax.errors import VlaJaxError
from vla_jax.experiment import load_config
from vla_jax.models import vit as vit_lib
from vla_jax.weights import convert, siglip
from vla_jax.weights.npz import flatten


def _config(preset="tiny"):
  config = load_config(REPO / "configs" / "align.py", preset)
  # Random weights: the bundled pretraining is tested in tests/train/test_*pretrain.py.
  config.weights.student, config.weights.teacher = "", ""
  return config


def _llama2_config(shared_data):
  """The tiny default prompted through the real Llama-2 tokenizer."""
  config = _config()
  config.tokenizer = str(shared_data / "tokenizers" / "llama2.model")
  config.model.llm.vocab_size = 32064  # Llama-2's 32000 ids + <PAD>, padded to 64
  return config


@pytest.mark.slow  # the command line end to end (imports, build, compile)
def test_describe_runs_the_aligned_forward(tmp_path, shared_data):
  config = _llama2_config(shared_data)
  summary = main_lib.describe(config, str(tmp_path))
  assert summary["visual_tokens"] == {"start": 1, "count": 64, "grid": 8}
  assert summary["align_hidden_shape"] == [2, 64, 128]
  assert summary["tokens_from"].startswith("tokenizer")
  assert -1.0 <= -summary["metrics"]["loss/align"] <= 1.0
  assert summary["metrics"]["align/cos_sim"] == pytest.approx(-summary["metrics"]["loss/align"])
  assert json.loads((tmp_path / "describe.json").read_text())["preset"] == "tiny"


@pytest.mark.slow  # the command line end to end, twice
def test_convert_teacher_then_describe_from_orbax(tmp_path, shared_data):
  config = _llama2_config(shared_data)  # describe's programs: compiled once in this module
  teacher = vit_lib.ViTConfig(**config.teacher.vit.to_dict())
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=v.shape).astype(np.float32) * 0.02
            for k, v in flatten(vit_lib.abstract_params(teacher)).items()}
  npz_path = str(tmp_path / "teacher.npz")
  np.savez(npz_path, **params)
  config.weights.teacher = npz_path
  written = main_lib.convert(config, str(tmp_path / "work"))
  assert written == [str(tmp_path / "work" / "converted" / "teacher")]
  assert convert.read_meta(written[0])["source"] == npz_path
  loaded = siglip.load_big_vision(npz_path, teacher)
  config.weights.teacher, config.weights.teacher_format = written[0], "orbax"
  summary = main_lib.describe(config, str(tmp_path / "work"))
  assert summary["teacher_params_millions"] == pytest.approx(
      sum(x.size for x in flatten(loaded).values()) / 1e6)


def test_convert_without_weights_is_a_clear_error(tmp_path):
  with pytest.raises(VlaJaxError, match="Nothing to convert"):
    main_lib.convert(_config(), str(tmp_path))


def test_main_turns_bad_input_into_one_error_line(tmp_path, monkeypatch):
  """In process: what the CLI test below checks in a subprocess (the `slow` one)."""
  from absl import flags
  argv = ["vla_jax", f"--workdir={tmp_path}", "--mode=convert",
          f"--config={REPO / 'configs' / 'align.py'}",
          f"--config.weights.student={tmp_path}/missing", "--config.weights.teacher="]
  monkeypatch.setattr(sys, "argv", argv)  # config overrides are read from sys.argv
  flags.FLAGS(argv)
  try:
    with pytest.raises(SystemExit, match="^error: weights.student='.*missing' does not exist"):
      main_lib.main(argv)
  finally:
    flags.FLAGS.unparse_flags()


@pytest.mark.slow  # a subprocess: a second Python that imports JAX and TensorFlow
def test_cli_reports_bad_input_without_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "vla_jax.main", f"--workdir={tmp_path}", "--mode=convert",
       "--config=configs/align.py", f"--config.weights.student={tmp_path}/missing",
       "--config.weights.teacher="],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "error: weights.student=" in result.stderr and "does not exist" in result.stderr
  assert "Traceback" not in result.stderr


def test_describe_rejects_a_tokenizer_larger_than_the_vocabulary(tmp_path, shared_data):
  config = _config()
  config.tokenizer = str(shared_data / "tokenizers" / "llama2.model")
  from vla_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="vocab_size=32064"):
    main_lib.describe(config, str(tmp_path))


@pytest.mark.parametrize("override, message", [
    ("--config.trian.num_steps=3",
     "unknown config key 'trian' (Did you mean \"train\" instead of \"trian\"?)"),
    ("--config.data.foo=1", "unknown config key 'foo'"),
])
def test_a_bad_config_override_is_one_error_line(override, message, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = ["vla_jax", f"--config={REPO / 'configs' / 'align.py'}", override]
  monkeypatch.setattr(sys, "argv", argv)  # config overrides are read from sys.argv
  try:
    with pytest.raises(SystemExit) as raised:
      main_lib.parse_flags(argv)
  finally:
    flags.FLAGS.unparse_flags()
  text = str(raised.value.code)
  assert text.startswith("error: a config override could not be applied: " + message), text
  assert override.split("=")[0] in text and "\n" not in text
