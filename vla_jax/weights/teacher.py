"""Loading the frozen teacher's weights (SigLIP or DINOv2) from a local checkpoint.

The `Teacher` module keeps the wrapped tower's own parameter names under `tower/`, so
a big_vision SigLIP `.npz`, a HF `SiglipVisionModel`/`SiglipModel` or a HF DINOv2
checkpoint loads unchanged; only the nesting is added here.
"""

from typing import Any

from vla_jax.errors import CheckpointError
from vla_jax.models.teacher import TeacherConfig
from vla_jax.weights import dinov2 as dinov2_weights
from vla_jax.weights import siglip as siglip_weights

FORMATS = {("siglip", "big_vision"), ("siglip", "hf"), ("dinov2", "hf")}


def load_teacher(path: str, config: TeacherConfig, fmt: str = "big_vision", *,
                 shardings: Any = None) -> Any:
  """Params of `Teacher(config)` from `path` in format `fmt` ("big_vision" | "hf")."""
  if (config.kind, fmt) not in FORMATS:
    raise CheckpointError(f"No {fmt!r} loader for a {config.kind} teacher; supported: "
                          f"{sorted(FORMATS)} (or 'orbax' after --mode=convert).")
  tower_shardings = None if shardings is None else shardings["tower"]
  if config.kind == "dinov2":
    tower = dinov2_weights.load_hf_dinov2(path, config.dino, shardings=tower_shardings)
  elif fmt == "hf":
    tower = siglip_weights.load_hf_siglip(path, config.vit, shardings=tower_shardings)
  else:
    tower = siglip_weights.load_big_vision(path, config.vit, shardings=tower_shardings)
  return {"tower": tower}
