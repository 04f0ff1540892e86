"""OpenVLA-style prompts and action-token targets for a host batch of frames (numpy, on host).

Each frame's instruction becomes OpenVLA's prompt, its normalised action chunk [H, A]
becomes H * A action tokens (`vla_jax.actions.ActionTokenizer`), and
`vla_jax.text.openvla_inputs` lays them out as BOS, prompt, "▁", action tokens, EOS.
Only the action tokens and EOS are supervised (`loss_mask`). Rows are right-padded to
`max_length` with `attention_mask` False on padding. A sequence longer than
`max_length` is cut at `max_length` (its last targets are lost) and counted: the caller
logs a warning with the running count instead of truncating silently.
"""

from typing import Dict, Tuple

import numpy as np

from vla_jax.actions import ActionTokenizer
from vla_jax.errors import InputError
from vla_jax.text import Tokenizer, openvla_inputs


def tokenize_batch(instructions: np.ndarray, actions: np.ndarray, tokenizer: Tokenizer,
                   action_tokenizer: ActionTokenizer, max_length: int,
                   pad_id: int) -> Tuple[Dict[str, np.ndarray], int]:
  """Prompts + action targets for B frames.

  Args:
    instructions: [B] bytes or str.
    actions: [B, H, A] normalised actions in [-1, 1] (the pipeline's output).
    tokenizer: the Llama-2 tokenizer (vla_jax.text.Tokenizer).
    action_tokenizer: maps [-1, 1] to the last vocabulary ids.
    max_length: L, the padded sequence length.
    pad_id: id written at padded positions (OpenVLA: 32000).
  Returns:
    ({"tokens": int32 [B, L], "loss_mask": bool [B, L], "attention_mask": bool [B, L]},
     number of rows that were longer than L and cut).
  """
  actions = np.asarray(actions)
  if actions.ndim != 3 or actions.shape[0] != len(instructions):
    raise InputError(f"tokenize_batch expects actions [B, H, A] for B={len(instructions)} "
                     f"instructions, got shape {actions.shape}.")
  batch = len(instructions)
  tokens = np.full((batch, max_length), pad_id, np.int32)
  loss_mask = np.zeros((batch, max_length), bool)
  attention_mask = np.zeros((batch, max_length), bool)
  action_ids = action_tokenizer.encode(actions.reshape(batch, -1).astype(np.float64))
  truncated = 0
  for row, (text, ids_row) in enumerate(zip(instructions, action_ids)):
    text = text.decode() if isinstance(text, bytes) else str(text)
    ids, mask = openvla_inputs(tokenizer, text, ids_row)
    if len(ids) > max_length:
      truncated += 1
      ids, mask = ids[:max_length], mask[:max_length]
    tokens[row, :len(ids)] = ids
    loss_mask[row, :len(ids)] = mask
    attention_mask[row, :len(ids)] = True
  return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention_mask}, truncated
