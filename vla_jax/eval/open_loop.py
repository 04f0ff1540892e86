"""Open-loop metrics on held-out frames: action-token accuracy and L1 of de-normalised actions.

Token accuracy is teacher-forced, as training's eval step (the argmax at every action-token
target given the recorded tokens before it). The L1 is of the actions the policy would
execute: the A action tokens greedily decoded after each prompt (`eval.policy`'s
decoder), their bin centres and the recorded actions un-normalised with the checkpoint's
statistics, so it is in the dataset's units per dimension. (Teacher forcing would flatter
the later dimensions: given the recorded dx, dy and dz of a straight-line move follow
without looking at the image.) Two numbers say whether the policy reads its camera at all: the L1 of the best
constant action for these frames (the per-dimension median of the recorded actions, an
oracle no image-blind policy can beat), and how many distinct action-token sequences the
policy predicts (a policy that ignores the image predicts one).
"""

from typing import Any, Dict, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.actions import ActionTokenizer, NormStats
from vla_jax.errors import InputError
from vla_jax.eval import policy as policy_lib
from vla_jax.models.vla import VLA
from vla_jax.train import step as step_lib


def predicted_action_tokens(model: VLA, params: Any, batch: Dict[str, np.ndarray]
                            ) -> np.ndarray:
  """Teacher-forced argmax token at every text position: int32 [B, T].

  The student runs as the train step runs it (`step.student_forward`: the prompt is the
  only prefix, so a prefix-LM student cannot see the targets it predicts).
  """
  out = step_lib.student_forward(model, params, batch)
  return jnp.argmax(step_lib.target_logits(model.config, out["logits"]), -1).astype(jnp.int32)


def open_loop_metrics(model: VLA, params: Any, batches: Iterable[Dict[str, np.ndarray]],
                      action_tokenizer: ActionTokenizer, norm_stats: NormStats,
                      action_horizon: int = 1) -> Dict[str, Any]:
  """Token accuracy and per-dimension L1 over `batches` (train-batch contract, normalised
  actions [B, A]).

  With `action_horizon` H > 1 (a chunked run) token accuracy covers all H x A target
  tokens; the L1 metrics compare the chunk's first action, the one `actions` holds.

  Returns:
    {"token_accuracy", "l1_per_dim" [A] (de-normalised), "l1_mean", "l1_normalized_mean",
     "constant_l1_per_dim" [A] and "constant_l1_mean" (the best constant action's L1),
     "l1_vs_constant" (l1_mean / constant_l1_mean: < 1 means the image helps),
     "distinct_predictions" (distinct predicted action-token tuples), "frames",
     "rows_skipped": rows whose action tokens were cut off by max_length}.
  """
  predict = jax.jit(lambda p, b: predicted_action_tokens(model, p, b))
  correct = total = frames = skipped = 0
  errors, errors_normalized, recorded, predictions = [], [], [], set()
  for batch in batches:
    tokens = np.asarray(batch["tokens"])
    targets = np.asarray(batch["loss_mask"], bool) & np.asarray(batch["input_mask"], bool)
    targets &= np.asarray(action_tokenizer.is_action_token(tokens))
    predicted = np.asarray(predict(params, {k: batch[k] for k in ("images", "tokens",
                                                                  "input_mask", "loss_mask")}))
    correct += int(np.sum((predicted == tokens) & targets))
    total += int(targets.sum())
    actions = np.asarray(batch["actions"], np.float64)
    dims = actions.shape[-1]
    decoded = dims * action_horizon
    complete = targets.sum(axis=1) == decoded  # rows cut by data.max_length lack targets
    lengths = np.where(complete, np.argmax(targets, axis=1), 1).astype(np.int32)
    length = max(tokens.shape[1], int(lengths.max()) + decoded)
    buffer = np.pad(tokens, ((0, 0), (0, length - tokens.shape[1])))
    greedy = np.asarray(policy_lib.greedy_action_tokens(
        model, params, np.asarray(batch["images"]), buffer, lengths, decoded))[:, :dims]
    for row in range(len(tokens)):
      if not complete[row]:  # a prompt cut by data.max_length (the pipeline warns)
        skipped += 1
        continue
      ids = greedy[row]
      predictions.add(tuple(ids.tolist()))
      guess = action_tokenizer.decode(ids.astype(np.int64))
      recorded.append(norm_stats.unnormalize(actions[row]))
      errors_normalized.append(np.abs(guess - actions[row]))
      errors.append(np.abs(norm_stats.unnormalize(guess) - norm_stats.unnormalize(actions[row])))
      frames += 1
  if not frames:
    raise InputError(f"open_loop_metrics got no complete frame ({skipped} rows lacked their "
                     "action tokens); is the val split empty, or data.max_length too short?")
  l1 = np.mean(errors, axis=0)
  recorded = np.asarray(recorded)
  constant_l1 = np.mean(np.abs(recorded - np.median(recorded, axis=0)), axis=0)
  return {"token_accuracy": correct / total, "l1_per_dim": l1.tolist(),
          "l1_mean": float(l1.mean()), "l1_normalized_mean": float(np.mean(errors_normalized)),
          "constant_l1_per_dim": constant_l1.tolist(),
          "constant_l1_mean": float(constant_l1.mean()),
          "l1_vs_constant": float(l1.mean() / max(constant_l1.mean(), 1e-12)),
          "distinct_predictions": len(predictions), "frames": frames, "rows_skipped": skipped}
