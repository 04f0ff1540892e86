"""configs/align.py presets parse into typed configs; bad keys fail by name."""

import dataclasses
import os

import pytest

from tests.conftest import REPO
from vla_jax.errors import ConfigError
from vla_jax.experiment import load_config, parse_config


def _config(preset):
  return load_config(REPO / "configs" / "align.py", preset)


@pytest.mark.parametrize("preset", ["tiny", "tiny_paligemma", "openvla_7b", "paligemma_3b"])
def test_presets_parse(preset):
  experiment = parse_config(_config(preset))
  model = experiment.model
  assert experiment.align.align_layer == model.llm.depth // 2
  assert experiment.align.align_coeff == 0.2 and experiment.align.loss == "cosine"
  tower = experiment.teacher.tower
  assert tower.image_size // tower.patch_size == model.grid  # teacher sees the student grid
  if preset == "openvla_7b":  # the paper's setup
    assert (model.num_visual_tokens, model.visual_start, model.llm.depth) == (256, 1, 32)
    assert experiment.align.align_layer == 16 and experiment.align.projector_width == 2048
    assert (experiment.lora.rank, experiment.lora.alpha) == (32, 16.0)
    assert model.siglip.depth == 26 and model.dino.depth == 23  # second-to-last blocks


def test_unknown_preset_lists_known():
  with pytest.raises(ValueError, match="openvla_7b"):
    _config("openvla_13b")


def test_unknown_nested_key_is_named_with_suggestion():
  config = _config("tiny")
  config.model.llm.unlock()
  config.model.llm["num_head"] = 3
  with pytest.raises(ConfigError, match="'model.llm.num_head'.*did you mean 'model.llm.num_heads'"):
    parse_config(config)


def test_inconsistent_values_are_rejected():
  config = _config("tiny")
  config.align.align_layer = 99
  with pytest.raises(ConfigError, match="align_layer=99 but the LLM has only 4 layers"):
    parse_config(config)
  config = _config("tiny")
  config.model.siglip.image_size = 32
  with pytest.raises(ConfigError, match="model.siglip.image_size=32"):
    parse_config(config)
  config = _config("tiny")
  config.model.llm.family = "gemma2"
  with pytest.raises(ConfigError, match="family"):
    parse_config(config)


@pytest.mark.parametrize("path,value,message", [
    ("model.siglip.width", -3, r"^model\.siglip\.width must be a positive integer"),
    ("model.dino.patch_size", 0, r"^model\.dino\.patch_size must be a positive integer"),
    ("model.llm.num_heads", 3, r"^model\.llm\.num_heads \(3\) must be a multiple of "
                               r"model\.llm\.num_kv_heads"),
    ("model.siglip.posemb", "rope", r"^model\.siglip\.posemb must be one of"),
])
def test_model_value_errors_name_the_path_the_user_typed(path, value, message):
  """A tower's own check says `vit.width`; the user typed `model.siglip.width`."""
  config = _config("tiny")
  node = config
  *parents, leaf = path.split(".")
  for key in parents:
    node = node[key]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    parse_config(config)


def test_load_config_names_a_missing_file(tmp_path):
  with pytest.raises(ConfigError, match="No config file"):
    load_config(tmp_path / "nope.py")
  assert load_config(REPO / "configs" / "align.py").preset == "tiny"  # the file's default


def test_config_data_lists_every_plain_data_setting_with_the_pipelines_default():
  # Each key must be in config.data to be overridable from the command line
  # (--config.data.skip_bad_episodes=True); its value must not silently differ.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from vla_jax.data import augment, pipeline  # pylint: disable=g-import-not-at-top
  data = load_config(REPO / "configs" / "align.py", "openvla_7b").data
  derived = {"sources", "image_size", "global_batch_size", "tokenizer", "seed"}
  chosen = {"shuffle_buffer", "max_length", "action_horizon", "proprio_dims"}
  for field in dataclasses.fields(pipeline.DataConfig):
    if field.name in derived or field.name in chosen or field.default is None:
      continue
    assert field.name in data, f"config.data.{field.name} cannot be overridden"
    default = field.default
    if field.name == "augment":
      default = dataclasses.asdict(default)
    if field.name == "stats_dir":
      assert os.path.normpath(data[field.name]) == os.path.normpath(default)
      continue
    value = data[field.name]
    value = value.to_dict() if hasattr(value, "to_dict") else value
    assert value == default, field.name
  assert dataclasses.asdict(augment.AugmentConfig(**data.augment.to_dict())) == \
      dataclasses.asdict(augment.AugmentConfig())


@pytest.mark.parametrize("preset,width,size", [("tiny", 32, 64), ("openvla_7b", 1024, 256)])
def test_teacher_kind_switches_family_with_one_override(preset, width, size):
  config = _config(preset)
  config.teacher.kind = "radio"  # --config.teacher.kind=radio
  experiment = parse_config(config)
  tower = experiment.teacher.tower
  assert type(tower).__name__ == "RadioConfig" and tower.patch_size * experiment.model.grid == size
  assert tower.width == width  # openvla_7b: C-RADIOv3-L, the reference code's default
  assert experiment.teacher.vit is None and experiment.teacher.width == width


@pytest.mark.parametrize("kind,key", [("siglip", "vit"), ("dinov2", "dino"), ("radio", "radio"),
                                      ("dinov3", "dinov3"), ("siglip2", "siglip2")])
def test_teacher_errors_name_the_full_path(kind, key):
  config = _config("tiny")
  config.teacher.kind = kind
  config.teacher[key].width = 30  # not divisible by the heads
  with pytest.raises(ConfigError, match=rf"teacher\.{key}\.width \(30\)"):
    parse_config(config)
  config = _config("tiny")
  config.teacher.kind = kind
  config.teacher[key].unlock()
  config.teacher[key]["widht"] = 3
  with pytest.raises(ConfigError, match=rf"'teacher\.{key}\.widht' \(did you mean "
                                        rf"'teacher\.{key}\.width'"):
    parse_config(config)


def test_teacher_layout_round_trips_and_reads_older_checkpoints():
  from vla_jax.experiment import parse_teacher  # pylint: disable=g-import-not-at-top
  from vla_jax.models.teacher import teacher_config  # pylint: disable=g-import-not-at-top
  for name in ("tiny_siglip", "tiny_dinov2", "tiny_radio", "tiny_dinov3", "tiny_siglip2"):
    teacher = teacher_config(name, student_grid=4)
    assert parse_teacher(teacher.to_mapping()) == teacher
  old = {"kind": "siglip", "vit": dataclasses.asdict(teacher_config("tiny_siglip").tower),
         "dino": None, "layer": None}  # what checkpoints recorded before the registry
  assert parse_teacher(old) == teacher_config("tiny_siglip")
  with pytest.raises(ConfigError, match=r"teacher.kind='clip'; expected one of"):
    parse_teacher({**old, "kind": "clip"})
  with pytest.raises(ConfigError, match=r"teacher.kind='radio' needs teacher.radio"):
    parse_teacher({**old, "kind": "radio"})
