"""make_dataset / make_iterator: batches, mixtures, determinism, resume, tokens, global arrays."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import xla_flags
from vla_jax.data.pipeline import DataConfig, make_iterator
from vla_jax.errors import ConfigError, InputError

TOKENIZER = "tokenizers/llama2.model"


def _config(sources, stats_dir, **kwargs):
  defaults = dict(image_size=32, global_batch_size=8, shuffle_buffer=64, stats_dir=stats_dir)
  return DataConfig(sources=sources, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def module_stats(tmp_path_factory):
  return str(tmp_path_factory.mktemp("stats"))


@pytest.mark.parametrize("name", ["tabletop", "bridge_dataset"])
def test_batches_shapes_dtypes_ranges(name, tabletop_dir, bridge_dir, shared_data, module_stats):
  path = tabletop_dir if name == "tabletop" else bridge_dir
  config = _config([{"name": name, "data_dir": path}], module_stats, action_horizon=2,
                   tokenizer=str(shared_data / TOKENIZER), max_length=48)
  batch = next(make_iterator(config, process_index=0, process_count=1))
  observation = batch["observation"]
  assert observation["image_primary"].shape == (8, 32, 32, 3)
  assert observation["image_primary"].dtype == np.uint8 and observation["image_primary"].std() > 5
  assert observation["state"].shape == (8, 7) and observation["state"].dtype == np.float32
  assert batch["action"].shape == (8, 2, 7) and batch["action_pad_mask"].shape == (8, 2)
  movement = batch["action"][..., :6]
  assert movement.min() >= -1 and movement.max() <= 1 and movement.std() > 0.1
  assert set(np.unique(batch["action"][..., 6])) <= {0.0, 1.0}  # gripper not normalised
  assert batch["tokens"].shape == (8, 48) and batch["tokens"].dtype == np.int32
  # Supervised: exactly the 2 x 7 action tokens and EOS, all inside the attention mask.
  assert (batch["loss_mask"].sum(1) == 15).all()
  assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
  assert (batch["tokens"][batch["loss_mask"]][::15] >= 31744).all()


def test_proprio_dims_put_the_frames_state_into_its_prompt(tabletop_dir, shared_data,
                                                            module_stats):
  from vla_jax.actions import ActionTokenizer  # pylint: disable=g-import-not-at-top
  config = _config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats,
                   tokenizer=str(shared_data / TOKENIZER), max_length=48, proprio_dims=(2, 6))
  batch = next(make_iterator(config, process_index=0, process_count=1))
  first = ActionTokenizer(vocab_size=32000).token_range()[0]
  for row in range(8):
    prompt = batch["tokens"][row][batch["attention_mask"][row] & ~batch["loss_mask"][row]]
    expected = ActionTokenizer(vocab_size=32000).encode(batch["observation"]["state"][row, [2, 6]])
    np.testing.assert_array_equal(prompt[-3:-1], expected)  # then "▁"
    assert (prompt[:-3] < first).all()
  with pytest.raises(InputError, match=r"proprio_dims=\(9,\) but the datasets' states have 7"):
    make_iterator(_config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats,
                          tokenizer=str(shared_data / TOKENIZER), proprio_dims=(9,)),
                  process_index=0, process_count=1)
  with pytest.raises(ConfigError, match="distinct state indices"):
    _config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats, proprio_dims=(2, 2))


def test_long_prompts_warn_with_a_count(tabletop_dir, shared_data, module_stats, caplog):
  config = _config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats,
                   tokenizer=str(shared_data / TOKENIZER), max_length=12)
  iterator = make_iterator(config, process_index=0, process_count=1)
  batch = next(iterator)
  assert iterator.num_truncated == 8 and "exceed max_length=12" in caplog.text
  assert batch["tokens"].shape == (8, 12) and batch["attention_mask"].all()


def test_mixture_proportions(tabletop_dir, custom_dir, module_stats):
  sources = [{"name": "tabletop", "data_dir": tabletop_dir, "weight": 3.0},
             {"name": "my_tabletop", "data_dir": custom_dir, "weight": 1.0}]
  iterator = make_iterator(_config(sources, module_stats, global_batch_size=50),
                           process_index=0, process_count=1)
  counts = np.bincount(np.concatenate([next(iterator)["dataset_index"] for _ in range(8)]),
                       minlength=2)
  # 400 draws at p = 0.75: binomial std ~8.7, allow ~3.5 sigma.
  assert abs(counts[0] - 300) < 30, counts
  balanced = make_iterator(_config(sources, module_stats, balance_weights=True),
                           process_index=0, process_count=1)
  stats = balanced.info["statistics"]
  frames = np.array([stats["tabletop"].num_frames, stats["my_tabletop"].num_frames])
  expected = np.array([3.0, 1.0]) * frames
  np.testing.assert_allclose(balanced.info["weights"], expected / expected.sum())


def test_deterministic_and_resumable(tabletop_dir, module_stats):
  config = _config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats, seed=5)
  first = make_iterator(config, process_index=0, process_count=1)
  batches = [next(first) for _ in range(5)]
  state = json.loads(json.dumps(first.state()))
  assert state == {"seed": 5, "batches": 5, "host_frames": 40, "global_batch_size": 8}
  expected = next(first)
  resumed = make_iterator(config, state=state, process_index=0, process_count=1)
  got = next(resumed)
  np.testing.assert_array_equal(got["episode_id"], expected["episode_id"])
  np.testing.assert_array_equal(got["frame_index"], expected["frame_index"])
  np.testing.assert_array_equal(got["observation"]["image_primary"],
                                expected["observation"]["image_primary"])  # same augmentation
  replay = make_iterator(config, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(replay)["frame_index"], batches[0]["frame_index"])
  other_seed = make_iterator(_config([{"name": "tabletop", "data_dir": tabletop_dir}],
                                     module_stats, seed=6), process_index=0, process_count=1)
  assert not np.array_equal(next(other_seed)["observation"]["image_primary"],
                            batches[0]["observation"]["image_primary"])
  with pytest.raises(InputError, match="seed 5.*seed 6"):
    make_iterator(other_seed.config, state=state, process_index=0, process_count=1)


def test_resuming_with_another_batch_size_continues_at_the_same_frame(tabletop_dir,
                                                                     module_stats):
  source = [{"name": "tabletop", "data_dir": tabletop_dir}]
  fours = make_iterator(_config(source, module_stats, seed=3, global_batch_size=4),
                        process_index=0, process_count=1)
  for _ in range(3):
    next(fours)
  state = json.loads(json.dumps(fours.state()))
  assert state["host_frames"] == 12 and state["global_batch_size"] == 4
  sixes = make_iterator(_config(source, module_stats, seed=3, global_batch_size=6),
                        state=state, process_index=0, process_count=1)
  got = next(sixes)
  # The reference: batches of 2 from the start; frames 12..17 are its batches 7 to 9.
  twos = make_iterator(_config(source, module_stats, seed=3, global_batch_size=2),
                       process_index=0, process_count=1)
  reference = [next(twos) for _ in range(9)][6:]
  for key in ("episode_id", "frame_index"):
    np.testing.assert_array_equal(got[key], np.concatenate([b[key] for b in reference]))
  np.testing.assert_array_equal(got["observation"]["image_primary"], np.concatenate(
      [b["observation"]["image_primary"] for b in reference]))  # same augmentation
  assert sixes.state()["host_frames"] == 18
  # A state saved before frames were recorded resumes as it always did (same batch size).
  legacy = make_iterator(_config(source, module_stats, seed=3, global_batch_size=4),
                         state={"seed": 3, "batches": 3}, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(legacy)["frame_index"],
                                np.concatenate([b["frame_index"] for b in reference[:2]]))


def test_hosts_split_the_single_process_batches(tabletop_dir, module_stats):
  """host_sharding="global": host 0's rows then host 1's are the one-process batch, and
  a host resumed mid-stream continues with its rows of the next global batches."""
  config = _config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats,
                   val_fraction=0.0)
  single = make_iterator(config, process_index=0, process_count=1)
  reference = [next(single) for _ in range(3)]
  hosts = [make_iterator(config, process_index=h, process_count=2) for h in range(2)]
  for expected in reference:
    rows = [next(host) for host in hosts]
    assert rows[0]["action"].shape[0] == 4  # 8 global / 2 hosts
    for key in ("frame_index", "episode_id", "action"):
      np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), expected[key])
    np.testing.assert_array_equal(
        np.concatenate([r["observation"]["image_primary"] for r in rows]),
        expected["observation"]["image_primary"])
  after_two = {"seed": config.seed, "batches": 2, "host_frames": 8, "global_batch_size": 8}
  resumed = make_iterator(config, state=after_two, process_index=1, process_count=2)
  np.testing.assert_array_equal(next(resumed)["frame_index"], reference[2]["frame_index"][4:])


def test_hosts_get_disjoint_episodes_and_split_batches(tabletop_dir, module_stats):
  config = _config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats,
                   val_fraction=0.0, host_sharding="episodes")
  seen = []
  for host in range(2):
    iterator = make_iterator(config, process_index=host, process_count=2)
    batches = [next(iterator) for _ in range(6)]
    assert batches[0]["action"].shape[0] == 4  # 8 global / 2 hosts
    seen.append({e for b in batches for e in b["episode_id"]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  with pytest.raises(ConfigError, match="not divisible"):
    make_iterator(_config([{"name": "tabletop", "data_dir": tabletop_dir}], module_stats,
                          global_batch_size=9), process_index=0, process_count=2)


def test_shuffle_buffer_ram_budget(tabletop_dir, module_stats):
  iterator = make_iterator(_config([{"name": "tabletop", "data_dir": tabletop_dir}],
                                   module_stats, shuffle_buffer=10_000,
                                   shuffle_ram_budget_mb=0.1), process_index=0, process_count=1)
  per_frame = iterator.info["frame_bytes"]
  assert 500 < per_frame < 20_000  # one 64 px JPEG + vectors + text
  assert iterator.info["shuffle_buffer"] == int(0.1 * 2**20 // per_frame)


@pytest.mark.slow  # a subprocess with 8 fake devices
def test_global_array_on_eight_devices(tabletop_dir, module_stats):
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from vla_jax.data.pipeline import DataConfig, make_iterator
      from vla_jax.data.mixture import to_global_array
      mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
      config = DataConfig(sources=[{{"name": "tabletop", "data_dir": {tabletop_dir!r}}}],
                          image_size=16, global_batch_size=8, shuffle_buffer=8,
                          stats_dir={module_stats!r})
      batch = next(make_iterator(config))
      arrays = to_global_array(batch, mesh)
      image = arrays["observation"]["image_primary"]
      assert len(jax.devices()) == 8 and image.shape == (8, 16, 16, 3)
      assert len(image.addressable_shards) == 8 and image.addressable_shards[0].data.shape[0] == 1
      np.testing.assert_array_equal(np.asarray(image), batch["observation"]["image_primary"])
      assert arrays["language_instruction"] is None
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
