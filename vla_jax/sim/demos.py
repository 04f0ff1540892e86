"""Expert demonstrations of the tabletop benchmark written as RLDS (Open-X layout).

Episodes come from `rollout.expert_episodes` (jitted, vmapped, in batches), are cut at
their end, lose their near-zero-action steps like the paper's dataset, and go to disk
through `vla_jax.data.writer.write_rlds`. Step layout: observation/image (JPEG uint8
[S, S, 3]), observation/state float32 [7], action float32 [7] (env.py convention: metres,
radians, absolute gripper in [0, 1] with 1 = open, last), language_instruction, is_first,
is_last, is_terminal, reward, discount. Episode metadata: split, seed, object,
receptacle, success.
"""

from typing import Dict, Iterator, Mapping, Sequence, Tuple

import jax
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from vla_jax.data.writer import openx_step_features, write_rlds
from vla_jax.sim import catalogue as cat
from vla_jax.sim import env
from vla_jax.sim import rollout

# A step is a no-op when its translation is below NOOP_TRANSLATION metres (L2 over xyz),
# its rotation below NOOP_ROTATION radians (L2 over roll, pitch, yaw) and its gripper
# command equals the gripper's current opening.
NOOP_TRANSLATION = 0.01
NOOP_ROTATION = 0.06


def keep_steps(actions: np.ndarray, states: np.ndarray) -> np.ndarray:
  """bool [T]: which steps survive the no-op filter.

  Args:
    actions: float32 [T, 7]; states: float32 [T, 7], observed before each action.
  """
  translation = np.linalg.norm(actions[:, :3], axis=-1)
  rotation = np.linalg.norm(actions[:, 3:6], axis=-1)
  gripper_changes = np.abs(actions[:, 6] - states[:, 6]) > 1e-6
  return ~((translation < NOOP_TRANSLATION) & (rotation < NOOP_ROTATION) & ~gripper_changes)


def _render_steps(env_states, flat, image_size: int, chunk: int = 256) -> dict:
  """Images of the (episode, step) pairs in `flat` from EnvStates [B, T]: {(i, t): image}."""
  images = {}
  for start in range(0, len(flat), chunk):
    part = flat[start:start + chunk]
    rows = np.array([i for i, _ in part] + [part[0][0]] * (chunk - len(part)))
    cols = np.array([t for _, t in part] + [part[0][1]] * (chunk - len(part)))
    states = jax.tree.map(lambda x: x[rows, cols], env_states)  # fixed size: one compile
    rendered = np.asarray(rollout.render_batch(states, image_size))
    images.update({pair: rendered[n] for n, pair in enumerate(part)})
  return images


def metadata_features() -> Dict[str, tfds.features.FeatureConnector]:
  return {"split": tfds.features.Text(), "seed": tfds.features.Scalar(dtype=np.int64),
          "object": tfds.features.Text(), "receptacle": tfds.features.Text(),
          "success": tfds.features.Scalar(dtype=np.bool_)}


def expert_demos(split: str, seeds: Sequence[int], *, image_size: int = 64,
                 max_steps: int = env.MAX_STEPS, batch_size: int = 64,
                 only_success: bool = True, progress: bool = True,
                 noise_std: float = 0.0) -> Iterator[dict]:
  """Yields RLDS episodes ({"steps": [...], "episode_metadata": {...}}) of the expert.

  Args:
    split: split name; seeds: one episode per seed.
    only_success: drop episodes the expert failed (it solves every split in practice).
    noise_std: DART noise on the executed translation (`rollout.expert_episodes`); the
      recorded actions stay the expert's.
  """
  spec = cat.get_split(split)
  seeds = np.asarray(seeds, np.int64)
  bar = tqdm.tqdm(total=len(seeds), desc=f"demos {spec.name}", disable=not progress,
                  leave=False)
  for start in range(0, len(seeds), batch_size):
    chunk = seeds[start:start + batch_size]
    keys = rollout.seed_keys(chunk)
    final, traj = rollout.expert_episodes(keys, spec, max_steps, image_size, False,
                                          noise_std=noise_std)
    final, traj = jax.device_get((final, traj))
    first = jax.device_get(rollout.reset_batch(keys, spec, max_steps))
    # Render only the steps that survive (episodes end early; no-ops are dropped).
    kept_steps = {}
    for i in range(len(chunk)):
      length = int(traj["active"][i].sum())
      kept_steps[i] = np.flatnonzero(keep_steps(traj["action"][i, :length],
                                                traj["state"][i, :length]))
    flat = [(i, t) for i in kept_steps for t in kept_steps[i]]
    images = _render_steps(traj["env_state"], flat, image_size)
    for i, seed in enumerate(chunk):
      bar.update(1)
      success = bool(final.success[i])
      if only_success and not success:
        continue
      state_i = rollout.jax.tree.map(lambda x: x[i], first)
      text = env.instruction(spec, state_i)
      obj, receptacle = env.episode_names(spec, state_i)
      actions, states, kept = traj["action"][i], traj["state"][i], kept_steps[i]
      steps = []
      for n, t in enumerate(kept):
        last = n == len(kept) - 1
        steps.append({
            "observation": {"image": images[(i, t)], "state": states[t]},
            "action": actions[t], "language_instruction": text,
            "is_first": n == 0, "is_last": last, "is_terminal": last and success,
            "reward": np.float32(last and success), "discount": np.float32(1.0)})
      yield {"steps": steps, "episode_metadata": {
          "split": spec.name, "seed": int(seed), "object": obj, "receptacle": receptacle,
          "success": success}}
  bar.close()


def write_demos(data_dir: str, splits: Mapping[str, Tuple[str, Sequence[int]]], *,
                name: str = "tabletop", image_size: int = 64, max_steps: int = env.MAX_STEPS,
                version: str = "1.0.0", overwrite: bool = False, progress: bool = True,
                noise_std: float = 0.0) -> str:
  """Writes expert demos as an RLDS dataset; returns `data_dir/name/version`.

  Args:
    splits: RLDS split name -> (benchmark split name, seeds), e.g.
      {"train": ("train", range(300)), "val": ("train", range(10**6, 10**6 + 32))}.
    noise_std: DART noise of `expert_demos`.
  """
  makers = {rlds_split: (lambda s=s, seeds=seeds: expert_demos(
      s, seeds, image_size=image_size, max_steps=max_steps, progress=progress,
      noise_std=noise_std))
            for rlds_split, (s, seeds) in splits.items()}
  return write_rlds(data_dir, name, makers,
                    step_features=openx_step_features(image_shape=(image_size, image_size, 3)),
                    metadata_features=metadata_features(), version=version,
                    description="Scripted-expert demos of the vla_jax tabletop benchmark.",
                    overwrite=overwrite)
