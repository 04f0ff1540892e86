"""Prompt formats of the supported VLAs and one tokenizer interface for both file kinds.

`Tokenizer.from_path` reads a SentencePiece `.model` file (Llama-2, Gemma) with the
`sentencepiece` package, or a Hugging Face `tokenizer.json` with the `tokenizers`
package, and exposes plain-text `encode` / `decode` plus the special ids. Text is
always treated as plain text: a "</s>" inside an instruction stays characters; BOS
and EOS are added by flag. The prompt builders reproduce what each model was trained
on, down to the token: `openvla_inputs` and `paligemma_inputs` return the token ids
and the mask of the positions that carry the loss.
"""

import json
import pathlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from vla_jax.errors import ConfigError, InputError

# ---------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<PAD>", "[PAD]", "<|pad|>")


class _SentencePiece:
  """sentencepiece.SentencePieceProcessor behind the backend interface."""

  def __init__(self, path: pathlib.Path):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"Reading the SentencePiece tokenizer {path} needs the `sentencepiece` "
                        f"package: pip install sentencepiece.") from None
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

  def encode(self, text: str) -> List[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))

  def token_to_id(self, token: str) -> Optional[int]:
    i = self.sp.piece_to_id(token)
    # piece_to_id returns the unk id for unknown pieces.
    return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

  def specials(self) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    return tuple(i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(),
                                                  self.sp.pad_id()))

  def vocab_size(self) -> int:
    return self.sp.get_piece_size()


class _HFTokenizers:
  """tokenizers.Tokenizer (a `tokenizer.json`) behind the backend interface."""

  def __init__(self, path: pathlib.Path):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"Reading the Hugging Face tokenizer {path} needs the `tokenizers` "
                        f"package: pip install tokenizers.") from None
    self.tok = tokenizers.Tokenizer.from_file(str(path))
    self.config = _special_tokens_config(path.parent)

  def encode(self, text: str) -> List[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def token_to_id(self, token: str) -> Optional[int]:
    return self.tok.token_to_id(token)

  def specials(self) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    out = []
    for key, names in (("bos_token", _BOS_NAMES), ("eos_token", _EOS_NAMES),
                       ("pad_token", _PAD_NAMES)):
      configured = self.config.get(key)
      candidates = (configured,) if configured else names
      out.append(next((self.tok.token_to_id(n) for n in candidates
                       if self.tok.token_to_id(n) is not None), None))
    return tuple(out)

  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=False)


def _special_tokens_config(directory: pathlib.Path) -> dict:
  """bos/eos/pad token strings from a HF tokenizer_config.json / special_tokens_map.json."""
  found = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    file = directory / name
    if not file.is_file():
      continue
    data = json.loads(file.read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
      value = data.get(key)
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and key not in found:
        found[key] = value
  return found


class Tokenizer:
  """Plain-text tokenizer with explicit BOS/EOS, over SentencePiece or HF `tokenizers`.

  Attributes:
    bos_id, eos_id: special ids (None if the tokenizer has none).
    pad_id: the padding id, None when the tokenizer defines none (Llama-2; OpenVLA
      appends "<PAD>" = 32000 to the embedding table, pass `pad_id=32000` then).
    vocab_size: the base vocabulary size without added tokens (32000 for Llama-2):
      OpenVLA's action tokens are the last 256 ids below it.
  """

  def __init__(self, backend, path: pathlib.Path, pad_id: Optional[int] = None):
    self._backend = backend
    self.path = path
    self.bos_id, self.eos_id, default_pad = backend.specials()
    self.pad_id = default_pad if pad_id is None else pad_id
    self.vocab_size = backend.vocab_size()

  @classmethod
  def from_path(cls, path, *, pad_id: Optional[int] = None) -> "Tokenizer":
    """Loads `path`: a `.model` file, a `tokenizer.json`, or a directory holding one.

    In a directory `tokenizer.model` (exact SentencePiece behaviour, as the original
    slow Llama tokenizer) is preferred over `tokenizer.json`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
      for name in ("tokenizer.model", "spiece.model", "tokenizer.json"):
        if (path / name).is_file():
          return cls.from_path(path / name, pad_id=pad_id)
      raise ConfigError(f"No tokenizer in directory {path}: expected tokenizer.model, "
                        f"spiece.model or tokenizer.json. Point the tokenizer path at the "
                        f"model's tokenizer file.")
    if not path.is_file():
      raise ConfigError(f"Tokenizer file {path} does not exist. Expected a SentencePiece "
                        f".model file, a tokenizer.json, or a directory with one; fix the "
                        f"tokenizer path in the config.")
    if path.suffix == ".json":
      return cls(_HFTokenizers(path), path, pad_id)
    if path.suffix == ".model":
      return cls(_SentencePiece(path), path, pad_id)
    raise ConfigError(f"Unrecognised tokenizer file {path}: expected a SentencePiece .model "
                      f"file or a Hugging Face tokenizer.json.")

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> List[int]:
    """Plain `text` -> ids, with BOS first / EOS last on request."""
    if not isinstance(text, str):
      raise InputError(f"Tokenizer.encode expects a str, got {type(text).__name__}.")
    ids = self._backend.encode(text)
    if add_bos:
      ids = [self._required("bos_id")] + ids
    if add_eos:
      ids = ids + [self._required("eos_id")]
    return ids

  def decode(self, ids) -> str:
    """ids (list or int array) -> text; special tokens (BOS/EOS) are dropped."""
    return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def token_to_id(self, token: str) -> Optional[int]:
    """The id of vocabulary piece `token` (e.g. "▁"), None if absent."""
    return self._backend.token_to_id(token)

  def _required(self, name: str) -> int:
    value = getattr(self, name)
    if value is None:
      raise ConfigError(f"Tokenizer {self.path} defines no {name[:3].upper()} token; use "
                        f"add_{name[:3]}=False or a tokenizer that has one.")
    return value

  def __repr__(self):
    return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def _eos_id(tokenizer: Tokenizer) -> int:
  if tokenizer.eos_id is None:
    raise ConfigError(f"Tokenizer {tokenizer.path} defines no EOS token, which ends every "
                      f"training target; use the model's own tokenizer.")
  return tokenizer.eos_id


# ---------------------------------------------------------------------------------------
# OpenVLA (Prismatic "pure" prompt, Llama-2 tokenizer).
# ---------------------------------------------------------------------------------------
def openvla_prompt(instruction: str) -> str:
  """OpenVLA's inference prompt, exactly: the instruction is lower-cased, nothing else."""
  return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


def openvla_inputs(tokenizer: Tokenizer, instruction: str,
                   action_ids: Optional[Sequence[int]] = None,
                   state_ids: Sequence[int] = ()) -> Tuple[np.ndarray, np.ndarray]:
  """OpenVLA's token sequence: BOS, prompt, [state tokens], "▁", action tokens, EOS.

  Training tokenises "In: ...?\\nOut: " + action characters + "</s>"; the space before
  the action characters is its own piece "▁" (29871 for Llama-2), which OpenVLA's
  `predict_action` also appends at inference. The loss covers the action tokens and
  EOS. Image tokens are not text: the model inserts them right after BOS.

  OpenVLA reads no proprioception. `state_ids` (an extension, as pi0-FAST writes the
  discretised robot state into its prefix) are number tokens of the normalised state,
  placed after the prompt's "Out:" and before "▁"; they are input, never supervised.

  Args:
    tokenizer: the Llama-2 tokenizer.
    instruction: task text; lower-cased as OpenVLA does.
    action_ids: [A] action token ids (`ActionTokenizer.encode`); None for inference.
    state_ids: [D] state token ids (`ActionTokenizer.encode` of the normalised state).

  Returns:
    (ids [T] int32, loss_mask [T] bool); without actions the ids end at "▁".
  """
  space = tokenizer.token_to_id("\u2581")
  if space is None:
    raise ConfigError(f"Tokenizer {tokenizer.path} has no '\u2581' piece; OpenVLA prompts need "
                      f"the Llama-2 SentencePiece tokenizer.")
  prompt = (tokenizer.encode(openvla_prompt(instruction), add_bos=True)
            + [int(i) for i in state_ids] + [space])
  target = []
  if action_ids is not None:
    target = [int(i) for i in action_ids] + [_eos_id(tokenizer)]
  ids = np.asarray(prompt + target, np.int32)
  loss_mask = np.arange(len(ids)) >= len(prompt)
  return ids, loss_mask


# ---------------------------------------------------------------------------------------
# PaliGemma (prefix-LM: full attention on image + prefix, causal on the suffix).
# ---------------------------------------------------------------------------------------
def paligemma_prefix(instruction: str, task_prefix: str = "") -> str:
  """The text prefix PaliGemma is conditioned on: `task_prefix + instruction`.

  PaliGemma's sequence is [image tokens] + <bos> + prefix + "\\n" + suffix + <eos>;
  e.g. task_prefix="caption en" style prompts, or "" for a bare instruction.
  """
  return f"{task_prefix}{instruction}"


def paligemma_inputs(tokenizer: Tokenizer, prefix: str,
                     suffix_ids: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
  """PaliGemma's text tokens: <bos> + prefix + "\\n", then suffix + <eos> (loss on these).

  As Hugging Face's PaliGemmaProcessor, "prefix\\n" is tokenised as one string. The
  image tokens (placed first by the model) are not part of the returned ids; every
  position where loss_mask is False belongs to the bidirectional prefix.

  Args:
    tokenizer: the Gemma tokenizer.
    prefix: `paligemma_prefix(...)`.
    suffix_ids: target ids (e.g. action tokens) or None for inference.

  Returns:
    (ids [T] int32, loss_mask [T] bool).
  """
  head = tokenizer.encode(prefix + "\n", add_bos=True)
  tail = []
  if suffix_ids is not None:
    tail = [int(i) for i in suffix_ids] + [_eos_id(tokenizer)]
  ids = np.asarray(head + tail, np.int32)
  return ids, np.arange(len(ids)) >= len(head)


# ---------------------------------------------------------------------------------------
# A small tokenizer for self-contained runs.
# ---------------------------------------------------------------------------------------
ACTION_PIECE = "<action_{}>"


def train_sentencepiece(texts: Sequence[str], path, vocab_size: int = 512,
                        action_ids: int = 0) -> "Tokenizer":
  """Trains a Llama-style SentencePiece BPE model on `texts`, writes it to `path`.

  The embedded default trains on the benchmark's instructions so that a fresh machine
  needs no external tokenizer; ids 0/1/2 are unk/BOS/EOS as in Llama-2, and byte
  fallback (as Llama-2) encodes characters never seen in training. Training is
  single-threaded, hence deterministic for the same texts.

  Args:
    texts: training texts.
    path: where the `.model` file goes.
    vocab_size: text pieces (at most; SentencePiece may stop earlier on small corpora).
    action_ids: reserve this many ids *after* the text pieces for action tokens
      (`<action_k>` control pieces: no text ever encodes to them, and they decode to "").
      OpenVLA instead overwrites Llama-2's last 256 ids, which is only safe because those
      pieces are rare in English; in a small tokenizer the last ids are common words.
  """
  import io
  import sentencepiece as spm
  texts = [t for t in texts if t]
  if not texts:
    raise InputError("train_sentencepiece needs at least one non-empty text.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, num_threads=1, byte_fallback=True, minloglevel=2,
      # Llama-2's settings: text kept as is (newlines included), digits split.
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      allow_whitespace_only_pieces=True)
  data = model.getvalue()
  if action_ids:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    for k in range(action_ids):
      piece = proto.pieces.add()
      piece.piece, piece.score = ACTION_PIECE.format(k), 0.0
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    data = proto.SerializeToString()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)
  return Tokenizer.from_path(path)
