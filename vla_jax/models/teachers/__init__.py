"""The registry of teacher families: `teacher.kind` -> `TeacherFamily`.

Each family lives in its own module here (config, module, pixel normalisation, prefix
tokens, loaders, presets; see `family.py`). Adding one is that module plus one line in
`FAMILIES` below; `Teacher`, `parse_teacher`, `load_teacher`, the presets and
configs/align.py then know it.
"""

from typing import Dict

from vla_jax.models.teachers import dinov2, dinov3, radio, siglip, siglip2
from vla_jax.models.teachers.family import TeacherFamily
from vla_jax.typed_config import registered

FAMILIES: Dict[str, TeacherFamily] = {f.kind: f for f in (
    siglip.FAMILY,
    dinov2.FAMILY,
    radio.FAMILY,
    dinov3.FAMILY,
    siglip2.FAMILY,
)}


def family(kind: str) -> TeacherFamily:
  """The family registered as `kind`; ConfigError naming the known kinds otherwise."""
  return registered(FAMILIES, kind, "teacher.kind")
