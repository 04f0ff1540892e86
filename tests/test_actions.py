"""Tests of OpenVLA's action tokenizer and BOUNDS_Q99 normalisation (vla_jax/actions.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.actions import ActionTokenizer, NormStats, normalize_actions, unnormalize_actions
from vla_jax.errors import InputError


class OpenVlaReference:
  """A transcription of OpenVLA's numpy ActionTokenizer (prismatic/vla/action_tokenizer.py)."""

  def __init__(self, vocab_size=32000, bins=256, min_action=-1, max_action=1):
    self.vocab_size, self.n_bins = vocab_size, bins
    self.min_action, self.max_action = min_action, max_action
    self.bins = np.linspace(min_action, max_action, self.n_bins)
    self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

  def token_ids(self, action):
    action = np.clip(action, a_min=float(self.min_action), a_max=float(self.max_action))
    discretized_action = np.digitize(action, self.bins)
    return self.vocab_size - discretized_action

  def decode_token_ids_to_actions(self, action_token_ids):
    discretized_actions = self.vocab_size - action_token_ids
    discretized_actions = np.clip(discretized_actions - 1, a_min=0,
                                  a_max=self.bin_centers.shape[0] - 1)
    return self.bin_centers[discretized_actions]


def _actions(seed, shape=(64, 7), scale=1.2):
  return np.random.default_rng(seed).uniform(-scale, scale, shape).astype(np.float32)


def test_exact_match_with_openvla_numpy():
  tok, ref = ActionTokenizer(), OpenVlaReference()
  actions = np.concatenate([_actions(0).reshape(-1), ref.bins, ref.bin_centers,
                            np.nextafter(ref.bins, -2), np.nextafter(ref.bins, 2)])
  ids = tok.encode(actions)
  np.testing.assert_array_equal(ids, ref.token_ids(actions))
  np.testing.assert_array_equal(tok.decode(ids), ref.decode_token_ids_to_actions(ids))
  all_ids = np.arange(31000, 32100)  # including out-of-range ids, which OpenVLA clips
  np.testing.assert_array_equal(tok.decode(all_ids), ref.decode_token_ids_to_actions(all_ids))


def test_token_range_and_edges():
  tok = ActionTokenizer()
  assert tok.token_range() == (31744, 31999)
  ids = tok.encode(_actions(1, scale=3.0))
  assert ids.min() >= 31744 and ids.max() <= 31999 and ids.dtype == np.int32
  assert np.all(tok.is_action_token(ids)) and not tok.is_action_token(np.array(31743))
  edges = tok.encode(np.array([-1.0, 1.0, -5.0, 5.0]))
  np.testing.assert_array_equal(edges, [31999, 31744, 31999, 31744])
  np.testing.assert_allclose(tok.decode(edges), [-1 + 1 / 255, 1 - 1 / 255] * 2)


def test_round_trip_within_half_a_bin():
  tok = ActionTokenizer()
  actions = _actions(2, scale=1.0)
  half_bin = (tok.high - tok.low) / (tok.n_bins - 1) / 2
  assert np.abs(tok.decode(tok.encode(actions)) - actions).max() <= half_bin + 1e-7
  small = ActionTokenizer(vocab_size=1000, n_bins=17, low=-2.0, high=3.0)
  wide = np.random.default_rng(3).uniform(-2, 3, 500)
  assert np.abs(small.decode(small.encode(wide)) - wide).max() <= 5 / 16 / 2 + 1e-9


def test_jax_version_matches_numpy_and_jits():
  tok = ActionTokenizer()
  ref = OpenVlaReference()
  # Float32 values on and next to every bin edge, where float32 and float64 edges differ.
  edges32 = ref.bins.astype(np.float32)
  actions = np.concatenate([_actions(4).reshape(-1), edges32, np.nextafter(edges32, -2),
                            np.nextafter(edges32, 2)]).astype(np.float32)
  encode, decode = jax.jit(tok.encode), jax.jit(tok.decode)
  ids = encode(jnp.asarray(actions))
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, ref.token_ids(actions))
  np.testing.assert_allclose(decode(ids), ref.decode_token_ids_to_actions(np.asarray(ids)),
                             rtol=1e-7)
  bf16 = jnp.asarray(actions[:50], jnp.bfloat16)
  np.testing.assert_array_equal(encode(bf16), ref.token_ids(np.asarray(bf16, np.float32)))


def test_encode_decode_input_checks():
  tok = ActionTokenizer()
  with pytest.raises(InputError, match="finite"):
    tok.encode(np.array([0.1, np.nan]))
  with pytest.raises(InputError, match="float"):
    tok.encode(np.array([1, 2]))
  with pytest.raises(InputError, match="integer"):
    tok.decode(np.array([31800.0]))
  with pytest.raises(InputError, match="n_bins"):
    ActionTokenizer(vocab_size=100, n_bins=256)


def _stats():
  rng = np.random.default_rng(5)
  q01 = rng.uniform(-2, -0.5, 7)
  q99 = rng.uniform(0.5, 2, 7)
  return q01, q99, np.array([True] * 6 + [False])


def test_unnormalize_matches_openvla_and_normalize_inverts_it():
  q01, q99, mask = _stats()
  normalized = _actions(6, scale=1.0)
  normalized[:, 6] = np.where(normalized[:, 6] > 0, 1.0, 0.0)  # gripper, not normalised
  got = unnormalize_actions(normalized, q01, q99, mask)
  # OpenVLA's predict_action, transcribed.
  want = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(got[:, 6], normalized[:, 6])
  back = normalize_actions(got, q01, q99, mask)
  np.testing.assert_allclose(back, normalized, atol=1e-5)
  np.testing.assert_array_equal(back[:, 6], normalized[:, 6])
  # Out-of-range raw actions clip to [-1, 1].
  far = normalize_actions(np.stack([q01 - 10, q99 + 10]), q01, q99, mask)
  np.testing.assert_array_equal(far[:, :6], [[-1] * 6, [1] * 6])


def test_normalisation_in_jax():
  q01, q99, mask = _stats()
  actions = jnp.asarray(_actions(7, scale=1.0))
  got = jax.jit(lambda a: unnormalize_actions(a, q01, q99, mask))(actions)
  np.testing.assert_allclose(got, unnormalize_actions(np.asarray(actions), q01, q99, mask),
                             rtol=1e-5, atol=1e-6)
  back = jax.jit(lambda a: normalize_actions(a, q01, q99, mask))(got)
  np.testing.assert_allclose(back, actions, atol=1e-5)


def test_normalisation_input_checks():
  q01, q99, mask = _stats()
  with pytest.raises(InputError, match=r"q99 of shape \[7\]"):
    unnormalize_actions(np.zeros((2, 7)), q01, q99[:6], mask)
  with pytest.raises(InputError, match="finite"):
    normalize_actions(np.full((2, 7), np.nan), q01, q99, mask)


def test_norm_stats_json_round_trip():
  q01, q99, mask = _stats()
  stats = NormStats(mean=np.zeros(7), std=np.ones(7), min=q01 - 1, max=q99 + 1, q01=q01, q99=q99,
                    mask=mask)
  data = json.loads(json.dumps(stats.to_dict()))
  again = NormStats.from_dict(data)
  for key in ("mean", "std", "min", "max", "q01", "q99", "mask"):
    np.testing.assert_array_equal(getattr(again, key), getattr(stats, key))
  actions = _actions(8, scale=1.0)
  np.testing.assert_allclose(again.unnormalize(actions),
                             unnormalize_actions(actions, q01, q99, mask), rtol=1e-6)
  # OpenVLA's files may omit the mask: everything is normalised then.
  no_mask = {k: v for k, v in data.items() if k != "mask"}
  assert NormStats.from_dict(no_mask).mask.all()
  with pytest.raises(InputError, match="missing"):
    NormStats.from_dict({"mean": [0.0]})
  with pytest.raises(InputError, match="NormStats.q99"):
    NormStats(mean=np.zeros(7), std=np.ones(7), min=q01, max=q99, q01=q01, q99=q99[:3])
