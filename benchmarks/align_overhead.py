"""What alignment costs: a jitted gradient step with and without the alignment loss.

The paper claims negligible overhead although its code runs the teacher every step.
This script times, in the same run, one jitted step (forward + backward + AdamW update of
the full student) of plain SFT (next-token loss on the action tokens only) and of SFT +
`align_coeff * loss/align` (teacher forward, frozen projector, cosine loss), and prints
the median step times and their ratio. Default: configs/align.py:tiny at the paper's
batch size 8 on this machine's CPU; pass `--preset` for another size.

  python benchmarks/align_overhead.py [--preset tiny] [--batch 8] [--repeats 20]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vla_jax import modeling
from vla_jax.experiment import load_config, parse_config

ACTION_TOKENS = 7  # OpenVLA: one token per action dimension


def _config(preset):
  return load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "align.py"), preset)


def _action_loss(logits, tokens):
  """Cross-entropy on the last ACTION_TOKENS text positions (their predictions sit one earlier)."""
  predictions = logits[:, -ACTION_TOKENS - 1:-1]
  targets = tokens[:, -ACTION_TOKENS:]
  return optax.softmax_cross_entropy_with_integer_labels(predictions, targets).mean()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  experiment = parse_config(_config(args.preset))
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))
  rng = np.random.default_rng(0)
  size = experiment.model.image_size
  images = jnp.asarray(rng.uniform(size=(args.batch, size, size, 3)), jnp.float32)
  vocab = experiment.model.llm.vocab_size - 64  # ids the tokenizer can produce
  tokens = jnp.asarray(rng.integers(3, vocab, size=(args.batch, 24)), jnp.int32).at[:, 0].set(1)
  optimizer = optax.adamw(5e-4)
  coeff = experiment.align.align_coeff

  def sft_loss(student, _):
    out = models.student.apply({"params": student}, images, tokens)
    return _action_loss(out["logits"][:, experiment.model.num_visual_tokens:], tokens)

  def align_loss(student, frozen):
    out, loss_align, _ = modeling.aligned_forward(
        models, experiment, {"student": student, **frozen}, images, tokens)
    return (_action_loss(out["logits"][:, experiment.model.num_visual_tokens:], tokens)
            + coeff * loss_align)

  frozen = {"teacher": params["teacher"], "projector": params["projector"]}
  results = {}
  for name, loss_fn in (("sft", sft_loss), ("align", align_loss)):
    @jax.jit
    def step(student, opt_state, loss_fn=loss_fn):
      loss, grads = jax.value_and_grad(loss_fn)(student, frozen)
      updates, opt_state = optimizer.update(grads, opt_state, student)
      return optax.apply_updates(student, updates), opt_state, loss

    student, opt_state = params["student"], optimizer.init(params["student"])
    start = time.perf_counter()
    student, opt_state, loss = jax.block_until_ready(step(student, opt_state))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      student, opt_state, loss = jax.block_until_ready(step(student, opt_state))
      times.append(time.perf_counter() - start)
    results[name] = (statistics.median(times), compile_s, float(loss))

  print(f"preset {args.preset}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"median of {args.repeats} steps")
  print("| step | median (ms) | compile (s) | last loss |")
  print("|---|---|---|---|")
  for name, (median, compile_s, loss) in results.items():
    print(f"| {name} | {median * 1e3:.1f} | {compile_s:.1f} | {loss:.3f} |")
  print(f"align / sft step time: {results['align'][0] / results['sft'][0]:.2f}x")


if __name__ == "__main__":
  main()
