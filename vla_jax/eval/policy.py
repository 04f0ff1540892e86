"""A trained VLA as a batched tabletop `Policy`: checkpoint in, actions [B, 7] out.

`load_checkpoint` reads either a run (WORKDIR, WORKDIR/checkpoints, latest or chosen
step; the `params` item, LoRA merged) or an exported policy (`--mode=export`), and
returns the student's parameters, its `Experiment`, the normalisation statistics of the
dataset it was trained on and the tokenizer path. `VLAPolicy` then does what OpenVLA's
`predict_action` does: serving preprocessing of each frame at the model's resolution
(`data.augment.preprocess_for_serving`, the same function training's eval branch uses),
the OpenVLA prompt ending in "▁", greedy decoding of the action tokens, bin centres, and
un-normalisation with the q01/q99 statistics (masked dimensions, the gripper, pass
through). Decoding is `vla_jax.models.decode.greedy_decode`: the images are encoded and
the prompt prefilled into a KV cache once, then each of the A action tokens is one
incremental step, all in one jitted call (`use_cache=False` keeps the full-recompute
decoder, one whole forward pass per token, for benchmarks and tests).

A run trained on action chunks (`data.action_horizon` H > 1, as ACT, Octo and
OpenVLA-OFT do) decodes H x 7 tokens per frame: `predict_chunk` returns [B, H, 7], and
the policy called as a `Policy` returns the first `execute_steps` of them ([B, K, 7]),
which `vla_jax.sim.rollout` executes open loop before it observes again.
"""

import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vla_jax.actions import ActionTokenizer, NormStats
from vla_jax.data import augment as augment_lib
from vla_jax.data import batching
from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.experiment import Experiment
from vla_jax.models import decode as decode_lib
from vla_jax.models.vla import VLA
from vla_jax.text import Tokenizer, openvla_inputs
from vla_jax.train import checkpoint as ckpt_lib

ACTION_DIM = 7


def _run_checkpoint_dir(path: str) -> Optional[str]:
  """The Orbax step directory root of a run (WORKDIR or WORKDIR/checkpoints), if any."""
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate) and any(name.isdigit() for name in os.listdir(candidate)):
      return candidate
  return None


def choose_norm_stats(norm_stats: Dict[str, NormStats], assets: Dict[str, Any],
                      dataset: str = "") -> Tuple[str, NormStats]:
  """The statistics to un-normalise with: `dataset`, else the run's first data source."""
  if not norm_stats:
    raise CheckpointError("the checkpoint has no normalisation statistics in its assets; it "
                          "cannot un-normalise actions. Re-export it from a training run.")
  if not dataset:
    sources = assets.get("data", {}).get("sources", [])
    dataset = sources[0] if sources and sources[0] in norm_stats else sorted(norm_stats)[0]
  if dataset not in norm_stats:
    raise ConfigError(f"no normalisation statistics for dataset {dataset!r}; the checkpoint "
                      f"has {sorted(norm_stats)}. Pass one of these names.")
  return dataset, norm_stats[dataset]


def load_checkpoint(path: str, step: Optional[int] = None
                    ) -> Tuple[Any, Experiment, Dict[str, NormStats], Dict[str, Any]]:
  """Student params, experiment, norm stats and assets of a run or an exported policy.

  Args:
    path: a run directory (WORKDIR or WORKDIR/checkpoints) or an export directory.
    step: run checkpoints only: which step (default: the latest valid one; a corrupt
      newer step is skipped with a warning, a corrupt chosen step is a CheckpointError).
  Returns:
    (params, experiment, {dataset: NormStats}, assets dict incl. "tokenizer").
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "assets")):
    loaded = ckpt_lib.load_policy_params(path)
    _check_finite_params(loaded[0], path)
    return loaded
  run_dir = _run_checkpoint_dir(path)
  if run_dir is None:
    raise CheckpointError(f"{path} holds neither training checkpoints (numbered step folders "
                          "in WORKDIR/checkpoints) nor an exported policy (params/ + assets/); "
                          "train first (--mode=train) or point at the right directory.")
  manager = ckpt_lib.make_manager(run_dir, async_save=False)
  wanted = manager.latest_step() if step is None else step
  if wanted is None or wanted not in manager.all_steps():
    raise CheckpointError(f"step {wanted} is not in {run_dir}; saved steps: "
                          f"{list(manager.all_steps())}.")
  # Checksums verified; a corrupt chosen step is an error, a corrupt latest falls back.
  step, params, experiment, assets = ckpt_lib.restore_inference(manager, step)
  manager.close()
  _check_finite_params(params, f"{run_dir} step {step}")
  return params, experiment, ckpt_lib.norm_stats_from_assets(assets), {**assets, "step": step}


def _check_finite_params(params: Any, where: str) -> None:
  # A diverged run's actions would be garbage (or NaN) with exit status 0: refuse it.
  ckpt_lib.check_finite(params, f"the policy parameters in {where}",
                        "the run diverged before this checkpoint. Evaluate an earlier step "
                        "(--config.eval.step) or retrain with a lower train.learning_rate.")


@functools.partial(jax.jit, static_argnames=("model", "num_actions", "use_cache"))
def greedy_action_tokens(model: VLA, params: Any, images: jax.Array, tokens: jax.Array,
                         lengths: jax.Array, num_actions: int,
                         use_cache: bool = True) -> jax.Array:
  """Greedy decoding of `num_actions` tokens after each right-padded prompt.

  Args:
    images: uint8 [B, S, S, 3] at the model's resolution.
    tokens: int32 [B, L] right-padded prompts with room for the actions (L >= len + A,
      as `VLAPolicy.prompt_batch` lays them out); the last A columns are not read.
    lengths: int32 [B] prompt lengths (BOS included).
    use_cache: False decodes by full recomputation (the reference, for benchmarks).
  Returns:
    int32 [B, A] generated token ids.
  """
  length = tokens.shape[1] - num_actions
  if length < 1:
    raise InputError(f"tokens [B, {tokens.shape[1]}] leave no room for {num_actions} actions "
                     "after the prompt; pad the buffer to prompt length + num_actions.")
  # Every prompt fits in the first L - A columns; decoding appends the actions after them.
  prompts = tokens[:, :length]
  input_mask = jnp.arange(length)[None, :] < lengths[:, None]
  return decode_lib.greedy_decode(model, params, images, prompts, input_mask, num_actions,
                                  use_cache=use_cache)


class VLAPolicy:
  """`Policy` of a VLA: (images uint8 [B, H, W, 3], instructions, states [B, 7]) -> [B, 7].

  With `action_horizon` H > 1 it returns [B, K, 7], the first K = `execute_steps` actions
  of each predicted chunk (`predict_chunk` gives all H).

  States are read only by a policy trained with `data.proprio_dims` (`proprio_dims`,
  normalised with `state_stats`, the training data's state statistics).

  Attributes:
    model, params: the student, either layout. Both are trained on OpenVLA's prompt
      (`text.openvla_inputs`); a PaliGemma student's prompt is its bidirectional prefix
      and the actions are causal, in training (`step.supervised_prefix_mask`) as here
      (`greedy_action_tokens` passes no prefix mask: the prompt is the prefix).
    tokenizer: its tokenizer; action ids are the last `n_bins` ids below vocab_size.
    norm_stats: statistics actions are un-normalised with.
    augment: the training run's AugmentConfig (the eval centre crop follows it).
    use_cache: decode with the KV cache (default); False re-runs the whole model per
      action token (the reference `benchmarks/eval_speed.py` compares against).
    action_horizon: H, actions per decoded chunk (the run's `data.action_horizon`).
    execute_steps: K <= H, actions of each chunk returned by a call (default H).
  """

  def __init__(self, model: VLA, params: Any, tokenizer: Tokenizer, norm_stats: NormStats,
               *, augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig(),
               action_dim: int = ACTION_DIM, length_bucket: int = 8, use_cache: bool = True,
               proprio_dims: Sequence[int] = (), state_stats: Optional[NormStats] = None,
               action_horizon: int = 1, execute_steps: Optional[int] = None):
    if norm_stats.dim != action_dim:
      raise ConfigError(f"norm stats have {norm_stats.dim} dimensions, the policy emits "
                        f"{action_dim}; use the statistics of the dataset the model learned.")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.norm_stats, self.augment, self.action_dim = norm_stats, augment, action_dim
    self.use_cache = use_cache
    self.proprio_dims = tuple(int(d) for d in proprio_dims)
    if self.proprio_dims and (state_stats is None or max(self.proprio_dims) >= state_stats.dim):
      raise ConfigError(f"proprio_dims={self.proprio_dims} need the training data's state "
                        "statistics covering those dimensions (state_stats); load the policy "
                        "with load_policy, which reads them from the checkpoint.")
    self.state_stats = state_stats
    self.action_horizon = int(action_horizon)
    self.execute_steps = self.action_horizon if execute_steps is None else int(execute_steps)
    if self.action_horizon < 1 or not 1 <= self.execute_steps <= self.action_horizon:
      raise ConfigError(f"action_horizon={action_horizon}, execute_steps={execute_steps}: "
                        "need 1 <= execute_steps <= action_horizon (the run's "
                        "data.action_horizon).")
    self.action_tokenizer = ActionTokenizer(vocab_size=tokenizer.vocab_size)
    self._bucket = length_bucket
    self._prompt_cache: Dict[str, np.ndarray] = {}
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.vocab_size
    size = model.config.image_size
    # `preprocess_for_serving` per frame, traced once as a graph over the batch: eager TF
    # per frame would cost more than the model's forward passes.
    self._preprocess = tf.function(lambda images: tf.map_fn(
        lambda image: augment_lib.preprocess_image(image, size, train=False, config=augment),
        images, fn_output_signature=tf.uint8), reduce_retracing=True)

  def prompt_batch(self, instructions: Sequence[str], states: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, L], lengths int32 [B]); L is bucketed to limit recompiles.

    `states` (raw, [B, D]) are needed when the policy writes proprio tokens: normalised
    with the training data's statistics, they go before the prompt's final "▁" exactly
    where `batching.tokenize_batch` put them in training.
    """
    state_ids = np.zeros((len(instructions), 0), np.int32)
    if self.proprio_dims:
      if states is None:
        raise InputError(f"this policy reads robot state dims {self.proprio_dims} in its "
                         "prompt (data.proprio_dims); pass states [B, D] with the images.")
      states = np.asarray(states, np.float64)
      if states.shape != (len(instructions), self.state_stats.dim):
        raise InputError(f"states must be [B={len(instructions)}, {self.state_stats.dim}] "
                         f"(the training data's state), got {states.shape}.")
      if not np.all(np.isfinite(states)):
        raise InputError("robot states hold NaN/inf; the policy writes them into its prompt.")
      state_ids = batching.state_token_ids(self.state_stats.normalize(states),
                                           self.proprio_dims, self.action_tokenizer)
    prompts = []
    for row, text in enumerate(instructions):
      if text not in self._prompt_cache:
        ids = openvla_inputs(self.tokenizer, text)[0]
        batching.check_prompt_ids(ids, self.action_tokenizer, self.tokenizer, text)
        self._prompt_cache[text] = ids
      ids = self._prompt_cache[text]
      prompts.append(np.concatenate([ids[:-1], state_ids[row], ids[-1:]]) if
                     self.proprio_dims else ids)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    needed = int(lengths.max()) + self.action_dim * self.action_horizon
    length = -(-needed // self._bucket) * self._bucket
    tokens = np.full((len(prompts), length), self.pad_id, np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    return tokens, lengths

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] camera frames -> uint8 [B, S, S, 3] model inputs."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise InputError(f"policy images must be uint8 [B, H, W, 3], got {images.dtype} "
                       f"{images.shape}; convert camera frames to RGB uint8.")
    return self._preprocess(tf.convert_to_tensor(images)).numpy()

  def predict_chunk(self, images: np.ndarray, instructions: List[str],
                    states: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [B, H, 7]: the whole predicted action chunk of each frame (H = 1: OpenVLA)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(instructions) != images.shape[0]:
      raise InputError(f"VLAPolicy expects images [B, H, W, 3] and B instructions; got images "
                       f"{images.shape} and {len(instructions)} instructions.")
    # OpenVLA reads no proprioception; states are used only with proprio_dims.
    tokens, lengths = self.prompt_batch(instructions, states)
    ids = greedy_action_tokens(self.model, self.params, self.preprocess(images), tokens,
                               lengths, self.action_dim * self.action_horizon,
                               use_cache=self.use_cache)
    normalized = self.action_tokenizer.decode(np.asarray(ids)).reshape(
        len(instructions), self.action_horizon, self.action_dim)
    return np.asarray(self.norm_stats.unnormalize(normalized), np.float32)

  def __call__(self, images: np.ndarray, instructions: List[str],
               states: Optional[np.ndarray] = None) -> np.ndarray:
    """[B, 7] (action_horizon 1), else the first `execute_steps` of each chunk [B, K, 7]."""
    chunk = self.predict_chunk(images, instructions, states)
    return chunk[:, 0] if self.action_horizon == 1 else chunk[:, :self.execute_steps]


def load_policy(path: str, *, step: Optional[int] = None, dataset: str = "",
                tokenizer: str = "", use_cache: bool = True,
                execute_steps: Optional[int] = None) -> VLAPolicy:
  """`VLAPolicy` of a run or exported checkpoint (see `load_checkpoint`).

  Args:
    dataset: whose norm stats to use (default: the run's first data source).
    tokenizer: override the tokenizer path stored in the checkpoint's assets.
    use_cache: KV-cache decoding (default) or full recomputation (see `VLAPolicy`).
    execute_steps: actions of each predicted chunk to execute before observing again
      (default: the whole chunk; the horizon is the run's `data.action_horizon`).
  """
  params, experiment, norm_stats, assets = load_checkpoint(path, step)
  tokenizer = tokenizer or assets.get("tokenizer", "")
  if not tokenizer:
    raise CheckpointError(f"{path} names no tokenizer in its assets; pass tokenizer=PATH.")
  name, stats = choose_norm_stats(norm_stats, assets, dataset)
  normalization = assets.get("data", {}).get("normalization", "bounds_q99")
  if normalization != "bounds_q99":
    raise ConfigError(f"{path} was trained with data.normalization={normalization!r}; the "
                      "policy un-normalises actions with OpenVLA's bounds_q99 only. Train "
                      "with data.normalization='bounds_q99'.")
  proprio_dims = tuple(assets.get("data", {}).get("proprio_dims", ()))
  state_stats = None
  if proprio_dims:
    state_stats = NormStats.from_dict(assets.get("state_stats", {}).get(name)) if name in (
        assets.get("state_stats") or {}) else None
    if state_stats is None:
      raise CheckpointError(f"{path} was trained with proprio_dims={proprio_dims} but holds "
                            f"no state statistics for {name!r}; re-export it from the run.")
  horizon = int(assets.get("data", {}).get("action_horizon", 1))
  return VLAPolicy(VLA(experiment.model), params, Tokenizer.from_path(tokenizer), stats,
                   use_cache=use_cache, proprio_dims=proprio_dims, state_stats=state_stats,
                   action_horizon=horizon, execute_steps=execute_steps)
