"""Tests of the tokenizer wrapper and prompt builders (vla_jax/text.py) against transformers."""

import shutil

import numpy as np
import pytest

from vla_jax.errors import ConfigError, InputError
from vla_jax.text import (Tokenizer, openvla_inputs, openvla_prompt, paligemma_inputs,
                          paligemma_prefix)

TEXTS = [
    "In: What action should the robot take to put the carrot on the plate?\nOut:",
    "Hello  world\n\nfoo",  # double spaces and newlines
    " leading space and trailing ",
    "émoji 🤖, digits 12345 and CamelCase",
    "",
]


@pytest.fixture(scope="module")
def llama_path(shared_data):
  return shared_data / "tokenizers" / "llama2.model"


@pytest.fixture(scope="module")
def tokenizer(llama_path):
  return Tokenizer.from_path(llama_path)


@pytest.fixture(scope="module")
def hf_slow(llama_path):
  """transformers' slow SentencePiece Llama tokenizer, legacy behaviour (as OpenVLA)."""
  from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
  return SentencePieceBackend(vocab_file=str(llama_path), legacy=True, bos_token="<s>",
                              eos_token="</s>", unk_token="<unk>")


def _hf_ids(hf, text):
  return [hf.bos_token_id] + hf.encode(text, add_special_tokens=False)


def test_llama_ids_match_transformers(tokenizer, hf_slow):
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
  assert tokenizer.vocab_size == hf_slow.vocab_size
  assert tokenizer.pad_id is None
  for text in TEXTS:
    assert tokenizer.encode(text) == _hf_ids(hf_slow, text), text
    assert tokenizer.encode(text, add_bos=False, add_eos=True) == (
        hf_slow.encode(text, add_special_tokens=False) + [hf_slow.eos_token_id])


def test_llama_matches_sentencepiece_directly(tokenizer, llama_path):
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_path))
  for text in TEXTS:
    assert tokenizer.encode(text, add_bos=False) == sp.encode(text)


def test_decode_round_trip(tokenizer):
  for text in TEXTS[:2] + TEXTS[3:]:  # SentencePiece drops a leading space (TEXTS[2])
    ids = tokenizer.encode(text, add_eos=True)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.asarray(ids)) == text


def test_openvla_prompt_is_exact_and_tokenises_like_openvla(tokenizer, hf_slow):
  prompt = openvla_prompt("Put the Carrot on the plate.")
  assert prompt == "In: What action should the robot take to put the carrot on the plate.?\nOut:"
  ids = tokenizer.encode(prompt)
  assert ids == _hf_ids(hf_slow, prompt)
  assert ids[:3] == [1] + hf_slow.encode("In:", add_special_tokens=False)


def test_openvla_training_sequence_matches_transformers(tokenizer, hf_slow, llama_path, tmp_path):
  """OpenVLA tokenises prompt + decoded action characters + "</s>" as one string."""
  action_ids = [int(i) for i in np.random.default_rng(0).integers(31744, 32000, 7)]
  ids, loss_mask = openvla_inputs(tokenizer, "Put the carrot on the plate", action_ids)
  text = ("In: What action should the robot take to put the carrot on the plate?\nOut: "
          + hf_slow.decode(action_ids) + "</s>")
  assert ids.tolist() == _hf_ids(hf_slow, text)
  # The fast tokenizer OpenVLA actually loads (converted from the same model file).
  from transformers import LlamaTokenizer
  shutil.copy(llama_path, tmp_path / "tokenizer.model")
  fast = LlamaTokenizer.from_pretrained(str(tmp_path), legacy=True)
  assert ids.tolist() == _hf_ids(fast, text)
  # Loss on the 7 action tokens and EOS, as OpenVLA's labels.
  assert loss_mask.sum() == 8 and loss_mask[-8:].all() and ids[-1] == 2
  inference_ids, inference_mask = openvla_inputs(tokenizer, "put the carrot on the plate")
  assert inference_ids.tolist() == ids[:-8].tolist() and not inference_mask.any()
  assert inference_ids[-1] == 29871  # what OpenVLA's predict_action appends


def test_paligemma_inputs(tokenizer):
  prefix = paligemma_prefix("pick up the cup", task_prefix="act en ")
  assert prefix == "act en pick up the cup"
  ids, loss_mask = paligemma_inputs(tokenizer, prefix, [100, 200])
  head = tokenizer.encode(prefix + "\n")
  assert ids.tolist() == head + [100, 200, tokenizer.eos_id]
  assert ids[0] == tokenizer.bos_id
  assert loss_mask.tolist() == [False] * len(head) + [True] * 3
  ids, loss_mask = paligemma_inputs(tokenizer, prefix)
  assert ids.tolist() == head and not loss_mask.any()


def _write_hf_tokenizer(directory):
  """A small BPE tokenizer.json written by the `tokenizers` library itself."""
  from tokenizers import Tokenizer as HfTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers
  hf = HfTokenizer(models.BPE(unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["put the carrot on the plate", "pick up the red cup", "open the drawer"] * 20
  hf.train_from_iterator(corpus, trainer)
  path = directory / "tokenizer.json"
  hf.save(str(path))
  return hf, path


def test_hf_tokenizer_json_loads_and_round_trips(tmp_path):
  hf, path = _write_hf_tokenizer(tmp_path)
  for source in (path, tmp_path):
    tok = Tokenizer.from_path(source)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=False)
    text = "put the red carrot in the drawer"
    ids = tok.encode(text, add_eos=True)
    assert ids == [2] + hf.encode(text).ids + [3]
    assert tok.decode(ids) == text


def test_hf_special_tokens_from_config(tmp_path):
  _, _ = _write_hf_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(
      '{"bos_token": {"content": "</s>"}, "eos_token": "<s>"}')
  tok = Tokenizer.from_path(tmp_path, pad_id=7)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 2, 7)


def test_errors(tmp_path, tokenizer):
  with pytest.raises(ConfigError, match="does not exist"):
    Tokenizer.from_path(tmp_path / "missing.model")
  with pytest.raises(ConfigError, match="No tokenizer in directory"):
    Tokenizer.from_path(tmp_path)
  (tmp_path / "vocab.txt").write_text("a\n")
  with pytest.raises(ConfigError, match="Unrecognised"):
    Tokenizer.from_path(tmp_path / "vocab.txt")
  with pytest.raises(InputError, match="str"):
    tokenizer.encode(["not", "a", "string"])


def test_train_sentencepiece_is_deterministic_and_round_trips(tmp_path):
  from vla_jax.text import train_sentencepiece
  texts = [openvla_prompt(f"put the {c} {s} on the {r}") for c in ("red", "blue", "green")
           for s in ("cube", "ball", "star") for r in ("plate", "board", "bowl")] * 5
  a = train_sentencepiece(texts, tmp_path / "a.model", vocab_size=320)
  b = train_sentencepiece(texts, tmp_path / "b.model", vocab_size=320)
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  ids = a.encode(openvla_prompt("put the red cube on the bowl"))
  assert ids[0] == a.bos_id == 1 and a.eos_id == 2 and max(ids) < a.vocab_size <= 320
  assert a.decode(ids) == openvla_prompt("put the red cube on the bowl")
  unseen = "Zebra #9 ünïcode"  # byte fallback: characters never seen still round-trip
  assert a.decode(a.encode(unseen, add_bos=False)) == unseen
  assert b.encode("put the blue star on the plate") == a.encode("put the blue star on the plate")
