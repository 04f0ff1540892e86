"""One typed run config (`vla_jax.run_config`): every section parsed and checked in one place."""

import json

import pytest

from configs.align import get_config
from vla_jax.errors import ConfigError
from vla_jax.run_config import RunConfig, parse_run_config


def test_tiny_config_parses_into_typed_sections():
  run = parse_run_config(get_config("tiny"))
  assert isinstance(run, RunConfig)
  assert run.weights.student == "bundled" and run.schedule.checkpoint_every == 500
  assert run.train.num_steps == 6000 and run.eval.max_steps == 80
  record = json.loads(json.dumps(run.record()))  # JSON-ready as it is
  for section in ("model", "teacher", "align", "lora", "train", "sharding", "data", "weights",
                  "eval", "log_every", "checkpoint_params", "tokenizer", "seed"):
    assert section in record, section
  assert record["weights"]["teacher_format"] == "big_vision"


@pytest.mark.parametrize("key, value, message", [
    ("weights.student_format", "safetensors",
     r"weights.student_format='safetensors': a openvla student reads hf, orbax, export, "
     "bundled"),
    ("weights.teacher_format", "hf", r"weights.teacher='bundled' is a big_vision .npz; set "
     "weights.teacher_format='big_vision'"),
    ("weights.student", "/no/such/checkpoint", r"weights.student='/no/such/checkpoint' does "
     "not exist"),
    ("weights.teacher", "/no/such/params.npz:img", r"weights.teacher='/no/such/params.npz:img'"
     " does not exist"),
    ("tokenizer", "/some/tokenizer.model", r"weights.student='bundled' was pretrained with the "
     "bundled tokenizer"),
    ("log_every", 0, r"config.log_every=0: must be an integer >= 1"),
    ("keep_period", -1, r"config.keep_period must be an integer >= 0 .*got -1"),
    ("checkpoint_params", "sometimes", r"config.checkpoint_params='sometimes'"),
    ("eval.seeds", 0, r"eval.seeds must be > 0"),
    ("train.batch_size", 0, r"train.batch_size"),
])
def test_bad_values_are_refused_naming_what_the_user_typed(key, value, message):
  config = get_config("tiny")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    parse_run_config(config)


def test_teacher_format_its_family_has_no_loader_for_is_refused():
  config = get_config("tiny")
  config.weights.teacher, config.weights.teacher_format = "", "hf2"
  with pytest.raises(ConfigError, match="weights.teacher_format='hf2': a siglip teacher reads "
                     "big_vision, hf, orbax"):
    parse_run_config(config)


def test_existing_big_vision_subtree_path_is_accepted(tmp_path):
  (tmp_path / "params.npz").write_bytes(b"")
  config = get_config("tiny")
  config.weights.teacher = f"{tmp_path / 'params.npz'}:img"
  assert parse_run_config(config).weights.teacher.endswith(":img")


def test_bundled_teacher_needs_a_siglip_teacher():
  config = get_config("tiny")
  config.teacher.kind = "dinov2"
  with pytest.raises(ConfigError, match="weights.teacher='bundled' exists for SigLIP teachers "
                     "only"):
    parse_run_config(config)


def test_unknown_top_level_key_is_refused():
  config = get_config("tiny")
  config.log_evry = 5
  with pytest.raises(ConfigError, match=r"Unknown top-level config key\(s\) \['log_evry'\]"):
    parse_run_config(config)


def test_data_section_is_typed_without_building_the_bundled_dataset(tmp_path, monkeypatch):
  monkeypatch.setenv("VLA_JAX_CACHE", str(tmp_path))  # an empty cache: nothing may be built
  run = parse_run_config(get_config("tiny"))
  assert run.data.sources[0].name == "tabletop" and run.data.sources[0].data_dir == ""
  assert run.data.global_batch_size == run.train.batch_size
  assert list(tmp_path.iterdir()) == []
  config = get_config("tiny")
  config.data.shuffle_bufer = 10
  with pytest.raises(ConfigError, match=r"'data.shuffle_bufer' \(did you mean "
                     r"'data.shuffle_buffer'\?\)"):
    parse_run_config(config)


def test_resolving_a_bundled_teacher_refuses_before_building_anything(tmp_path, monkeypatch):
  """The API path (`modeling.resolve_bundled_weights`) runs the same check, first."""
  from vla_jax import modeling  # pylint: disable=g-import-not-at-top
  from vla_jax.experiment import parse_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("VLA_JAX_CACHE", str(tmp_path))
  config = get_config("tiny")
  config.teacher.kind = "dinov2"
  with pytest.raises(ConfigError, match="exists for SigLIP teachers only"):
    modeling.resolve_bundled_weights({"student": "bundled", "teacher": "bundled"},
                                     parse_config(config))
  assert list(tmp_path.iterdir()) == []
