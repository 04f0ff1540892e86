"""The study: SFT vs Align vs Freeze from one pretrained tiny VLM (`vla_jax/study.py`).

Usage: `python -m vla_jax.main --config=configs/study.py[:PRESET] --mode=study --workdir=DIR`
  default  the tiny default recipe (configs/align.py), 3 methods x 3 seeds, 32 episodes
           per environment and run, probes and attention maps (about 100 minutes on 2 CPU
           cores; README, "Does alignment help? (our study)")
  siglip_teacher  the default with the teacher pretrained on image-caption pairs with
           SigLIP's sigmoid loss (`vla_jax.train.siglip_pretrain`) instead of locating
           things; the student's pretraining is shared with the default (same cache)
  vlm_tasks  the default with a VLM stage that also learns captioning and VL-Think-style
           concept questions (`vla_jax.train.vlm_pretrain`: 5000 steps, 30 % spatial
           questions as the default's 1500, 10 % captions, 60 % VL-Think questions);
           the teacher and the student's vision pretraining are the default's (same cache)
  vlm_continued  the default's VLM (spatial questions only, cached) trained on for 3000
           more steps on all three tasks (35 % spatial, 10 % captions, 55 % VL-Think), so
           the spatial skill the policy needs is learned first and kept
  siglip_continued  both of the above: the image-caption teacher and the vlm_continued
           VLM (the issue's stages 1 and 2 as written; each stage cached with its preset).
           SFT and Freeze do not read the teacher, so their runs are vlm_continued's:
           `--config.study.methods=align` runs only what differs
  smoke    a few steps of every stage and a few episodes, for the test suite
Every key of configs/align.py can be overridden as there (--config.train.num_steps=...),
and the study's own under --config.study.* (e.g. --config.study.seeds=0,1).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import align  # pylint: disable=g-import-not-at-top,wrong-import-position

from vla_jax import study as study_lib  # pylint: disable=wrong-import-position

PRESETS = ("default", "siglip_teacher", "vlm_tasks", "vlm_continued", "siglip_continued",
           "smoke")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  preset = arg or "default"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/study.py; choose one of "
                     f"{', '.join(PRESETS)}.")
  config = align.get_config("tiny")
  study = study_lib.StudyConfig()
  config.study = dict(methods=study.methods, seeds=study.seeds,
                      eval_episodes=study.eval_episodes, eval_splits=study.eval_splits,
                      probe_images_per_object=study.probe_images_per_object,
                      attention_object=study.attention_object,
                      pretrain={}, vlm_pretrain={}, cache_dir="")
  if preset in ("siglip_teacher", "siglip_continued"):
    config.study.pretrain = dict(teacher_objective="siglip")
  if preset == "vlm_tasks":
    # As many spatial-question steps as the default's 1500; captions and concepts on top.
    config.study.vlm_pretrain = dict(steps=5000, tasks=("spatial", "caption", "vlthink"),
                                     task_weights=(0.3, 0.1, 0.6))
  if preset in ("vlm_continued", "siglip_continued"):
    # continue_from={} is the default's spatial-only stage, already cached by the default.
    config.study.vlm_pretrain = dict(steps=3000, tasks=("spatial", "caption", "vlthink"),
                                     task_weights=(0.35, 0.1, 0.55), continue_from={})
  if preset == "smoke":
    # Every stage runs and feeds the next; nothing here is meant to be a result.
    config.study.seeds = (0,)
    config.study.eval_episodes = 2
    config.study.eval_splits = ("train", "carrot", "tex05", "position", "vlthink_shape")
    config.study.probe_images_per_object = 4
    config.study.pretrain = dict(splits=("train",), episodes_per_split=4,
                                 frames_per_episode=2, steps=3, batch_size=8, warmup_steps=1)
    # A VLM stage that continues another, as vlm_continued's does.
    config.study.vlm_pretrain = dict(steps=3, batch_size=4, warmup_steps=1,
                                     continue_from=dict(steps=3, batch_size=4, warmup_steps=1))
    # A two-block LLM and one-block towers: the stages compile in seconds.
    config.model.llm.depth = 2
    config.model.siglip.depth = 1
    config.model.dino.depth = 1
    config.teacher.vit.depth = 1
    config.align.align_layer = 1
    config.eval.layers = (1,)
    config.train.num_steps = 3
    config.train.warmup_steps = 1
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 3
    config.eval.max_steps = 8
    config.eval.probe_epochs = 2
    config.eval.strip_episodes = 1
  return config
