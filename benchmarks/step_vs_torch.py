"""Train-step speed of our jitted `train_step` vs the paper's PyTorch step, same run.

Both sides train the same SigLIP-only Prismatic student (a SigLIP tower whose last block
feeds a GELU-MLP projector, 64 visual tokens spliced in after BOS, a Llama with GQA)
with the action loss + `align_coeff * loss/align` (frozen SigLIP teacher, frozen MLP
alignment projector, cosine loss), global-norm clipping and AdamW, from identical
weights:

* ours: configs/align.py's tiny preset resized to the sizes below, wired as
  `vla_jax.train.loop._train` wires it (parse_config, build_models, init_params,
  create_train_state through `sharded_init`, `make_train_step`, `jit_train_step`).
* PyTorch, built as the reference code (OpenVLA's finetune.py + BlindVLA) builds it: a
  transformers `SiglipVisionModel` tower, the projector and a `LlamaForCausalLM`
  (LoRA: peft `get_peft_model` on all linear layers but the LM head, gaussian init),
  the HF loss on labels with -100 outside the action tokens + EOS, the teacher under
  `no_grad`, OpenVLA's accuracy / L1 metrics, `clip_grad_norm_`, `torch.optim.AdamW`.

The first step of each side runs on the same weights and batch, so their losses (and,
for full fine-tuning, gradient norms) are printed side by side as the check that both do
the same work. Timing alternates rounds (a jax round, a torch round, ...) so background
load hits both alike; each round times `--steps` steps; medians over all steps are
reported, ratio = torch / jax (> 1 means we are faster). Then the roofline: the best
float32 matmul rate either framework reaches on this machine (measured in the same run,
at the step's largest matmul shape and at 2048^3) against the step's FLOPs (XLA's count),
so the time of a step that ran every FLOP at that rate, and the share of that rate a
step needs to be twice as fast as torch's. `--profile` (on by default) adds, for our
side, XLA's cost analysis and timing ablations of the parts of the step.

  python benchmarks/step_vs_torch.py [--rounds 5] [--steps 4] [--batch 8] [--no-profile]
      [--threads 2] [--also-threads 1] [--variants lora,full] [--json out.json]
  python benchmarks/step_vs_torch.py --smoke   # tiny sizes, LoRA, 1 round (tests)

Needs peft (the `test` extra) besides torch and transformers.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.parity import torch_refs  # noqa: E402  (also makes transformers importable)
import peft  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vla_jax import modeling  # noqa: E402
from vla_jax.actions import ActionTokenizer  # noqa: E402
from vla_jax.experiment import load_config, parse_config  # noqa: E402
from vla_jax.models import llm as llm_lib  # noqa: E402
from vla_jax.models import lora as lora_lib  # noqa: E402
from vla_jax.models import teacher as teacher_lib  # noqa: E402
from vla_jax.models import vit as vit_lib  # noqa: E402
from vla_jax.models.vla import VLAConfig  # noqa: E402
from vla_jax.train import sharding as sharding_lib  # noqa: E402
from vla_jax.train import state as state_lib  # noqa: E402
from vla_jax.train import step as step_lib  # noqa: E402
from vla_jax.typed_config import from_mapping  # noqa: E402
from vla_jax.weights import llm as llm_weights  # noqa: E402
from vla_jax.weights import siglip as siglip_weights  # noqa: E402
from vla_jax.weights import vla as vla_weights  # noqa: E402
from vla_jax.weights.mapping import Rule, linear, load_params, nest  # noqa: E402
from vla_jax.weights.safetensors import open_safetensors  # noqa: E402

# The sizes: batch 8, 64 px, ViT-Ti-like towers (student tower and teacher),
# a 4-block GQA Llama; the vocabulary is the tiny preset's (bundled tokenizer's 768 ids +
# <PAD>, padded to 832), the MLP ratio Llama-2's (11008 / 4096).
FULL = dict(batch=8, image=64, patch=8, vit_width=192, vit_depth=4, vit_heads=3,
            llm_width=256, llm_depth=4, llm_heads=4, llm_kv_heads=2, llm_mlp=688,
            vocab=832, text_vocab=768, prompt=15, lora_rank=8)
SMOKE = dict(FULL, batch=2, vit_width=32, vit_depth=1, vit_heads=2, llm_width=64,
             llm_depth=2, llm_heads=2, llm_kv_heads=1, llm_mlp=128)
ACTION_DIMS = 7  # OpenVLA: one token per action dimension, then EOS
BOS, EOS = 1, 2
ALIGN_COEFF = 0.2


# ----------------------------------------------------------------------------- configs
def student_config(s) -> VLAConfig:
  """A SigLIP-only OpenVLA-layout student (Prismatic "gelu-mlp" projector, exact GELU)."""
  siglip = vit_lib.ViTConfig(
      width=s["vit_width"], depth=s["vit_depth"], mlp_dim=4 * s["vit_width"],
      num_heads=s["vit_heads"], patch_size=s["patch"], image_size=s["image"],
      pool_type="none", gelu_approximate=False, final_norm=False)
  llm = llm_lib.LLMConfig(
      family="llama", vocab_size=s["vocab"], width=s["llm_width"], depth=s["llm_depth"],
      num_heads=s["llm_heads"], num_kv_heads=s["llm_kv_heads"], mlp_dim=s["llm_mlp"],
      norm_eps=1e-5)
  return VLAConfig("openvla", llm, siglip, None, s["image"])


def teacher_vit_config(s) -> vit_lib.ViTConfig:
  """The teacher: a HF-layout SigLIP (tanh GELU, final norm) seeing the student's grid."""
  return vit_lib.ViTConfig(
      width=s["vit_width"], depth=s["vit_depth"], mlp_dim=4 * s["vit_width"],
      num_heads=s["vit_heads"], patch_size=s["patch"], image_size=s["image"], pool_type="none")


def experiment_config(s, lora: bool, align_coeff: float = ALIGN_COEFF):
  """configs/align.py:tiny with the benchmark's sizes -> (Experiment, TrainConfig)."""
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "align.py")
  config = load_config(path, "tiny").to_dict()
  student = student_config(s)
  config["model"] = dataclasses.asdict(student)
  config["teacher"] = teacher_lib.TeacherConfig(kind="siglip",
                                                tower=teacher_vit_config(s)).to_mapping()
  config["align"].update(align_layer=student.llm.depth // 2, align_coeff=align_coeff)
  # OpenVLA's finetune.py: lora_alpha = min(rank, 16), dropout 0, gaussian init.
  config["lora"].update(enabled=lora, rank=s["lora_rank"], alpha=float(min(s["lora_rank"], 16)),
                        dropout=0.0, init="gaussian")
  config["train"].update(trainable="lora" if lora else "full", batch_size=s["batch"],
                         learning_rate=5e-4, schedule="constant", warmup_steps=0)
  config = ml_collections.ConfigDict(config)
  experiment = parse_config(config)
  train_config = from_mapping(state_lib.TrainConfig, config.train, "train")
  experiment = state_lib.apply_train_overrides(experiment, train_config)
  state_lib.check_compatible(experiment, train_config)
  return experiment, train_config


def make_batch(s, seed: int = 0):
  """The step's batch contract: BOS + prompt + 7 action tokens + EOS, all rows full."""
  rng = np.random.default_rng(seed)
  tokenizer = ActionTokenizer(vocab_size=s["text_vocab"])
  actions = rng.uniform(-1, 1, (s["batch"], ACTION_DIMS)).astype(np.float32)
  prompt = rng.integers(3, tokenizer.token_range()[0], (s["batch"], s["prompt"]))
  tokens = np.concatenate([np.full((s["batch"], 1), BOS), prompt, tokenizer.encode(actions),
                           np.full((s["batch"], 1), EOS)], axis=1).astype(np.int32)
  loss_mask = np.zeros(tokens.shape, bool)
  loss_mask[:, -ACTION_DIMS - 1:] = True
  images = rng.uniform(size=(s["batch"], s["image"], s["image"], 3)).astype(np.float32)
  return {"images": images, "tokens": tokens, "input_mask": np.ones(tokens.shape, bool),
          "loss_mask": loss_mask, "actions": actions}, tokenizer


# ----------------------------------------------------------------------------- torch side
class AlignProjector(torch.nn.Module):
  """BlindVLA's projector: LayerNorm -> Linear -> SiLU -> Dropout -> Linear -> SiLU ->
  Dropout -> Linear (frozen, eval mode)."""

  def __init__(self, student_dim: int, width: int, teacher_dim: int):
    super().__init__()
    self.norm = torch.nn.LayerNorm(student_dim)
    self.fc1 = torch.nn.Linear(student_dim, width)
    self.fc2 = torch.nn.Linear(width, width)
    self.fc3 = torch.nn.Linear(width, teacher_dim)
    self.dropout = torch.nn.Dropout(0.1)

  def forward(self, x):
    silu = torch.nn.functional.silu
    x = self.dropout(silu(self.fc1(self.norm(x))))
    return self.fc3(self.dropout(silu(self.fc2(x))))


class GeluMLPProjector(torch.nn.Module):
  """Prismatic's single-tower projector ("gelu-mlp"): fc1 -> GELU -> fc2."""

  def __init__(self, vision_dim: int, llm_dim: int):
    super().__init__()
    self.fc1 = torch.nn.Linear(vision_dim, llm_dim)
    self.fc2 = torch.nn.Linear(llm_dim, llm_dim)

  def forward(self, x):
    return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Student(torch.nn.Module):
  """Prismatic with one SigLIP tower: patches of the last block (no post-norm) ->
  gelu-mlp projector -> spliced after BOS -> Llama; returns the HF output."""

  def __init__(self, siglip, projector, llama):
    super().__init__()
    self.siglip, self.projector, self.llama = siglip, projector, llama

  def forward(self, pixels, input_ids, attention_mask, labels):
    tower = getattr(self.siglip, "vision_model", self.siglip)  # transformers < 5 nests it
    patches = tower.encoder(inputs_embeds=tower.embeddings(pixels)).last_hidden_state
    visual = self.projector(patches)
    text = self.llama.get_input_embeddings()(input_ids)
    embeds = torch.cat([text[:, :1], visual, text[:, 1:]], dim=1)
    n = visual.shape[1]
    ones = torch.ones(input_ids.shape[0], n, dtype=attention_mask.dtype)
    mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
    ignore = torch.full((input_ids.shape[0], n), -100, dtype=labels.dtype)
    labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
    return self.llama(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                      output_hidden_states=True)


def build_torch(s, seed: int = 0):
  """Random-weight torch parts: student pieces, teacher, alignment projector."""
  torch.manual_seed(seed)
  vit = dict(hidden_size=s["vit_width"], intermediate_size=4 * s["vit_width"],
             num_hidden_layers=s["vit_depth"], num_attention_heads=s["vit_heads"],
             image_size=s["image"], patch_size=s["patch"], vision_use_head=False)
  siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_act="gelu", **vit))  # OpenVLA's towers are timm's: exact GELU
  projector = GeluMLPProjector(s["vit_width"], s["llm_width"])
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=s["vocab"], hidden_size=s["llm_width"], intermediate_size=s["llm_mlp"],
      num_hidden_layers=s["llm_depth"], num_attention_heads=s["llm_heads"],
      num_key_value_heads=s["llm_kv_heads"], rms_norm_eps=1e-5, tie_word_embeddings=False))
  teacher = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vit)).eval()
  align = AlignProjector(s["llm_width"], 256, s["vit_width"]).eval()
  # Prismatic reads the last block un-normalised: the tower's post-norm is not in the model.
  unused = list(siglip.post_layernorm.parameters())
  for p in list(teacher.parameters()) + list(align.parameters()) + unused:
    p.requires_grad_(False)
  return {"student": Student(siglip, projector, llama), "teacher": teacher, "align": align}


class TorchStep:
  """One OpenVLA/BlindVLA fine-tuning step: forward, action + align loss, backward,
  clip, AdamW, and the reference's accuracy / L1 metrics."""

  def __init__(self, parts, s, experiment, action_tokenizer, lora: bool):
    self.student = parts["student"]
    if lora:
      config = peft.LoraConfig(
          r=experiment.lora.rank, lora_alpha=experiment.lora.alpha, lora_dropout=0.0,
          target_modules="all-linear", exclude_modules=r".*lm_head",
          init_lora_weights="gaussian")
      self.student = peft.get_peft_model(self.student, config)
    self.student.train()
    self.teacher, self.align = parts["teacher"], parts["align"]
    self.params = [p for p in self.student.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=5e-4, weight_decay=0.0)
    self.align_layer = experiment.align.align_layer
    self.tokenizer = action_tokenizer
    self.num_patches = experiment.model.num_visual_tokens

  def set_batch(self, batch):
    to = lambda x: torch.from_numpy(np.asarray(x))
    self.images = to(batch["images"]).permute(0, 3, 1, 2).contiguous()
    self.input_ids, self.mask = to(batch["tokens"]).long(), to(batch["input_mask"]).long()
    self.labels = torch.where(to(batch["loss_mask"]), self.input_ids, -100)
    self.actions = to(batch["actions"])

  def __call__(self):
    pixels = (self.images - 0.5) / 0.5  # SigLIP's normalisation, both towers
    out = self.student(pixels, self.input_ids, self.mask, self.labels)
    hidden = out.hidden_states[self.align_layer][:, 1:1 + self.num_patches]
    with torch.no_grad():
      target = self.teacher(pixel_values=pixels).last_hidden_state
    normalize = torch.nn.functional.normalize
    loss_align = -(normalize(self.align(hidden), dim=-1) * normalize(target, dim=-1)).sum(-1).mean()
    loss = out.loss + ALIGN_COEFF * loss_align
    loss.backward()
    loss = loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    # finetune.py's metrics: accuracy over action tokens, L1 of the decoded actions.
    with torch.no_grad():
      preds = out.logits[:, self.num_patches:-1].argmax(dim=2)
      gt = self.labels[:, 1:]
      mask = gt >= self.tokenizer.token_range()[0]
      accuracy = ((preds == gt) & mask).sum().float() / mask.sum().float()
      decoded = self.tokenizer.decode(preds[mask].numpy())
      l1 = np.abs(decoded - self.actions.numpy().reshape(-1)).mean()
    return {"loss/total": loss.item(), "loss/action": out.loss.item(),
            "loss/align": loss_align.item(), "grad_norm": float(grad_norm),
            "action/token_accuracy": float(accuracy), "action/l1": float(l1)}


# ----------------------------------------------------------------------------- jax side
def jax_params_from_torch(parts, experiment, tmp):
  """Our {"student", "teacher", "projector"} params holding the torch parts' weights."""
  student = parts["student"]
  tower = getattr(student.siglip, "vision_model", student.siglip)
  state = {"vision_backbone." + k: v for k, v in tower.state_dict().items()}
  state.update({"projector." + k: v for k, v in student.projector.state_dict().items()})
  state.update({"language_model." + k: v for k, v in student.llama.state_dict().items()})
  path = os.path.join(tmp, "student.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
  config = experiment.model
  rules = nest("siglip/", siglip_weights.hf_siglip_rules(config.siglip, "vision_backbone."))
  for layer in ("fc1", "fc2"):
    rules += [Rule.copy(f"projector/{layer}/kernel", f"projector.{layer}.weight", linear),
              Rule.copy(f"projector/{layer}/bias", f"projector.{layer}.bias")]
  rules += nest("llm/", llm_weights.hf_llm_rules(config.llm, "language_model.model.",
                                                 "language_model.lm_head.weight"))
  ignore = siglip_weights.hf_siglip_unused(config.siglip, "vision_backbone.")
  params = {"student": load_params(open_safetensors(path), rules,
                                   vla_weights.abstract_params(config), ignore=ignore)}
  teacher_dir = os.path.join(tmp, "teacher")
  parts["teacher"].save_pretrained(teacher_dir)
  params["teacher"] = {"tower": siglip_weights.load_hf_siglip(teacher_dir,
                                                              experiment.teacher.vit)}
  align = {k: v.detach().numpy() for k, v in parts["align"].state_dict().items()}
  params["projector"] = {"norm": {"scale": align["norm.weight"], "bias": align["norm.bias"]}}
  for layer in ("fc1", "fc2", "fc3"):
    params["projector"][layer] = {"kernel": align[f"{layer}.weight"].T,
                                  "bias": align[f"{layer}.bias"]}
  return jax.tree.map(jnp.asarray, params)


def jax_step(experiment, train_config, params, action_tokenizer):
  """(state, frozen, jitted step) exactly as `vla_jax.train.loop._train` builds them."""
  sharding_config = sharding_lib.ShardingConfig()
  mesh = sharding_lib.make_mesh(sharding_config)
  models = modeling.build_models(experiment)
  (state, frozen), (state_sharding, frozen_sharding) = sharding_lib.sharded_init(
      lambda p: state_lib.create_train_state(experiment, train_config, p, jax.random.key(1)),
      mesh, sharding_config, params)
  step = sharding_lib.jit_train_step(
      step_lib.make_train_step(models, experiment, train_config, action_tokenizer),
      mesh, state_sharding, frozen_sharding)
  return state, frozen, step, mesh, models


class JaxRunner:
  """Holds a jitted step and its state; each call is one step, waited for."""

  def __init__(self, state, frozen, step, batch):
    self.state, self.frozen, self.step, self.batch = state, frozen, step, batch

  def __call__(self):
    self.state, metrics = jax.block_until_ready(self.step(self.state, self.frozen, self.batch))
    return metrics


class ThreadsRunner:
  """The same torch step with another intra-op thread count (set once per round)."""

  def __init__(self, run, threads: int):
    self.run, self.threads = run, threads

  def __call__(self):
    return self.run()


def timed_rounds(runners, rounds: int, steps: int, threads: int = 2):
  """name -> median seconds per call; the runners take turns, one round of `steps` each."""
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      torch.set_num_threads(getattr(run, "threads", threads))
      for _ in range(steps):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  torch.set_num_threads(threads)
  return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- compare
def compare(s, args, lora: bool):
  """Builds both steps from the same weights, checks their first step, times them."""
  experiment, train_config = experiment_config(s, lora)
  batch, action_tokenizer = make_batch(s)
  parts = build_torch(s)
  with tempfile.TemporaryDirectory() as tmp:
    params = jax_params_from_torch(parts, experiment, tmp)
  state, frozen, step, mesh, _ = jax_step(experiment, train_config, params, action_tokenizer)
  device_batch = sharding_lib.shard_batch(batch, mesh)
  ours = JaxRunner(state, frozen, step, device_batch)
  theirs = TorchStep(parts, s, experiment, action_tokenizer, lora)
  theirs.set_batch(batch)
  first = {"jax": {k: float(v) for k, v in jax.device_get(ours()).items()}, "torch": theirs()}
  if lora:
    first["trainable"] = (lora_lib.count_params(ours.state.lora),
                          sum(p.numel() for p in theirs.params))
    first["adapted"] = (len(ours.state.lora), sum(
        1 for m in theirs.student.modules() if isinstance(m, peft.tuners.lora.LoraLayer)))
  else:
    first["trainable"] = (sum(x.size for x in jax.tree.leaves(ours.state.params)),
                          sum(p.numel() for p in theirs.params))
  runners = {"jax": ours, "torch": theirs}
  if args.also_threads:
    runners[f"torch, {args.also_threads} thread(s)"] = ThreadsRunner(theirs, args.also_threads)
  medians = timed_rounds(runners, args.rounds, args.steps, args.threads)
  return first, medians, (experiment, train_config, params, batch, action_tokenizer, ours)


# ----------------------------------------------------------------------------- profile
def _cost(fn, *args):
  """XLA's cost analysis of a jitted fn's lowered HLO (no second compile): (GFLOP, MB)."""
  analysis = fn.lower(*args).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return analysis.get("flops", float("nan")) / 1e9, analysis.get("bytes accessed",
                                                                 float("nan")) / 1e6


def _nll_only_sums(config, action_tokenizer, logits, batch):
  """The ablation of the step's metrics: only what the loss needs (nll at the targets)."""
  del action_tokenizer
  loss_mask = batch["loss_mask"].astype(bool) & batch["input_mask"].astype(bool)
  logits = step_lib.target_logits(config, logits).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, batch["tokens"][..., None], axis=-1)[..., 0]
  zero = jnp.zeros((), jnp.float32)
  return {"nll_sum": jnp.sum(nll * loss_mask), "num_targets": jnp.sum(loss_mask).astype(
      jnp.float32), "correct": zero, "num_action_tokens": zero, "l1_sum": zero, "l1_count": zero}


@contextlib.contextmanager
def _patched(module, name, value):
  old = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, old)


def profile(s, args, setup_lora, setup_full):
  """Ablations of our step (same run, alternating) and XLA cost analysis per part."""
  experiment, train_config, params, batch, action_tokenizer, real = setup_lora
  runners, costs = {}, {}

  def add(name, experiment, train_config, params, patch=None):
    state, frozen, step, mesh, models = jax_step(experiment, train_config, params,
                                                 action_tokenizer)
    device_batch = sharding_lib.shard_batch(batch, mesh)
    with patch or contextlib.nullcontext():
      costs[name] = _cost(step, state, frozen, device_batch)
      runner = JaxRunner(state, frozen, step, device_batch)
      runner()  # compile (under the patch: jit traces once)
    runners[name] = runner
    return runner, models

  # The steps timed against torch are reused (already compiled).
  for name, runner in (("LoRA + align (the real step)", real),
                       ("full fine-tuning + align", setup_full[-1])):
    costs[name] = _cost(runner.step, runner.state, runner.frozen, runner.batch)
    runners[name] = runner
  _, models = add("LoRA + align, metrics off (loss only)", experiment, train_config, params,
                  _patched(step_lib, "_action_sums", _nll_only_sums))
  sft, _ = experiment_config(s, lora=True, align_coeff=0.0)
  add("LoRA, no alignment (align_coeff=0)", sft, train_config, params)
  materialised = dataclasses.replace(
      experiment, lora=dataclasses.replace(experiment.lora, in_layer=False))
  add("LoRA materialised W + sAB (lora.in_layer=False)", materialised, train_config, params)
  # Copies: the real step donates its state, these jitted parts must keep their inputs.
  state = jax.tree.map(jnp.copy, real.state)
  frozen, device_batch = real.frozen, real.batch

  # The parts, each jitted alone on the LoRA step's inputs.
  config = experiment.model
  student, lora = step_lib.student_weights(experiment, state.trainable, frozen["student"],
                                           None, True)
  out = jax.jit(lambda p, b: step_lib.student_forward(models.student, p, b, lora=lora))(
      student, device_batch)
  materialise = jax.jit(lambda lora, ct: jax.vjp(
      lambda l: step_lib.student_weights(materialised, {"params": {}, "lora": l},
                                         frozen["student"], None, True)[0], lora)[1](ct))
  parts = {
      "student forward": (jax.jit(lambda p, b: step_lib.student_forward(
          models.student, p, b, experiment.align.align_layer, lora)["logits"]),
          (student, device_batch)),
      "teacher forward": (jax.jit(lambda p, x: models.teacher.apply(
          {"params": p}, x, config.grid, experiment.align.grid_match)),
          (frozen["teacher"], device_batch["images"])),
      "metrics + loss (_action_sums)": (jax.jit(lambda logits, b: step_lib._action_sums(
          config, action_tokenizer, logits, b)), (out["logits"], device_batch)),
      "loss only (nll at all text positions)": (jax.jit(lambda logits, b: _nll_only_sums(
          config, None, logits, b)), (out["logits"], device_batch)),
      "LoRA materialisation fwd + bwd (in_layer=False only)": (materialise,
                                                               (state.lora, student)),
  }
  for name, (fn, fn_args) in parts.items():
    costs[name] = _cost(fn, *fn_args)
    jax.block_until_ready(fn(*fn_args))
    runners[name] = lambda fn=fn, fn_args=fn_args: jax.block_until_ready(fn(*fn_args))
  medians = timed_rounds(runners, args.rounds, args.steps, args.threads)
  return medians, costs, _attention_share(s)


def _attention_share(s):
  """Forward GFLOP of attention scores + weighted values vs all matmuls (analytic)."""
  b, n = s["batch"], (s["image"] // s["patch"]) ** 2
  seq = n + s["prompt"] + ACTION_DIMS + 2  # patches + BOS + prompt + actions + EOS
  w, d, f = s["llm_width"], s["llm_depth"], s["llm_mlp"]
  kv = w // s["llm_heads"] * s["llm_kv_heads"]
  llm_dense = 2 * b * seq * d * (2 * w * w + 2 * w * kv + 3 * w * f) + 2 * b * seq * w * s["vocab"]
  llm_attn = 2 * b * d * 2 * seq * seq * w
  vw, vd = s["vit_width"], s["vit_depth"]
  vit_dense = 2 * b * n * vd * (4 * vw * vw + 8 * vw * vw)
  vit_attn = 2 * b * vd * 2 * n * n * vw
  return {"llm": (llm_attn / 1e9, (llm_attn + llm_dense) / 1e9),
          "vit (each tower)": (vit_attn / 1e9, (vit_attn + vit_dense) / 1e9)}


# ----------------------------------------------------------------------------- roofline
def gemm_rates(s, threads: int, repeats: int = 30):
  """Best GFLOP/s of one float32 matmul, jax (jitted) and torch (`threads`), same process:
  the step's largest shape (its LLM MLP, [batch * tokens, width] @ [width, mlp]) and
  2048^3. Best of `repeats` calls, not the median: XLA:CPU runs a 3 ms matmul at one or
  at two cores' speed from call to call on this machine (95-105 or 165-190 GFLOP/s, jax
  alone in the process), and a roofline wants what the machine can do."""
  m = s["batch"] * ((s["image"] // s["patch"]) ** 2 + s["prompt"] + ACTION_DIMS + 2)
  shapes = {"step's MLP": (m, s["llm_width"], s["llm_mlp"]), "2048^3": (2048, 2048, 2048)}
  torch.set_num_threads(threads)
  rates, matmul = {}, jax.jit(jnp.matmul)
  for name, (rows, inner, cols) in shapes.items():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner), np.float32)
    b = rng.standard_normal((inner, cols), np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    for side, run in (("jax", lambda: matmul(ja, jb).block_until_ready()),
                      ("torch", lambda: ta @ tb)):
      times = []
      for _ in range(repeats + 3):  # 3 to compile and warm up
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
      rates[(name, side)] = 2 * rows * inner * cols / min(times[3:]) / 1e9
  return rates


def roofline(s, args, results, flops):
  """Is 'torch / 2' reachable? The step's FLOPs at the best matmul rate measured here."""
  rates = gemm_rates(s, args.threads)
  peak = max(rates.values())
  print(f"\nmatmul rate, float32, {args.threads} threads (GFLOP/s, best of 30 calls): " + ", ".join(
      f"{name} {side} {rate:.0f}" for (name, side), rate in rates.items()))
  print("| variant | GFLOP (XLA) | torch (ms) | goal: torch / 2 (ms) | all FLOPs at the best "
        "matmul rate (ms) | share of that rate the goal needs | ours now | torch now |")
  print("|---|---|---|---|---|---|---|---|")
  table = {}
  for name, (_, medians) in results.items():
    gflop, torch_s, jax_s = flops[name], medians["torch"], medians["jax"]
    floor_ms, goal_ms = gflop / peak * 1e3, torch_s / 2 * 1e3
    table[name] = dict(gflop=gflop, goal_ms=goal_ms, floor_ms=floor_ms,
                       needed=floor_ms / goal_ms, ours=gflop / jax_s / peak,
                       torch=gflop / torch_s / peak)
    row = table[name]
    print(f"| {name} + align | {gflop:.2f} | {torch_s * 1e3:.1f} | {goal_ms:.1f} | "
          f"{floor_ms:.1f} | {row['needed']:.0%} | {row['ours']:.0%} | {row['torch']:.0%} |")
  return {"gemm_gflops": {f"{n}, {side}": r for (n, side), r in rates.items()},
          "peak_gflops": peak, "variants": table}


# ----------------------------------------------------------------------------- main
def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--also-threads", type=int, default=1,
                      help="also time torch with this many threads (0 = no)")
  parser.add_argument("--variants", default="lora,full", help="lora, full or both")
  parser.add_argument("--no-profile", dest="profile", action="store_false")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, LoRA only, 1 round, no profile")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args()
  s = dict(SMOKE if args.smoke else FULL)
  if args.batch:
    s["batch"] = args.batch
  if args.smoke:
    args.rounds, args.steps, args.profile, args.also_threads = 1, 2, False, 0
    args.variants = "lora"
  torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | transformers {transformers.__version__} | "
        f"peft {peft.__version__} | {os.cpu_count()} cores")
  print(f"sizes: {s}; {args.rounds} rounds x {args.steps} steps per side")
  results, setups = {}, {}
  for name, lora in (("LoRA", True), ("full", False)):
    if name.lower() not in args.variants.split(","):
      continue
    first, medians, setups[name] = compare(s, args, lora)
    results[name] = (first, medians)

  print("\nfirst step, same weights and batch (jax | torch):")
  print("| variant | loss/total | loss/action | loss/align | grad_norm | trainable params |")
  print("|---|---|---|---|---|---|")
  for name, (first, _) in results.items():
    j, t = first["jax"], first["torch"]
    cells = [f"{j[k]:.5f} \\| {t[k]:.5f}" for k in ("loss/total", "loss/action", "loss/align",
                                                   "grad_norm")]
    print(f"| {name} | {' | '.join(cells)} | {first['trainable'][0]:,} \\| "
          f"{first['trainable'][1]:,} |")
    if "adapted" in first:
      print(f"LoRA-adapted kernels: jax {first['adapted'][0]}, torch {first['adapted'][1]}")

  print(f"\nmedian step time, batch {s['batch']} (torch: {args.threads} threads unless said):")
  print("| variant | jax (ms) | torch (ms) | torch / jax |")
  print("|---|---|---|---|")
  for name, (_, medians) in results.items():
    for other in (k for k in medians if k.startswith("torch")):
      label = name + " + align" + other[len("torch"):]
      print(f"| {label} | {medians['jax'] * 1e3:.1f} | {medians[other] * 1e3:.1f} | "
            f"{medians[other] / medians['jax']:.2f}x |")
  for name, (_, medians) in results.items():
    print(f"ratio torch/jax ({name}): {medians['torch'] / medians['jax']:.3f}")
  limits = None
  if not args.smoke:
    flops = {name: _cost(setup[-1].step, setup[-1].state, setup[-1].frozen,
                         setup[-1].batch)[0] for name, setup in setups.items()}
    limits = roofline(s, args, results, flops)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"sizes": s, "torch_threads": args.threads, "variants": {
          name: {"median_s": medians, "ratio": medians["torch"] / medians["jax"],
                 "first_step": {k: first[k] for k in ("jax", "torch")},
                 "trainable": first["trainable"]}
          for name, (first, medians) in results.items()}, "roofline": limits}, f, indent=1)

  if not args.profile or len(setups) < 2:
    return
  medians, costs, attention = profile(s, args, setups["LoRA"], setups["full"])
  base = medians["LoRA + align (the real step)"]
  print("\nour step, ablations and parts (median ms, same run; XLA cost analysis):")
  print("| what | median (ms) | vs real step | GFLOP | MB accessed |")
  print("|---|---|---|---|---|")
  for name, median in medians.items():
    flops, mb = costs[name]
    print(f"| {name} | {median * 1e3:.2f} | {median / base:.1%} | {flops:.3f} | {mb:.1f} |")
  for name, (attn, total) in attention.items():
    print(f"attention in the {name} forward: {attn:.3f} of {total:.3f} GFLOP "
          f"({attn / total:.1%}, analytic)")


if __name__ == "__main__":
  main()
