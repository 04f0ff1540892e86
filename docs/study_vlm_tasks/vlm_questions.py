"""How well a pretrained VLM answers VL-Think questions, greedy-decoded on fresh renders.

  python docs/study_vlm_tasks/vlm_questions.py STUDENT.npz [--episodes 20] [--json OUT]

STUDENT.npz: a VLM written by the VLM stage (`vla_jax.train.vlm_pretrain`, cached as
$VLA_JAX_CACHE/pretrained/student_*.npz) for configs/align.py's tiny student. Renders
`--episodes` expert episodes x 2 frames of every VL-Think family with render seeds no
pretraining uses, asks every question kind of `vlm_pretrain.vlthink_answer` about each
frame, decodes greedily with the KV cache, and prints per family: "where" (the decoded x
is nearest the right board; chance 1/3), "what" (the decoded words equal the item) and,
for parity, "odd/even".
"""

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs.align import get_config  # noqa: E402
from vla_jax import modeling  # noqa: E402
from vla_jax.actions import ActionTokenizer  # noqa: E402
from vla_jax.experiment import parse_config  # noqa: E402
from vla_jax.models import decode  # noqa: E402
from vla_jax.sim import bundled  # noqa: E402
from vla_jax.text import Tokenizer  # noqa: E402
from vla_jax.train import pretrain, vlm_pretrain  # noqa: E402

FIRST_INDEX = 50  # render seeds RENDER_SEED_BASE + 10_000 * (50..55) + 7_000: never trained on


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("student")
  parser.add_argument("--episodes", type=int, default=20)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  experiment = parse_config(get_config("tiny"))
  tokenizer = Tokenizer.from_path(bundled.bundled_tokenizer_path())
  numbers = ActionTokenizer(vocab_size=tokenizer.vocab_size)
  student = pretrain.load_student(args.student, experiment, pretrain.file_digest(
      bundled.bundled_tokenizer_path()))
  model = modeling.build_models(experiment).student
  renders = pretrain.PretrainConfig(splits=pretrain.TEACHER_EXTRA_SPLITS,
                                    episodes_per_split=args.episodes, frames_per_episode=2,
                                    seed=7)
  scene = pretrain.render_keypoint_data(renders, experiment.model.image_size, FIRST_INDEX)
  space = tokenizer.token_to_id("\u2581")
  right = collections.defaultdict(list)
  for kind in range(vlm_pretrain.VLTHINK_KINDS):
    examples = [vlm_pretrain.vlthink_answer(scene, r, kind) for r in range(len(scene["images"]))]
    prompts = [tokenizer.encode(f"In: {q}\nOut:", add_bos=True) +
               ([] if isinstance(a, str) else [space]) for q, a in examples]
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, prompt in enumerate(prompts):
      tokens[i, :len(prompt)], mask[i, :len(prompt)] = prompt, True
    ids = np.asarray(decode.greedy_decode(model, student, scene["images"], tokens, mask, 7))
    for i, (_, value) in enumerate(examples):
      family = str(scene["vlthink_family"][i])
      if isinstance(value, str):
        row = ids[i].tolist()
        words = tokenizer.decode(row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row
                                 else row).strip()
        kind_name = "odd/even" if kind >= 6 and family == "parity" else "what"
        right[f"{family}/{kind_name}"].append(words == value)
      else:
        x = numbers.decode(ids[i, :1])
        right[f"{family}/where"].append(int(vlm_pretrain._nearest_board(x)[0]) ==  # pylint: disable=protected-access
                                        int(vlm_pretrain._nearest_board(value[:1])[0]))  # pylint: disable=protected-access
  result = {k: {"accuracy": float(np.mean(v)), "questions": len(v)}
            for k, v in sorted(right.items())}
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"student": os.path.basename(args.student), "results": result}, f, indent=1)


if __name__ == "__main__":
  main()
