"""Roll policies out over many tabletop environments at once.

A `Policy` maps a batch of observations to actions:
  policy(images uint8 [B, H, W, 3], instructions list[str] (B), states float32 [B, 7])
    -> actions float32 [B, 7]   (env.py: convention and bounds)
    or an action chunk [B, K, 7], executed open loop (K steps) before the next call.
`rollout` resets B environments (one per seed), then loops in Python over steps: each
call of the policy is followed by K advances of all environments with one jitted, vmapped
`env.step` each (render included). A policy that sets `wants_env_state = True` also receives
the privileged batched `EnvState` as keyword `env_state` (the scripted expert does).
`expert_episodes` runs the expert fully inside jit (a `lax.scan` over steps), for
demonstrations and success statistics.
"""

import dataclasses
import functools
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vla_jax.sim import catalogue as cat
from vla_jax.sim import env
from vla_jax.sim import expert

Policy = Callable[[np.ndarray, List[str], np.ndarray], np.ndarray]


def seed_keys(seeds: Sequence[int]) -> jax.Array:
  """PRNG keys [B] for integer seeds (episode i is determined by seeds[i] alone)."""
  return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))


@functools.partial(jax.jit, static_argnames=("layout", "max_steps"))
def _reset_batch(keys, arrays, layout, max_steps):
  return jax.vmap(lambda k: env.reset_from_arrays(k, arrays, layout, max_steps))(keys)


def reset_batch(keys, split, max_steps: int = env.MAX_STEPS) -> env.EnvState:
  """`env.reset` vmapped over keys [B] (compiled once per `env.layout`, not per split)."""
  return _reset_batch(keys, env.split_arrays(split), env.layout(split), max_steps)


# Environments rendered together. A larger batch runs as a loop over chunks of this many
# (`lax.map(..., batch_size=)`): each chunk's images and temporaries stay in the CPU's
# caches, where one vmap over 1024 environments streams them through memory. Measured
# (benchmarks/sim_speed.py, 2-core CPU): at B = 1024, 26.8k env steps/s in chunks of 64
# against 16.6k as one vmap, the same images bit for bit; 16 / 32 / 128 gave 24.2k /
# 24.8k / 27.1k.
SIM_CHUNK = 64


def _vmap_in_chunks(fn, chunk: int, *args):
  """`jax.vmap(fn)(*args)`, run `chunk` rows at a time when the batch is larger."""
  batch = jax.tree.leaves(args)[0].shape[0]
  if not chunk or batch <= chunk:
    return jax.vmap(fn)(*args)
  return jax.lax.map(lambda row: fn(*row), args, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("image_size", "chunk"))
def observe_batch(states: env.EnvState, image_size: int = 64, chunk: int = SIM_CHUNK):
  """`env.observe` vmapped: {"image": uint8 [B, S, S, 3], "state": float32 [B, 7]}.

  `chunk`: environments rendered at once (`SIM_CHUNK`; 0 = the whole batch in one vmap).
  """
  return _vmap_in_chunks(lambda s: env.observe(s, image_size), chunk, states)


@functools.partial(jax.jit, static_argnames=("image_size", "chunk"))
def step_batch(states: env.EnvState, actions, image_size: int = 64, chunk: int = SIM_CHUNK):
  """`env.step` vmapped over states [B] and actions [B, 7], `chunk` environments at a time
  (`SIM_CHUNK`; 0 = the whole batch in one vmap; the results are the same)."""
  return _vmap_in_chunks(lambda s, a: env.step(s, a, image_size), chunk, states, actions)


@functools.partial(jax.jit, static_argnames=("image_size", "chunk"))
def step_chunk_batch(states: env.EnvState, actions, image_size: int = 64,
                     chunk: int = SIM_CHUNK):
  """K steps of B environments, actions float32 [K, B, 7] in order, one render at the end.

  Returns (states, obs, done) as `step_batch` returns them after its K-th step: a policy
  that executes a chunk open loop sees only the last frame, so the K - 1 before it are
  not drawn. An episode that ends inside the chunk stays as it ended (`env.advance`).
  """
  def one_step(states, step_actions):
    return jax.vmap(env.advance)(states, step_actions)[0], None

  states, _ = jax.lax.scan(one_step, states, actions)
  obs = _vmap_in_chunks(lambda s: env.observe(s, image_size), chunk, states)
  return states, obs, states.done


@dataclasses.dataclass
class RolloutResult:
  """Outcome of `rollout` for B episodes.

  success: bool [B]; steps: int [B] (steps taken until done, or the limit);
  instructions: B strings; frames: uint8 [T + 1, B, S, S, 3] when requested, else None
  (frame 0 is the reset observation; finished environments repeat their last frame).
  """
  split: str
  seeds: np.ndarray
  success: np.ndarray
  steps: np.ndarray
  instructions: List[str]
  frames: Optional[np.ndarray] = None

  @property
  def success_rate(self) -> float:
    return float(np.mean(self.success))


def rollout(policy: Policy, split: str, seeds: Sequence[int], *, max_steps: int = env.MAX_STEPS,
            image_size: int = 64, frames: bool = False, progress: bool = True) -> RolloutResult:
  """Runs `policy` on one episode of `split` per seed, all environments in one batch.

  Args:
    policy: a `Policy`.
    split: split name (`catalogue.SPLITS`); unknown names raise ConfigError.
    seeds: B integer seeds.
    max_steps: episode limit (the paper: 80).
    image_size: rendered image side.
    frames: also return every observed image (memory: T x B x S x S x 3 bytes).
    progress: show a tqdm bar over steps.
  Returns:
    `RolloutResult`.
  Raises:
    InputError: the policy returned actions of the wrong shape or with NaN / inf.
  """
  spec = cat.get_split(split)
  seeds = np.asarray(seeds, np.int64)
  states = reset_batch(seed_keys(seeds), spec, max_steps)
  obs = observe_batch(states, image_size)
  texts = env.instructions(spec, states)
  recorded = [np.asarray(obs["image"])] if frames else None
  batch = len(seeds)
  bar = tqdm.tqdm(total=max_steps, desc=f"rollout {spec.name}", disable=not progress,
                  leave=False)
  taken, done = 0, np.zeros(batch, bool)
  while taken < max_steps and not bool(np.all(done)):
    kwargs = {"env_state": states} if getattr(policy, "wants_env_state", False) else {}
    chunk = policy(np.asarray(obs["image"]), texts, np.asarray(obs["state"]), **kwargs)
    chunk = env.check_action_chunk(chunk, batch=batch)[:max_steps - taken]
    if not frames and len(chunk) > 1:  # only the chunk's last frame is looked at
      states, obs, done = step_chunk_batch(states, jnp.asarray(chunk), image_size)
      taken += len(chunk)
      bar.update(len(chunk))
      continue
    for actions in chunk:
      states, obs, _, done, _ = step_batch(states, jnp.asarray(actions), image_size)
      taken += 1
      bar.update(1)
      if frames:
        recorded.append(np.asarray(obs["image"]))
      if bool(np.all(done)):
        break
  bar.close()
  host = jax.device_get(states)
  return RolloutResult(split=spec.name, seeds=seeds, success=np.asarray(host.success),
                       steps=np.asarray(host.t), instructions=texts,
                       frames=np.stack(recorded) if frames else None)


class _ScriptedPolicy:
  """The expert as a Policy (privileged: reads the environment state)."""
  wants_env_state = True

  def __init__(self):
    self._act = jax.jit(jax.vmap(expert.expert_action))

  def __call__(self, images, instructions, states, *, env_state=None):
    del images, instructions, states
    if env_state is None:
      raise ValueError("scripted_policy needs env_state=...; call it through rollout().")
    return np.asarray(self._act(env_state))


def scripted_policy() -> Policy:
  """The scripted expert as a `Policy` (gets the privileged state from `rollout`)."""
  return _ScriptedPolicy()


def random_policy(seed: int = 0) -> Policy:
  """Uniform random actions within the bounds; gripper open or closed at random."""
  rng = np.random.default_rng(seed)

  def policy(images, instructions, states):
    del instructions, states
    batch = images.shape[0]
    actions = rng.uniform(env.ACTION_LOW, env.ACTION_HIGH, (batch, 7)).astype(np.float32)
    actions[:, 6] = rng.integers(0, 2, batch)
    return actions

  return policy


def expert_episodes(keys, split, max_steps: int = env.MAX_STEPS, image_size: int = 64,
                    render: bool = True, noise_std: float = 0.0):
  """Expert episodes entirely under jit, vmapped over keys [B].

  `noise_std` > 0 perturbs the *executed* translation with Gaussian noise (metres, per
  axis, on every other step on average, never while the gripper closes or opens), while
  the recorded action stays the expert's: DART-style demonstrations (Laskey et al.,
  2017) that visit states off the expert's path and show how it recovers from them.

  Returns:
    (final states [B], trajectory) where trajectory holds, per step t < max_steps (time
    axis second): "image" uint8 [B, T, S, S, 3] (without render: "env_state", the
    EnvState before each step, to render only the steps one needs), "state"
    float32 [B, T, 7] observed before acting, "action" float32 [B, T, 7], "active" bool
    [B, T] (the episode had not ended before step t), "reward" float32 [B, T].
  """
  return _expert_episodes(keys, env.split_arrays(split), env.layout(split), max_steps,
                          image_size, render, jnp.float32(noise_std))


NOISE_SALT = 0x5EED  # noise keys are fold_in(episode key, NOISE_SALT): resets are unchanged


@functools.partial(jax.jit, static_argnames=("layout", "max_steps", "image_size", "render"))
def _expert_episodes(keys, arrays, layout, max_steps, image_size, render, noise_std):

  def episode(key):
    start = env.reset_from_arrays(key, arrays, layout, max_steps)
    noise_keys = jax.random.split(jax.random.fold_in(key, NOISE_SALT), max_steps)

    def body(state, noise_key):
      action = expert.expert_action(state)
      out = {"state": env.proprio(state), "action": action, "active": ~state.done}
      if render:
        out["image"] = env.render(state, image_size)
      else:
        out["env_state"] = state
      k_on, k_noise = jax.random.split(noise_key)
      gripper_moves = (action[6] >= 0.5) != (state.gripper >= 0.5)
      perturb = jax.random.bernoulli(k_on) & ~gripper_moves
      noise = jnp.where(perturb, noise_std * jax.random.normal(k_noise, (3,)), 0.0)
      executed = action.at[:3].add(noise)
      state, reward = env.advance(state, executed)
      out["reward"] = reward
      return state, out

    return jax.lax.scan(body, start, noise_keys)

  return jax.vmap(episode)(keys)


@functools.partial(jax.jit, static_argnames=("image_size",))
def render_batch(states: env.EnvState, image_size: int = 64) -> jax.Array:
  """`env.render` vmapped: uint8 [B, S, S, 3]."""
  return jax.vmap(lambda s: env.render(s, image_size))(states)


def expert_success(split: str, seeds: Sequence[int], max_steps: int = env.MAX_STEPS) -> np.ndarray:
  """bool [B]: whether the expert solves each seed's episode (physics only, no render)."""
  final, _ = expert_episodes(seed_keys(seeds), split, max_steps, 64, False)
  return np.asarray(final.success)
