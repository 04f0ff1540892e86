"""Loading the frozen teacher's weights from a local checkpoint, by the family's own loader.

The `Teacher` module keeps the wrapped tower's own parameter names under `tower/`, so
a big_vision SigLIP `.npz`, a HF `SiglipVisionModel`/`SiglipModel`, a HF DINOv2 or a
transformers RADIO checkpoint loads unchanged; each family (`vla_jax.models.teachers`)
names its loaders by format, and only the nesting is added here.
"""

from typing import Any, FrozenSet, Tuple

from vla_jax.errors import CheckpointError
from vla_jax.models import teachers
from vla_jax.models.teacher import TeacherConfig


def formats() -> FrozenSet[Tuple[str, str]]:
  """Every (teacher kind, checkpoint format) pair a registered family can load."""
  return frozenset((f.kind, fmt) for f in teachers.FAMILIES.values() for fmt in f.loaders)


FORMATS = formats()


def load_teacher(path: str, config: TeacherConfig, fmt: str = "big_vision", *,
                 shardings: Any = None) -> Any:
  """Params of `Teacher(config)` from `path` in format `fmt` ("big_vision" | "hf")."""
  loader = config.family.loaders.get(fmt)
  if loader is None:
    raise CheckpointError(f"No {fmt!r} loader for a {config.kind} teacher; supported: "
                          f"{sorted(formats())} (or 'orbax' after --mode=convert).")
  tower_shardings = None if shardings is None else shardings["tower"]
  return {"tower": loader(path, config.tower, shardings=tower_shardings)}
