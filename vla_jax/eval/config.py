"""Settings of the evaluation commands, light enough for config files to import.

`configs/align.py` embeds `EvalConfig`'s defaults; keeping it apart from the commands
means loading a config does not import the policy, TensorFlow or matplotlib.
"""

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from vla_jax.sim import catalogue as cat
from vla_jax.typed_config import from_mapping, require

EVAL_SPLITS = tuple(cat.AXES)  # every OOD split and every VL-Think environment


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Settings of the evaluation commands.

  Attributes:
    splits: tabletop splits for eval_sim (default: every OOD split and VL-Think).
    seeds: episodes per split (`sim_eval.eval_seeds(seeds)`, shared across checkpoints).
    first_seed: skip this many evaluation seeds (`eval_seeds(seeds, first_seed)`: a set of
      episodes disjoint from the default one).
    max_steps: episode limit (the paper: 80).
    batch_size: environments per batch (0 = all seeds of a split at once).
    workers: batches rolled out at once, each in its own thread (`sim_eval.evaluate`;
      results do not depend on it).
    strip_episodes: rollout strips kept per split.
    step: checkpoint step (0 = latest).
    execute_steps: actions of each predicted chunk executed before the policy observes
      again (0 = the whole chunk; runs with data.action_horizon > 1 only).
    layers: LLM layers for probe (hidden after L blocks), attention (block L) and t-SNE.
    probe_images_per_object: images per catalogue object for the probe.
    probe_epochs: SGD epochs of the probe (the paper: 40).
    attention_objects: catalogue objects for attention maps.
    tsne_objects, tsne_images_per_object: classes and points of the t-SNE.
    open_loop_batches: batches of the val split for open_loop.
  """
  splits: Tuple[str, ...] = EVAL_SPLITS
  seeds: int = 16
  first_seed: int = 0
  max_steps: int = 80
  batch_size: int = 0
  workers: int = 2
  strip_episodes: int = 2
  step: int = 0
  execute_steps: int = 0
  layers: Tuple[int, ...] = (0, 2, 4)
  probe_images_per_object: int = 24
  probe_epochs: int = 40
  attention_objects: Tuple[int, ...] = (0, 5, 16, 17)
  tsne_objects: Tuple[int, ...] = (0, 5, 10, 15, 16, 17)
  tsne_images_per_object: int = 20
  open_loop_batches: int = 8

  def __post_init__(self):
    require(self.seeds > 0, f"eval.seeds must be > 0, got {self.seeds}.")
    require(self.first_seed >= 0, f"eval.first_seed must be >= 0, got {self.first_seed}.")
    require(self.max_steps > 0, f"eval.max_steps must be > 0, got {self.max_steps}.")
    require(self.workers >= 1, f"eval.workers must be >= 1 (batches rolled out at once), "
            f"got {self.workers}.")
    require(self.execute_steps >= 0, f"eval.execute_steps must be >= 0 (0 = the whole "
            f"chunk), got {self.execute_steps}.")
    for name in self.splits:
      cat.get_split(name)
    for obj in self.attention_objects + self.tsne_objects:
      require(0 <= obj < len(cat.OBJECTS), f"object id {obj} is not in the catalogue "
              f"(0..{len(cat.OBJECTS) - 1}).")


def eval_config(config: Any, overrides: Optional[Mapping[str, Any]] = None) -> EvalConfig:
  """`config.eval` (if any) with `overrides` (None values ignored) as an EvalConfig."""
  base = dict(config.eval.to_dict() if hasattr(config.get("eval", None), "to_dict")
              else (config.get("eval", None) or {}))
  base.update({k: v for k, v in (overrides or {}).items() if v is not None})
  for key in ("splits", "layers", "attention_objects", "tsne_objects"):
    if key in base:
      base[key] = tuple(base[key])
  return from_mapping(EvalConfig, base, "eval")
