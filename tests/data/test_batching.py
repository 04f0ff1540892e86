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
