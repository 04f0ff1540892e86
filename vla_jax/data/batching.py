"""OpenVLA-style prompts and action-token targets for a host batch of frames (numpy, on host).

Each frame's instruction becomes OpenVLA's prompt, its normalised action chunk [H, A]
becomes H * A action tokens (`vla_jax.actions.ActionTokenizer`), and
`vla_jax.text.openvla_inputs` lays them out as BOS, prompt, "▁", action tokens, EOS.
With `state_dims` (`DataConfig.proprio_dims`), the chosen dimensions of each frame's
normalised robot state are written as number tokens (the action bins' ids, like
PaliGemma's location tokens) between the prompt and "▁": the policy then knows, e.g.,
whether its gripper is closed, which a 64-pixel camera barely shows.
Only the action tokens and EOS are supervised (`loss_mask`). Rows are right-padded to
`max_length` with `attention_mask` False on padding. A sequence longer than
`max_length` is cut at `max_length` (its last targets are lost) and counted: the caller
logs a warning with the running count instead of truncating silently.

Action ids must never occur in a prompt (`check_prompt_ids`): OpenVLA writes its 256
action bins onto Llama-2's last 256 ids, which English text never produces; in a small
tokenizer those ids would be common words, and action bins and instruction words would
share embeddings and output rows. Such a tokenizer is refused with the overlap named.
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from vla_jax.actions import ActionTokenizer
from vla_jax.errors import InputError
from vla_jax.text import Tokenizer, openvla_inputs


def check_prompt_ids(prompt_ids: Sequence[int], action_tokenizer: ActionTokenizer,
                     tokenizer: Tokenizer, instruction: str) -> None:
  """InputError if a prompt's ids fall into the action tokenizer's id range.

  Args:
    prompt_ids: the prompt's token ids (BOS and the trailing "▁" included).
    action_tokenizer: the action-bin ids to keep free.
    tokenizer: the text tokenizer (to name the colliding pieces).
    instruction: the instruction the prompt was made from (for the message).
  """
  ids = np.asarray(prompt_ids)
  clash = sorted(set(ids[action_tokenizer.is_action_token(ids)].tolist()))
  if not clash:
    return
  first, last = action_tokenizer.token_range()
  pieces = [tokenizer.decode([i]) or f"<id {i}>" for i in clash[:8]]
  raise InputError(
      f"The prompt of instruction {instruction!r} tokenises to ids {clash[:8]} (pieces "
      f"{pieces}){' and more' if len(clash) > 8 else ''}, which are action-bin ids "
      f"({first}..{last}, the last {action_tokenizer.n_bins} of the tokenizer's "
      f"{tokenizer.vocab_size}): action tokens and instruction words would share "
      f"embeddings and output rows. Use a tokenizer with ids reserved for actions "
      f"(vla_jax.text.train_sentencepiece(..., action_ids={action_tokenizer.n_bins}); the "
      f"bundled tokenizer has them), or one whose last {action_tokenizer.n_bins} pieces never "
      f"occur in instructions (Llama-2 for OpenVLA).")


def state_token_ids(states: np.ndarray, state_dims: Sequence[int],
                    action_tokenizer: ActionTokenizer) -> np.ndarray:
  """int32 [B, len(state_dims)]: number tokens of normalised states [B, D] (in [-1, 1]).

  Raises:
    InputError: states of the wrong rank or too few dimensions, or NaN/inf.
  """
  states = np.asarray(states, np.float64)
  if states.ndim != 2 or (state_dims and max(state_dims) >= states.shape[1]):
    raise InputError(f"states must be [B, D] with D > {max(state_dims, default=-1)} (the "
                     f"proprio_dims {tuple(state_dims)}), got shape {states.shape}.")
  chosen = states[:, list(state_dims)]
  if not np.all(np.isfinite(chosen)):
    raise InputError(f"robot states hold NaN/inf in proprio dims {tuple(state_dims)}; the "
                     "policy writes them into its prompt. Pass finite states.")
  return action_tokenizer.encode(np.clip(chosen, -1.0, 1.0)).astype(np.int32)


def tokenize_batch(instructions: np.ndarray, actions: np.ndarray, tokenizer: Tokenizer,
                   action_tokenizer: ActionTokenizer, max_length: int,
                   pad_id: int, states: Optional[np.ndarray] = None,
                   state_dims: Sequence[int] = ()) -> Tuple[Dict[str, np.ndarray], int]:
  """Prompts + action targets for B frames.

  Args:
    instructions: [B] bytes or str.
    actions: [B, H, A] normalised actions in [-1, 1] (the pipeline's output).
    tokenizer: the Llama-2 tokenizer (vla_jax.text.Tokenizer).
    action_tokenizer: maps [-1, 1] to the last vocabulary ids.
    max_length: L, the padded sequence length.
    pad_id: id written at padded positions (OpenVLA: 32000).
    states: [B, D] normalised states (the pipeline's `observation/state`); needed when
      `state_dims` is not empty.
    state_dims: which state dimensions go into the prompt (`state_token_ids`).
  Returns:
    ({"tokens": int32 [B, L], "loss_mask": bool [B, L], "attention_mask": bool [B, L]},
     number of rows that were longer than L and cut).
  Raises:
    InputError: a prompt uses action-bin ids (`check_prompt_ids`).
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
  state_ids = np.zeros((batch, 0), np.int32)
  if state_dims:
    if states is None:
      raise InputError(f"tokenize_batch got state_dims={tuple(state_dims)} but no states.")
    state_ids = state_token_ids(states, state_dims, action_tokenizer)
  truncated = 0
  for row, (text, ids_row) in enumerate(zip(instructions, action_ids)):
    text = text.decode() if isinstance(text, bytes) else str(text)
    ids, mask = openvla_inputs(tokenizer, text, ids_row, state_ids[row])
    prompt = ids[~mask]
    check_prompt_ids(np.delete(prompt, np.arange(len(prompt) - 1 - len(state_ids[row]),
                                                 len(prompt) - 1)),
                     action_tokenizer, tokenizer, text)
    if len(ids) > max_length:
      truncated += 1
      ids, mask = ids[:max_length], mask[:max_length]
    tokens[row, :len(ids)] = ids
    loss_mask[row, :len(ids)] = mask
    attention_mask[row, :len(ids)] = True
  return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention_mask}, truncated
