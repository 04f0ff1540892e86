"""The registry of student layouts: `model.arch` -> `StudentLayout`.

Each layout lives in its own module here (where the visual tokens go, the attention and
position layout, its projector, which tower outputs feed it, its checkpoint loaders; see
`layout.py`). Adding a student is that module plus one line in `LAYOUTS` below; the
`VLA` module, `VLAConfig` validation, training batches, decoding, attention maps and
`load_student` then know it.
"""

from typing import Dict

from vla_jax.models.students import openvla, paligemma
from vla_jax.models.students.layout import StudentLayout
from vla_jax.typed_config import registered

LAYOUTS: Dict[str, StudentLayout] = {s.arch: s for s in (
    openvla.LAYOUT,
    paligemma.LAYOUT,
)}


def layout(arch: str) -> StudentLayout:
  """The layout registered as `arch`; ConfigError naming the known ones otherwise."""
  return registered(LAYOUTS, arch, "model.arch")
