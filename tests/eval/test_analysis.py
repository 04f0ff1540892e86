"""Probe, attention, t-SNE, greedy decoding and open-loop metrics on a small random VLA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.train.helpers import small_experiment
from vla_jax.actions import ActionTokenizer, NormStats
from vla_jax.eval import attention as attention_lib
from vla_jax.eval import open_loop
from vla_jax.eval import policy as policy_lib
from vla_jax.eval import probe as probe_lib
from vla_jax.eval import tsne as tsne_lib
from vla_jax.models import llm as llm_lib
from vla_jax.models.vla import VLA
from vla_jax.sim import catalogue as cat
from vla_jax.text import openvla_prompt, train_sentencepiece


@pytest.fixture(scope="module")
def student():
  # The vocabulary covers the tokenizer fixture's 300 text + 256 action ids and <PAD>.
  experiment = small_experiment(depth=2, vocab_size=640)
  model = VLA(experiment.model)
  images = jnp.zeros((1, 64, 64, 3))
  params = jax.jit(model.init)(jax.random.key(0), images, jnp.ones((1, 4), jnp.int32))["params"]
  return model, params


@pytest.fixture(scope="module", params=["tiny", "tiny_paligemma"])
def any_student(request, student):
  """The `student` above, and a PaliGemma-layout one (visual tokens first, prefix-LM)."""
  if request.param == "tiny":
    return student
  experiment = small_experiment("tiny_paligemma", depth=2, vocab_size=640)
  model = VLA(experiment.model)
  images = jnp.zeros((1, 64, 64, 3))
  params = jax.jit(model.init)(jax.random.key(0), images, jnp.ones((1, 4), jnp.int32))["params"]
  return model, params


@functools.partial(jax.jit, static_argnums=0, static_argnames=("align_layer",
                                                               "return_all_hidden"))
def _apply(model, params, images, tokens, input_mask=None, **kwargs):
  """`model.apply` compiled as one program (run eagerly, each of its ops compiles alone)."""
  return model.apply({"params": params}, images, tokens, input_mask, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  prompts = [openvla_prompt(f"put the {o.name} on the plate") for o in cat.OBJECTS]
  return train_sentencepiece(prompts + ["Do you see the red cube?"], root / "tok.model",
                             vocab_size=300, action_ids=256)


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- probe
def test_probe_is_perfect_on_label_features_and_chance_on_noise():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 800).astype(np.int32)
  trivial = np.eye(10, dtype=np.float32)[labels] + rng.normal(0, 0.05, (800, 10)).astype(np.float32)
  result = probe_lib.probe_features(trivial, labels, unseen=labels >= 7)
  assert result["test_top1"] >= 0.99 and result["test_unseen_top1"] >= 0.99
  noise = rng.normal(size=(800, 16)).astype(np.float32)
  result = probe_lib.probe_features(noise, labels)
  assert result["test_top1"] < result["chance"] + 0.1


def test_object_image_set_labels_and_unseen_objects():
  images, labels, unseen = probe_lib.object_image_set(2, 64, seed=0, objects=(0, 16))
  assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])
  np.testing.assert_array_equal(unseen, [False, False, True, True])
  assert not np.array_equal(images[0], images[1])  # different scenes per seed


def test_student_features_do_not_depend_on_the_prompt(student):
  model, params = student
  images = _images(2)
  features = probe_lib.student_features(model, params, images, layer=1)
  tokens = np.array([[1, 17, 42, 9], [1, 5, 6, 7]], np.int32)
  out = _apply(model, params, images, tokens, align_layer=1)
  np.testing.assert_allclose(features, np.asarray(out["align_hidden"]).mean(1), atol=1e-5)


# ---------------------------------------------------------------------------- attention
def test_attention_probs_rebuild_the_next_hidden_state(any_student):
  """Exactness: probs @ v -> o_proj -> residual -> MLP must equal hidden[layer + 1] (for
  PaliGemma also the prefix-LM mask and positions from 1 must be the model's)."""
  model, params = any_student
  cfg = model.config.llm
  tokens = np.array([[1, 30, 31, 32, 33, 0], [1, 40, 41, 0, 0, 0]], np.int32)
  lengths = np.array([5, 3], np.int32)
  mask = np.arange(6)[None] < lengths[:, None]
  out = _apply(model, params, _images(2), tokens, mask, return_all_hidden=True)
  attn_mask, positions = attention_lib.sequence_mask_and_positions(model, jnp.asarray(mask))

  @jax.jit  # one program for both layers (same shapes)
  def probs_and_next_hidden(block, x):
    probs = attention_lib.attention_probs(cfg, block, x, attn_mask, positions)
    h = llm_lib.RMSNorm(cfg.family, cfg.norm_eps).apply(
        {"params": block["pre_attention_norm"]}, x)
    hd, group = cfg.effective_head_dim, cfg.num_heads // cfg.effective_num_kv_heads
    v = (h @ block["attn"]["v_proj"]["kernel"]).reshape(*x.shape[:2], -1, hd)
    v = jnp.repeat(v, group, axis=2)  # query head h reads kv head h // group
    encoded = jnp.einsum("bhqs,bshd->bqhd", probs, v).reshape(*x.shape[:2], -1)
    x = x + encoded @ block["attn"]["o_proj"]["kernel"]
    h = llm_lib.RMSNorm(cfg.family, cfg.norm_eps).apply({"params": block["pre_ffw_norm"]}, x)
    return probs, x + llm_lib.MLP(cfg).apply({"params": block["mlp"]}, h)

  for layer in range(cfg.depth):
    probs, x = probs_and_next_hidden(params["llm"][f"layers_{layer}"], out["hidden"][layer])
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x), np.asarray(out["hidden"][layer + 1]), atol=2e-4)


def test_visual_attention_ignores_padding_and_normalises(any_student):
  model, params = any_student
  images = _images(2, 1)
  row = [1, 30, 31, 32]
  short = np.array([row, row], np.int32)
  padded = np.array([row + [0, 0], row + [0, 0]], np.int32)
  lengths = np.array([4, 4], np.int32)
  maps = jax.jit(attention_lib.visual_attention, static_argnums=(0, 5))  # not op by op
  a = maps(model, params, images, short, lengths, (0, 1))
  b = maps(model, params, images, padded, lengths, (0, 1))
  assert a.shape == (2, 2, 8, 8)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert 0 < float(a.sum((2, 3)).max()) <= 1.0 + 1e-6
  ratio = attention_lib.normalized_attention(np.asarray(a), np.asarray(a))
  np.testing.assert_allclose(ratio, 1.0, atol=1e-4)
  picture = attention_lib.overlay(images[0], np.asarray(a[0, 0]))
  assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


# ---------------------------------------------------------------------------- t-SNE
@pytest.mark.slow  # 12 s: the fast path keeps the probe and attention checks of this module
def test_object_token_positions_and_tsne_plot(student, tokenizer, tmp_path):
  model, params = student
  names = ["red cube", "carrot"]
  tokens, lengths, index = tsne_lib.object_prompt_tokens(tokenizer, names)
  for row, name in enumerate(names):
    upto = tokenizer.encode(f"Do you see the {name}")
    assert index[row] == len(upto) - 1 and tokens[row, index[row]] == upto[-1]
  embeddings = tsne_lib.object_token_embeddings(model, params, _images(2), tokens, lengths,
                                                index, layer=1)
  out = _apply(model, params, _images(2), tokens,
               np.arange(tokens.shape[1])[None] < lengths[:, None], return_all_hidden=True)
  n = model.config.num_visual_tokens
  np.testing.assert_allclose(embeddings[1], np.asarray(out["hidden"][1][1, index[1] + n]),
                             atol=1e-5)
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  points = tsne_lib.tsne_plot(rng.normal(size=(30, 8)) + 10 * labels[:, None], labels,
                              ["a", "b", "c"], str(tmp_path / "t.png"))
  assert points.shape == (30, 2) and Image.open(tmp_path / "t.png").size[0] > 100


# ---------------------------------------------------------------------------- policy
def _stats(dim=7):
  return NormStats(mean=np.zeros(dim), std=np.ones(dim), min=-np.ones(dim), max=np.ones(dim),
                   q01=-2 * np.ones(dim), q99=2 * np.ones(dim),
                   mask=[True] * (dim - 1) + [False])


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(student, tokenizer):
  model, params = student
  policy = policy_lib.VLAPolicy(model, params, tokenizer, _stats())
  images = _images(2, 2)
  texts = ["put the red cube on the plate", "put the lime flower on the plate"]
  tokens, lengths = policy.prompt_batch(texts)
  assert lengths[0] != lengths[1]  # rows of different length share one padded buffer
  # Called as the policy calls it, so that `policy(...)` below reuses this compilation.
  full = np.asarray(policy_lib.greedy_action_tokens(model, params, policy.preprocess(images),
                                                    tokens, lengths, 7, use_cache=True))
  steps = 3  # each step of the plain loop below compiles anew; three show the recursion
  for row, text in enumerate(texts):
    ids = list(tokens[row, :lengths[row]])
    for _ in range(steps):  # the plain loop: re-run the unpadded sequence, append the argmax
      logits = _apply(model, params, policy.preprocess(images[row:row + 1]),
                      np.asarray([ids], np.int32))["logits"]
      ids.append(int(jnp.argmax(logits[0, -1])))
    assert list(full[row, :steps]) == ids[-steps:], text
  actions = policy(images, texts, np.zeros((2, 7), np.float32))
  assert actions.shape == (2, 7) and actions.dtype == np.float32 and np.isfinite(actions).all()
  expected = _stats().unnormalize(policy.action_tokenizer.decode(full.astype(np.int64)))
  np.testing.assert_allclose(actions, expected, rtol=1e-6)


def test_policy_preprocessing_is_the_serving_function(student, tokenizer):
  from vla_jax.data import augment
  model, params = student
  policy = policy_lib.VLAPolicy(model, params, tokenizer, _stats())
  frames = _images(2, 5)[:, :48, :]
  frames = np.ascontiguousarray(np.concatenate([frames, frames[:, :16]], 1))  # 64 x 64
  np.testing.assert_array_equal(policy.preprocess(frames), np.stack(
      [augment.preprocess_for_serving(f, 64) for f in frames]))


# ---------------------------------------------------------------------------- open loop
def test_open_loop_metrics_are_perfect_on_the_models_own_predictions(student):
  model, params = student
  action_tokenizer = ActionTokenizer(vocab_size=384, n_bins=64)
  # Zero output weights for non-action ids: the argmax is then (almost surely) an action id.
  head = params["llm"]["lm_head"]["kernel"]
  keep = np.asarray(action_tokenizer.is_action_token(np.arange(head.shape[1])))
  params = {**params, "llm": {**params["llm"], "lm_head": {"kernel": head * keep}}}
  stats = _stats(3)
  rng = np.random.default_rng(0)
  tokens = np.zeros((2, 10), np.int32)
  tokens[:, :4] = [[1, 30, 31, 32], [1, 40, 41, 42]]
  tokens[:, 4:7] = action_tokenizer.encode(rng.uniform(-1, 1, (2, 3)))
  tokens[:, 7] = 2
  loss_mask = np.zeros((2, 10), bool)
  loss_mask[:, 4:8] = True
  batch = {"images": _images(2, 3), "tokens": tokens, "input_mask": np.tile(np.arange(10) < 8, (2, 1)),
           "loss_mask": loss_mask}
  batch["actions"] = action_tokenizer.decode(tokens[:, 4:7].astype(np.int64)).astype(np.float32)
  before = open_loop.open_loop_metrics(model, params, [batch], action_tokenizer, stats)
  # Causality: after k rounds of writing back the predictions, the first k are fixed points.
  predict = jax.jit(open_loop.predicted_action_tokens, static_argnums=0)
  for _ in range(3):
    predicted = np.asarray(predict(model, params, batch))
    batch = dict(batch, tokens=np.concatenate([tokens[:, :4], predicted[:, 4:7], tokens[:, 7:]], 1))
  batch["actions"] = action_tokenizer.decode(
      batch["tokens"][:, 4:7].astype(np.int64)).astype(np.float32)
  after = open_loop.open_loop_metrics(model, params, [batch], action_tokenizer, stats)
  assert after["token_accuracy"] == 1.0 and after["l1_mean"] == pytest.approx(0, abs=1e-6)
  assert len(after["l1_per_dim"]) == 3 and after["frames"] == 2
  assert before["token_accuracy"] < 1.0
