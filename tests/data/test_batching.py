"""Action ids never collide with prompt words: the bundled tokenizer and the refusal."""

import numpy as np
import pytest

from vla_jax.actions import ActionTokenizer
from vla_jax.data import batching
from vla_jax.errors import InputError
from vla_jax.sim import bundled
from vla_jax.text import Tokenizer, openvla_inputs, openvla_prompt, train_sentencepiece

ACTIONS = np.zeros((1, 1, 7), np.float32)


@pytest.fixture(scope="module")
def bundled_tokenizer(tmp_path_factory):
  return Tokenizer.from_path(bundled.bundled_tokenizer_path(str(tmp_path_factory.mktemp("c"))))


def test_bundled_tokenizer_keeps_its_last_256_ids_for_actions(bundled_tokenizer):
  tok = bundled_tokenizer
  actions = ActionTokenizer(vocab_size=tok.vocab_size)
  first, last = actions.token_range()
  assert (first, last) == (bundled.TOKENIZER_TEXT_PIECES, tok.vocab_size - 1)
  # Every instruction of every split, as a prompt, stays below the action ids.
  used = set()
  for text in bundled.benchmark_instructions():
    ids, _ = openvla_inputs(tok, text)
    used.update(ids.tolist())
  assert max(used) < first
  # Action ids are control pieces: no text encodes to them, and they decode to nothing.
  assert first not in tok.encode("<action_0> " + openvla_prompt("put the carrot on <action_1>"))
  assert tok.decode([first, last]) == ""
  # The OOD splits' words are pieces, not byte fallback (the tokenizer saw them).
  assert len(tok.encode("put the lime flower on the hexagonal mat", add_bos=False)) <= 12


def test_bundled_tokenizer_is_deterministic(bundled_tokenizer, tmp_path):
  other = bundled.bundled_tokenizer_path(str(tmp_path))
  assert open(other, "rb").read() == open(bundled_tokenizer.path, "rb").read()


def test_tokenizer_whose_action_ids_are_prompt_words_is_refused(tmp_path):
  prompts = [openvla_prompt(f"put the {o} on the plate") for o in ("red cube", "carrot")]
  # Without reserved ids the last 256 of 300 pieces are the prompts' own words.
  clashing = train_sentencepiece(prompts * 4, tmp_path / "old.model", vocab_size=300)
  action_tokenizer = ActionTokenizer(vocab_size=clashing.vocab_size)
  with pytest.raises(InputError, match=r"action-bin ids .*action_ids=256"):
    batching.tokenize_batch(np.array([b"put the red cube on the plate"]), ACTIONS, clashing,
                            action_tokenizer, 48, clashing.vocab_size)
  reserved = train_sentencepiece(prompts * 4, tmp_path / "new.model", vocab_size=300,
                                 action_ids=256)
  assert reserved.vocab_size == clashing.vocab_size + 256
  action_tokenizer = ActionTokenizer(vocab_size=reserved.vocab_size)
  batch, _ = batching.tokenize_batch(np.array([b"put the red cube on the plate"]), ACTIONS,
                                     reserved, action_tokenizer, 96, reserved.vocab_size)
  targets = batch["tokens"][batch["loss_mask"]]
  assert (targets[:7] >= clashing.vocab_size).all() and targets[7] == reserved.eos_id


def test_llama2_keeps_openvlas_layout(shared_data):
  llama = Tokenizer.from_path(shared_data / "tokenizers" / "llama2.model")
  action_tokenizer = ActionTokenizer(vocab_size=llama.vocab_size)
  assert action_tokenizer.token_range() == (31744, 31999)
  texts = np.array([t.encode() for t in bundled.benchmark_instructions()[::97]])
  batch, _ = batching.tokenize_batch(texts, np.zeros((len(texts), 1, 7), np.float32), llama,
                                     action_tokenizer, 64, 32000)
  assert (batch["tokens"][batch["loss_mask"]].reshape(len(texts), 8)[:, :7] >= 31744).all()


# ----------------------------------------------------------------- proprio tokens ----
def _state_stats(dim=7):
  from vla_jax.actions import NormStats  # pylint: disable=g-import-not-at-top
  low, high = np.full(dim, -0.2), np.full(dim, 0.2)
  high[6], low[6] = 1.0, 0.0
  return NormStats(mean=np.zeros(dim), std=np.ones(dim), min=low, max=high, q01=low,
                   q99=high, mask=np.ones(dim, bool))


def test_state_tokens_sit_between_prompt_and_space_and_are_not_supervised(bundled_tokenizer):
  tok = bundled_tokenizer
  action_tokenizer = ActionTokenizer(vocab_size=tok.vocab_size)
  text = b"put the carrot on the plate"
  states = np.array([[0.1, -0.3, -1.0, 0, 0, 0.5, 1.0]], np.float32)  # normalised
  plain, _ = batching.tokenize_batch(np.array([text]), ACTIONS, tok, action_tokenizer, 48,
                                     tok.vocab_size)
  with_state, _ = batching.tokenize_batch(np.array([text]), ACTIONS, tok, action_tokenizer,
                                          48, tok.vocab_size, states=states, state_dims=(2, 6))
  prompt = plain["tokens"][0][~plain["loss_mask"][0] & plain["attention_mask"][0]]
  ids = with_state["tokens"][0][with_state["attention_mask"][0]]
  n = len(prompt)
  expected_state = action_tokenizer.encode(np.array([-1.0, 1.0]))
  np.testing.assert_array_equal(ids[:n - 1], prompt[:-1])
  np.testing.assert_array_equal(ids[n - 1:n + 1], expected_state)
  assert ids[n + 1] == prompt[-1]  # "▁" still ends the prompt
  assert not with_state["loss_mask"][0][:n + 2].any()  # state ids are input only
  np.testing.assert_array_equal(with_state["tokens"][0][with_state["loss_mask"][0]],
                                plain["tokens"][0][plain["loss_mask"][0]])
  # Different states give different prompts; the action targets stay the same.
  other, _ = batching.tokenize_batch(np.array([text]), ACTIONS, tok, action_tokenizer, 48,
                                     tok.vocab_size, states=-states, state_dims=(2, 6))
  assert not np.array_equal(other["tokens"], with_state["tokens"])


def test_state_token_errors_name_the_problem(bundled_tokenizer):
  tok = bundled_tokenizer
  action_tokenizer = ActionTokenizer(vocab_size=tok.vocab_size)
  text = np.array([b"put the carrot on the plate"])
  with pytest.raises(InputError, match="no states"):
    batching.tokenize_batch(text, ACTIONS, tok, action_tokenizer, 48, 0, state_dims=(2,))
  with pytest.raises(InputError, match=r"D > 6"):
    batching.tokenize_batch(text, ACTIONS, tok, action_tokenizer, 48, 0,
                            states=np.zeros((1, 3)), state_dims=(2, 6))
  with pytest.raises(InputError, match="NaN"):
    batching.tokenize_batch(text, ACTIONS, tok, action_tokenizer, 48, 0,
                            states=np.full((1, 7), np.nan), state_dims=(2,))


def test_policy_prompts_equal_training_prompts_with_state(bundled_tokenizer):
  """The serving path builds the very token prefix training fed, state tokens included."""
  from vla_jax.eval.policy import VLAPolicy  # pylint: disable=g-import-not-at-top
  from vla_jax.models import vla as vla_lib  # pylint: disable=g-import-not-at-top
  tok = bundled_tokenizer
  action_tokenizer = ActionTokenizer(vocab_size=tok.vocab_size)
  stats = _state_stats()
  model = vla_lib.VLA(vla_lib.vla_config("tiny"))
  policy = VLAPolicy(model, None, tok, stats, proprio_dims=(2, 6), state_stats=stats)
  texts = ["put the carrot on the plate", "put the red cube in the bowl"]
  raw = np.array([[0.0, -0.19, 0.1, 0, 0, 0, 1.0], [0.05, 0.1, 0.015, 0, 0, 0.3, 0.0]])
  tokens, lengths = policy.prompt_batch(texts, raw)
  train, _ = batching.tokenize_batch(np.array([t.encode() for t in texts]),
                                     np.zeros((2, 1, 7), np.float32), tok, action_tokenizer,
                                     48, tok.vocab_size, states=stats.normalize(raw),
                                     state_dims=(2, 6))
  for row in range(2):
    prompt = train["tokens"][row][~train["loss_mask"][row] & train["attention_mask"][row]]
    np.testing.assert_array_equal(tokens[row, :lengths[row]], prompt)
  with pytest.raises(InputError, match="pass states"):
    policy.prompt_batch(texts)
  with pytest.raises(InputError, match=r"states must be \[B=2, 7\]"):
    policy.prompt_batch(texts, raw[:, :3])
