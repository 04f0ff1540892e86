"""Registry of Open X-Embodiment datasets: where each keeps its cameras, state and actions.

Every dataset stores the same things under different names and conventions. A
`DatasetSpec` is plain configuration that says, for one RLDS dataset, which observation
keys are the cameras (by role: `primary`, `secondary`, `wrist`), which keys are
concatenated into the state and the action, how its gripper action is encoded, and which
dataset-specific quirks apply (bridge's all-zero first step, compressed kuka state, ...).
`rlds.standardize` turns a raw episode into the common trajectory dict with it.
Registering a custom dataset is one `register(DatasetSpec(...))` call, no code.

Conventions of the common trajectory: actions are `[T, A]` float32 with the gripper last,
absolute, 1 = open, 0 = closed (OpenVLA / Octo); states are `[T, S]` float32.
Keys follow the public Open-X feature descriptions (octo's and OpenVLA's
`oxe_dataset_configs`); a key path with "/" addresses a nested feature, e.g.
"action/world_vector" or "observation/state".
"""

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

from vla_jax.errors import ConfigError
from vla_jax.typed_config import require

# How the raw gripper action is encoded, and what `traj_transforms.standardize_gripper`
# does to reach "absolute, 1 = open":
#   absolute_open1:   already absolute in [0, 1], 1 = open (bridge, tabletop); clipped.
#   absolute_closed1: absolute, 1 = closed (droid, libero in [-1, 1]); clipped and inverted.
#   relative:         -1 close / +1 open / 0 keep (RT-1 style); integrated to absolute.
#   none:             the robot has no gripper action; a constant "open" is appended.
GRIPPER_ENCODINGS = ("absolute_open1", "absolute_closed1", "relative", "none")
# Named, dataset-specific decoding steps run before the generic standardisation.
QUIRKS = ("drop_first_step", "relabel_from_state", "zlib_state", "language_table_text",
          "pad_rotation")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one RLDS dataset into the common trajectory layout.

  Attributes:
    name: registry name (usually the RLDS dataset name).
    image_keys: camera role -> observation key, e.g. {"primary": "image_0"}.
    state_keys: observation keys concatenated (last axis) into `state` [T, S]; each may
      carry a slice "key[a:b]". Empty: no state (a zero-width state).
    action_keys: step keys concatenated into the action [T, A] *before* the gripper
      standardisation; the gripper is the last column. "action/world_vector" style paths.
    language_key: step key of the instruction ("language_instruction").
    action_dim: A after standardisation (checked against the data).
    state_dim: S after standardisation (checked; None = not checked).
    gripper: one of GRIPPER_ENCODINGS.
    binarize_gripper: snap intermediate gripper values to 0/1 (OpenVLA for bridge).
    quirks: names from QUIRKS, applied in order.
    action_mask: per action dimension, normalise it (False = pass through, the gripper).
    description: one line on the dataset.
  """
  name: str
  image_keys: Tuple[Tuple[str, str], ...] | Mapping[str, str]
  action_keys: Tuple[str, ...] = ("action",)
  state_keys: Tuple[str, ...] = ("state",)
  language_key: str = "language_instruction"
  action_dim: int = 7
  state_dim: Optional[int] = None
  gripper: str = "absolute_open1"
  binarize_gripper: bool = False
  quirks: Tuple[str, ...] = ()
  action_mask: Optional[Tuple[bool, ...]] = None
  description: str = ""

  def __post_init__(self):
    images = self.image_keys
    if isinstance(images, Mapping):
      images = tuple(images.items())
    object.__setattr__(self, "image_keys", tuple((str(r), str(k)) for r, k in images))
    for field in ("action_keys", "state_keys", "quirks"):
      value = getattr(self, field)
      object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
    where = f"DatasetSpec({self.name!r})"
    require(bool(self.name) and self.name.replace("_", "").replace("*", "").isalnum(),
            f"{where}.name must be a snake_case name, got {self.name!r}.")
    require(len(self.image_keys) > 0, f"{where}.image_keys must name at least one camera, "
            f"e.g. {{'primary': 'image'}}.")
    require(len(self.action_keys) > 0, f"{where}.action_keys must name the action feature(s).")
    require(self.gripper in GRIPPER_ENCODINGS, f"{where}.gripper must be one of "
            f"{GRIPPER_ENCODINGS}, got {self.gripper!r}.")
    bad = [q for q in self.quirks if q not in QUIRKS]
    require(not bad, f"{where}.quirks {bad} unknown; known: {QUIRKS}.")
    require(isinstance(self.action_dim, int) and self.action_dim > 0,
            f"{where}.action_dim must be a positive integer, got {self.action_dim!r}.")
    if self.action_mask is None:
      # OpenVLA: every dimension but the gripper (last) is normalised.
      object.__setattr__(self, "action_mask", (True,) * (self.action_dim - 1) + (False,))
    object.__setattr__(self, "action_mask", tuple(bool(m) for m in self.action_mask))
    require(len(self.action_mask) == self.action_dim, f"{where}.action_mask has "
            f"{len(self.action_mask)} entries for action_dim={self.action_dim}.")

  @property
  def cameras(self) -> Dict[str, str]:
    """Camera role -> observation key."""
    return dict(self.image_keys)


_REGISTRY: Dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
  """Adds `spec` to the registry under `spec.name` (a trailing "*" makes it a prefix)."""
  if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] != spec:
    raise ConfigError(f"A dataset named {spec.name!r} is already registered; pass "
                      f"overwrite=True to replace it or pick another name.")
  _REGISTRY[spec.name] = spec
  return spec


def known_names() -> Tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get_spec(name: str) -> DatasetSpec:
  """The registered spec for `name`; "libero_*" entries match any "libero_..." name."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  for key, spec in _REGISTRY.items():
    if key.endswith("*") and name.startswith(key[:-1]):
      return dataclasses.replace(spec, name=name)
  raise ConfigError(
      f"Unknown dataset {name!r}. Known datasets: {', '.join(known_names())}. To use your own "
      f"RLDS dataset, register its keys first: vla_jax.data.oxe.register(DatasetSpec("
      f"name={name!r}, image_keys={{'primary': '<observation image key>'}}, "
      f"state_keys=('<state key>',), action_keys=('action',), gripper='absolute_open1')).")


def _builtin(**kwargs) -> None:
  register(DatasetSpec(**kwargs))


# Our benchmark's dataset (vla_jax/sim): gripper absolute in [0, 1], 1 = open.
_builtin(name="tabletop", image_keys={"primary": "image"}, state_keys=("state",),
         action_keys=("action",), state_dim=7, gripper="absolute_open1",
         description="vla_jax tabletop benchmark demonstrations (64x64 JPEG, 7-D actions)")
# BridgeData V2 from the project website (OpenVLA's bridge_orig): first step has an
# all-zero action; the gripper is binarised and movement relabelled from the state.
_builtin(name="bridge_dataset", image_keys={"primary": "image_0", "secondary": "image_1"},
         state_keys=("state",), action_keys=("action",), state_dim=7,
         gripper="absolute_open1", binarize_gripper=True,
         quirks=("drop_first_step", "relabel_from_state"),
         description="BridgeData V2 (WidowX), original release")
_builtin(name="bridge_oxe", image_keys={"primary": "image", "secondary": "image_1"},
         state_keys=("state",), language_key="observation/natural_language_instruction",
         action_keys=("action/world_vector", "action/rotation_delta", "action/open_gripper"),
         state_dim=7, gripper="absolute_open1",
         quirks=("drop_first_step", "relabel_from_state"),
         description="BridgeData V2 as shipped in the Open-X mixture")
_builtin(name="fractal20220817_data", image_keys={"primary": "image"},
         state_keys=("base_pose_tool_reached", "gripper_closed"),
         language_key="observation/natural_language_instruction",
         action_keys=("action/world_vector", "action/rotation_delta",
                      "action/gripper_closedness_action"),
         state_dim=8, gripper="relative", description="RT-1 robot data (Google)")
_builtin(name="kuka", image_keys={"primary": "image"},
         state_keys=("clip_function_input/base_pose_tool_reached", "gripper_closed"),
         language_key="observation/natural_language_instruction",
         action_keys=("action/world_vector", "action/rotation_delta",
                      "action/gripper_closedness_action"),
         state_dim=8, gripper="relative", quirks=("zlib_state",),
         description="QT-Opt KUKA grasping")
_builtin(name="taco_play", image_keys={"primary": "rgb_static", "wrist": "rgb_gripper"},
         state_keys=("robot_obs[0:6]", "robot_obs[7:8]"),
         language_key="observation/natural_language_instruction",
         action_keys=("action/rel_actions_world",), state_dim=7, gripper="absolute_open1",
         description="TACO play (Franka)")
_builtin(name="jaco_play", image_keys={"primary": "image", "wrist": "image_wrist"},
         state_keys=("end_effector_cartesian_pos[0:6]", "end_effector_cartesian_pos[6:7]"),
         language_key="observation/natural_language_instruction",
         action_keys=("action/world_vector", "action/gripper_closedness_action"),
         state_dim=7, gripper="relative", quirks=("pad_rotation",),
         description="Jaco play (no rotation actions: zeros are inserted)")
_builtin(name="berkeley_autolab_ur5", image_keys={"primary": "image", "wrist": "hand_image"},
         state_keys=("robot_state[6:14]",),
         language_key="observation/natural_language_instruction",
         action_keys=("action/world_vector", "action/rotation_delta",
                      "action/gripper_closedness_action"),
         state_dim=8, gripper="relative", description="Berkeley autolab UR5")
_builtin(name="language_table", image_keys={"primary": "rgb"},
         state_keys=("effector_translation",), language_key="observation/instruction",
         action_keys=("action",), action_dim=7, state_dim=2, gripper="none",
         quirks=("language_table_text",),
         description="Language Table (2-D pushing: actions padded to 7-D, gripper open)")
_builtin(name="droid", image_keys={"primary": "exterior_image_1_left",
                                   "secondary": "exterior_image_2_left",
                                   "wrist": "wrist_image_left"},
         state_keys=("cartesian_position", "gripper_position"),
         action_keys=("action_dict/cartesian_velocity", "action_dict/gripper_position"),
         state_dim=7, gripper="absolute_closed1", description="DROID (Franka)")
# LIBERO (OpenVLA's regenerated *_no_noops sets): gripper -1 open / +1 closed.
_builtin(name="libero_*", image_keys={"primary": "image", "wrist": "wrist_image"},
         state_keys=("state",), action_keys=("action",), state_dim=8,
         gripper="absolute_closed1", description="LIBERO suites (libero_spatial_no_noops, ...)")
