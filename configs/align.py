"""Visual Representation Alignment: the paper's recipe and its CPU-sized twin.

Usage: `python -m vla_jax.main --config=configs/align.py[:PRESET]` with PRESET one of
  tiny          (default) OpenVLA's layout at CPU size, tiny SigLIP teacher
  tiny_paligemma          PaliGemma's layout at CPU size
  openvla_7b    OpenVLA-7B student, SigLIP So400m/14 teacher, align layer 16 of 32,
                LoRA rank 32 / alpha 16 on every linear layer (the paper's setup)
  paligemma_3b  PaliGemma-3B student, SigLIP So400m/14 teacher, align layer 9 of 18
Any key can be overridden: `--config.align.align_coeff=0` gives plain SFT,
`--config.teacher.layer=20`, `--config.model.llm.scan=True`,
`--config.align.align_layers='(8, 16)'` (align several LLM layers, losses summed), ...

The teacher: `teacher.kind` picks a registered family (vla_jax/models/teachers/) and
only its sub-config is read: `siglip` -> `teacher.vit`, `dinov2` -> `teacher.dino`,
`radio` -> `teacher.radio`, `dinov3` -> `teacher.dinov3`, `siglip2` -> `teacher.siglip2`.
Every family's sub-config is here, sized for the student's grid (the tiny presets' tiny
towers, else SigLIP So400m/14, DINOv2 L/14, C-RADIOv3-L, DINOv3 ViT-L/16, SigLIP 2
So400m/16 NaFlex),
so `--config.teacher.kind=radio` switches teacher. The paper found C-RADIOv3 the best
teacher: its best setup is
  --config=configs/align.py:openvla_7b --config.teacher.kind=radio \
  --config.weights.teacher=/path/to/c-radio_v3-l --config.weights.teacher_format=hf
(a transformers RadioModel save_pretrained directory). The presets keep SigLIP So400m/14.
"""

import dataclasses

import ml_collections

from vla_jax.eval import config as eval_config
from vla_jax.models import align as align_lib
from vla_jax.models import lora as lora_lib
from vla_jax.models import teacher as teacher_lib
from vla_jax.models import teachers
from vla_jax.models import vla as vla_lib
from vla_jax.train import sharding as sharding_lib
from vla_jax.train import state as state_lib

# preset -> (student preset, teacher preset, LoRA on?)
PRESETS = {
    "tiny": ("tiny", "tiny_siglip", False),
    "tiny_paligemma": ("tiny_paligemma", "tiny_siglip", False),
    "openvla_7b": ("openvla_7b", "siglip_so400m", True),
    "paligemma_3b": ("paligemma_3b", "siglip_so400m", True),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/align.py; choose one of "
                     f"{', '.join(PRESETS)} (e.g. --config=configs/align.py:openvla_7b).")
  student_name, teacher_name, use_lora = PRESETS[preset]
  tiny = preset.startswith("tiny")
  student = vla_lib.vla_config(student_name)
  teacher = teacher_lib.teacher_config(teacher_name, student_grid=student.grid)

  config = ml_collections.ConfigDict()
  config.preset = preset
  config.seed = 0
  config.model = dataclasses.asdict(student)
  # The preset's teacher, plus every other family's sub-config for --config.teacher.kind.
  config.teacher = teacher.to_mapping()
  for family in teachers.FAMILIES.values():
    if family.key not in config.teacher:
      preset = family.tiny_preset if tiny else family.default_preset
      config.teacher[family.key] = dataclasses.asdict(
          teacher_lib.teacher_config(preset, student_grid=student.grid).tower)
  config.align = dataclasses.asdict(align_lib.AlignConfig(
      align_layer=student.llm.depth // 2, align_coeff=0.2,
      projector_width=256 if tiny else 2048))
  # None = align `align_layer` alone (the paper's best). Several layers at once, one frozen
  # projector each, losses summed: --config.align.align_layers='(8, 16)'. A typed
  # reference, so that the command line can override the None with a tuple.
  config.align.align_layers = ml_collections.FieldReference(None, field_type=tuple)
  # The paper's "all linear layers": every Dense/einsum kernel except the output head and
  # the convolutional patch embeddings.
  config.lora = dict(enabled=use_lora, **dataclasses.asdict(lora_lib.LoraConfig(
      target_regex=r"^(?!.*(lm_head|embedding/kernel|patch_embed/kernel))")))
  # Local checkpoints to start from ("" = random init). Formats: "hf" (a save_pretrained
  # directory or .safetensors), "big_vision" (.npz, `file.npz:subtree` allowed), "orbax"
  # (the output of --mode=convert). `student_vision` lays pretrained towers + projector over
  # the student. "bundled" (CPU presets): our stand-in for web pretraining, on tabletop
  # renders of every split, built on first use and cached: `student` a VLM (towers
  # pretrained to locate things, vla_jax/train/pretrain.py, then the whole student trained
  # to answer spatial questions, vla_jax/train/vlm_pretrain.py; it speaks the bundled
  # tokenizer), `teacher` a tower pretrained to locate things. A student whose LLM starts
  # from random weights ignores its camera.
  config.weights = dict(student="bundled" if tiny else "", student_format="hf",
                        student_vision="",
                        teacher="bundled" if tiny else "", teacher_format="big_vision")
  # Tokenizer: a SentencePiece .model, a HF tokenizer directory, or "bundled" (a small
  # Llama-style model trained on the bundled dataset's prompts, built on first use).
  # OpenVLA-7B needs Llama-2's: --config.tokenizer=/path/to/llama2/tokenizer.model
  config.tokenizer = "bundled" if tiny else ""
  config.batch_size = 2  # --mode=describe only; training uses train.batch_size

  # Optimisation: the paper's AdamW at a constant 5e-4, batch 8, 60k steps. The CPU-sized
  # default fine-tunes the whole pretrained tiny VLM at 5e-4 (100-step warmup, cosine
  # decay) for 6000 steps, about 21 minutes on 2 cores; chosen on the train split's tuning
  # seeds (README, "SFT recipe search"): plain SFT solves 59/64 there, 3000 steps at 1e-3
  # solved 22/64.
  config.train = dataclasses.asdict(state_lib.TrainConfig(
      trainable="lora" if use_lora else "full", batch_size=8,
      learning_rate=5e-4, warmup_steps=100 if tiny else 0,
      schedule="warmup_cosine" if tiny else "constant",
      num_steps=6_000 if tiny else 60_000))
  if preset == "openvla_7b":
    # Rematerialised blocks (LLM and both towers): without them the step needs 18.5 GiB
    # per device on 8-way FSDP, with them 12.1 GiB, inside a 16 GB TPU v5e chip
    # (benchmarks/memory.py). On larger devices, turn it off for ~30 % less compute:
    # --config.train.remat_policy=none --config.model.siglip.remat=False ...dino.remat=False
    config.train.remat_policy = "nothing_saveable"
    config.model.siglip.remat = True
    config.model.dino.remat = True
  config.sharding = dataclasses.asdict(sharding_lib.ShardingConfig())
  config.distributed = False  # True: jax.distributed.initialize() (multi-host)
  # Input pipeline (vla_jax.data.pipeline.DataConfig; batch size, image size, tokenizer
  # and seed come from train / model / tokenizer / seed). A "tabletop" source with an
  # empty data_dir is the bundled dataset; add Open-X sources with their data_dir.
  # proprio_dims: robot-state dimensions written into the prompt as number tokens (the
  # tabletop state is x, y, z, roll, pitch, yaw, gripper); () = OpenVLA's prompt.
  # action_horizon: actions predicted per frame (1 = OpenVLA's single step; H > 1 decodes
  # H x 7 tokens and the evaluator executes the chunk open loop, as ACT and OpenVLA-OFT
  # do). The tiny default predicts chunks of 4: single-step policies never got past the
  # grasp (README, "The tiny default run").
  # The other keys repeat DataConfig's defaults (tests/test_experiment.py checks they
  # agree) so that each can be overridden from the command line, e.g.
  # --config.data.skip_bad_episodes=True; the config stays free of TensorFlow imports.
  # host_sharding="global": the hosts of a multi-process run together see exactly the
  # batches of a single-process run; "episodes" reads less per host, but then the
  # batches depend on the number of hosts.
  config.data = dict(
      sources=[dict(name="tabletop", data_dir="", weight=1.0, split="train")],
      shuffle_buffer=2_000 if tiny else 100_000, max_length=64,
      proprio_dims=(), action_horizon=4 if tiny else 1,
      augment=dict(enabled=True, crop_scale=0.9, brightness=0.2, contrast=(0.8, 1.2),
                   saturation=(0.8, 1.2), hue=0.05),
      image_roles=("primary",), balance_weights=False, normalization="bounds_q99",
      host_sharding="global",
      window_size=1, filter_noops=False,
      noop_translation=0.01, noop_rotation=0.06, val_fraction=0.05,
      skip_bad_episodes=False, stats_dir="~/.cache/vla_jax/stats", num_parallel_calls=-1)
  config.log_every = 20 if tiny else 100
  config.eval_every = 500 if tiny else 2_000
  config.eval_batches = 4
  config.checkpoint_every = 500 if tiny else 2_000
  config.keep_checkpoints = 3
  config.keep_period = 0  # also keep every K-th step (0 = no)
  # Merged inference params in every checkpoint: "auto" = all runs but LoRA runs, which
  # save their factors and optimizer state only (the policy is rebuilt on load from the
  # factors and the base weights; --mode=export writes merged params); "always"; "never".
  config.checkpoint_params = "auto"
  # Evaluation and analysis modes (eval_sim, open_loop, probe, attention, tsne).
  config.eval = dataclasses.asdict(eval_config.EvalConfig())
  return config
