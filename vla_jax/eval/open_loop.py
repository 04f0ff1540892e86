"""Open-loop metrics on held-out frames: action-token accuracy and L1 of de-normalised actions.

Teacher-forced, as training's eval step: one forward pass per batch of the train-batch
contract (`train/step.py`), the argmax at every action-token target, the decoded bin
centres of the A action tokens of each row, and both predictions and the recorded actions
un-normalised with the checkpoint's statistics, so the L1 is in the dataset's units per
dimension.
"""

from typing import Any, Dict, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.actions import ActionTokenizer, NormStats
from vla_jax.errors import InputError
from vla_jax.models.vla import VLA
from vla_jax.train import step as step_lib


def predicted_action_tokens(model: VLA, params: Any, batch: Dict[str, np.ndarray]
                            ) -> np.ndarray:
  """Teacher-forced argmax token at every text position: int32 [B, T]."""
  out = model.apply({"params": params}, batch["images"], batch["tokens"], batch["input_mask"])
  return jnp.argmax(step_lib.target_logits(model.config, out["logits"]), -1).astype(jnp.int32)


def open_loop_metrics(model: VLA, params: Any, batches: Iterable[Dict[str, np.ndarray]],
                      action_tokenizer: ActionTokenizer, norm_stats: NormStats
                      ) -> Dict[str, Any]:
  """Token accuracy and per-dimension L1 over `batches` (train-batch contract, normalised
  actions [B, A]).

  Returns:
    {"token_accuracy", "l1_per_dim" [A] (de-normalised), "l1_mean", "l1_normalized_mean",
     "frames", "rows_skipped": rows whose action tokens were cut off by max_length}.
  """
  predict = jax.jit(lambda p, b: predicted_action_tokens(model, p, b))
  correct = total = frames = skipped = 0
  errors, errors_normalized = [], []
  for batch in batches:
    tokens = np.asarray(batch["tokens"])
    targets = np.asarray(batch["loss_mask"], bool) & np.asarray(batch["input_mask"], bool)
    targets &= np.asarray(action_tokenizer.is_action_token(tokens))
    predicted = np.asarray(predict(params, {k: batch[k] for k in ("images", "tokens",
                                                                  "input_mask")}))
    correct += int(np.sum((predicted == tokens) & targets))
    total += int(targets.sum())
    actions = np.asarray(batch["actions"], np.float64)
    dims = actions.shape[-1]
    for row in range(len(tokens)):
      ids = predicted[row][targets[row]]
      if len(ids) != dims:  # a prompt cut by data.max_length (the pipeline warns)
        skipped += 1
        continue
      guess = action_tokenizer.decode(ids.astype(np.int64))
      errors_normalized.append(np.abs(guess - actions[row]))
      errors.append(np.abs(norm_stats.unnormalize(guess) - norm_stats.unnormalize(actions[row])))
      frames += 1
  if not frames:
    raise InputError(f"open_loop_metrics got no complete frame ({skipped} rows lacked their "
                     "action tokens); is the val split empty, or data.max_length too short?")
  l1 = np.mean(errors, axis=0)
  return {"token_accuracy": correct / total, "l1_per_dim": l1.tolist(),
          "l1_mean": float(l1.mean()), "l1_normalized_mean": float(np.mean(errors_normalized)),
          "frames": frames, "rows_skipped": skipped}
