"""Tabletop environment: state, `reset`, `step`, `render`, and the action convention.

World: the table plane is [-0.22, 0.22]^2 metres (x right, y away from the camera, z up).
The end effector has a position xyz, a yaw and a gripper opening. Grasp: the gripper
closes (opening falls below 0.5) while the effector is within GRASP_RADIUS of an object
horizontally and below GRASP_HEIGHT; the grasped object then follows the effector.
Whether the gripper's yaw must match the object's is GRASP_NEEDS_YAW, off: at 64 px an
object is about 5 px wide and neither its yaw nor the fingers' is visible, so a grasp
that needs them asks the policy for something its camera cannot show (a policy that came
within the grasp radius in 11 of 16 episodes never turned and never grasped). With it on,
the yaw must match within GRASP_YAW_TOL modulo the object's grasp period
(`grasp_period`: a round object at any yaw, a square one every pi/2, an elongated one
every pi) and the expert turns by the smallest equivalent rotation. Opening the gripper
drops it on the table. Success: the target object (row 0) rests inside the target
receptacle, released, with the gripper open. An episode ends on success or after
`max_steps` steps; stepping a finished state leaves it unchanged.

Actions are 7-D in the Open-X / Bridge convention, float32:
  [dx, dy, dz] end-effector translation in metres, clipped to +-MAX_TRANSLATION;
  [droll, dpitch, dyaw] rotation in radians, clipped to +-MAX_ROTATION; only yaw acts
  (roll and pitch are accepted and ignored: the effector always points down);
  gripper: absolute opening in [0, 1], 1 = open, 0 = closed (as in BridgeData).
Observations: image uint8 [H, W, 3]; state float32 [7] = (x, y, z, roll=0, pitch=0, yaw,
gripper). Strings stay outside traced code: the state holds integer ids and
`instruction(split, state)` turns them into text.
"""

from typing import Any, Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import InputError
from vla_jax.sim import catalogue as cat
from vla_jax.sim import render as rnd

MAX_TRANSLATION = 0.03  # m per step
MAX_ROTATION = 0.25  # rad per step
ACTION_LOW = np.array([-MAX_TRANSLATION] * 3 + [-MAX_ROTATION] * 3 + [0.0], np.float32)
ACTION_HIGH = np.array([MAX_TRANSLATION] * 3 + [MAX_ROTATION] * 3 + [1.0], np.float32)
WORKSPACE_LOW = np.array([-0.21, -0.21, 0.0], np.float32)
WORKSPACE_HIGH = np.array([0.21, 0.21, 0.2], np.float32)
EE_START = np.array([0.0, -0.19, 0.1], np.float32)
GRASP_RADIUS = 0.012
GRASP_HEIGHT = 0.03
GRASP_NEEDS_YAW = False  # module docstring
GRASP_YAW_TOL = 0.3
HELD_DROP = 0.012  # a held object hangs this far below the effector
SUCCESS_MARGIN = 0.008  # the object centre must be this deep inside the receptacle
ARM_BASE = np.array([0.0, 0.34], np.float32)
ARM_HALF_WIDTH = 0.009  # m; the arm is a square sprite squeezed to this half width
MAX_STEPS = 80


class EnvState(NamedTuple):
  """One environment (add a leading batch axis with vmap). K objects, R receptacles.

  Row 0 of the objects is the target; `target_rec` indexes the receptacles.
  """
  t: jax.Array  # int32 []
  max_steps: jax.Array  # int32 []
  ee: jax.Array  # [3] effector position (m)
  ee_yaw: jax.Array  # []
  gripper: jax.Array  # [] opening, 1 = open
  obj_xy: jax.Array  # [K, 2]
  obj_z: jax.Array  # [K]
  obj_yaw: jax.Array  # [K]
  obj_id: jax.Array  # [K] int32 catalogue ids
  held: jax.Array  # int32 [] index of the held object, -1 = none
  rec_id: jax.Array  # [R] int32 receptacle ids (VL-Think: item ids of the boards)
  target_rec: jax.Array  # int32 []
  scenery: rnd.Sprites  # receptacles (rows 0..R-1) and any board symbols
  table_tex: jax.Array  # int32 []
  background_tex: jax.Array
  blend_tex: jax.Array
  object_blend: jax.Array  # f32 []
  whole_blend: jax.Array
  template: jax.Array  # int32 []
  change_step: jax.Array  # int32 [] (-1 = never)
  change_xy: jax.Array  # [2]
  done: jax.Array  # bool []
  success: jax.Array  # bool []


def grasp_period(shape: str) -> float:
  """Yaw period (rad) after which a shape offers the same grasp to a two-finger gripper.

  The gripper is symmetric under pi; an n-fold symmetric round-aspect shape under 2 pi / n.
  Together: 0 for a disc or ring (no yaw constraint), 2 pi / n for even n, pi / n for odd
  n, and pi for elongated or cut shapes.
  """
  aspect, n, _, _, _, _, cut_r, _ = cat.SHAPES[shape]
  if aspect != 1 or cut_r > 0:
    return float(np.pi)
  if n <= 1:
    return 0.0
  return float(2 * np.pi / n if n % 2 == 0 else np.pi / n)


def yaw_error(target_yaw, yaw, period):
  """Smallest rotation (rad) taking `yaw` to `target_yaw` modulo `period` (0 = any yaw).

  Ties (exactly half a period away) turn in the negative direction whatever the float
  rounding, so demonstrations of visually identical scenes agree.
  """
  bias = 1e-3
  safe = jnp.where(period > 0, period, 1.0)
  return jnp.where(period > 0, wrap_angle(target_yaw - yaw + bias, safe) - bias, 0.0)


def yaw_aligned(obj_yaw, ee_yaw, obj_id):
  """Whether a gripper at `ee_yaw` is turned to grasp the object (GRASP_NEEDS_YAW)."""
  return jnp.abs(yaw_error(obj_yaw, ee_yaw, grasp_periods(obj_id))) < GRASP_YAW_TOL


# Catalogue tables as constants.
def _things(things):
  return dict(
      grasp_period=np.array([grasp_period(t.shape) for t in things], np.float32),
      shape=np.array([cat.SHAPES[t.shape] for t in things], np.float32),
      colour=np.array([t.colour for t in things], np.float32),
      colour2=np.array([t.colour2 for t in things], np.float32),
      pattern=np.eye(len(cat.PATTERNS), dtype=np.float32)[
          [cat.PATTERNS.index(t.pattern) for t in things]],
      size=np.array([t.size for t in things], np.float32))


_OBJ = _things(cat.OBJECTS)


def grasp_periods(obj_id):
  """`grasp_period` of catalogue objects `obj_id` (any shape; traceable)."""
  return jnp.asarray(_OBJ["grasp_period"])[obj_id]
_REC = _things(cat.RECEPTACLES)


_FAMILIES = tuple(cat.VLTHINK)
_MAX_ITEMS = max(len(f.items) for f in cat.VLTHINK.values())
POOL = 32  # split pools are padded to this length so that splits share compiled code


def _symbol_tables():
  """Board colour and symbol primitives of every VL-Think item: [families, items, ...]."""
  f, n, m = len(_FAMILIES), _MAX_ITEMS, cat.SYMBOL_SLOTS
  table = dict(offset=np.zeros((f, n, m, 2), np.float32), size=np.ones((f, n, m), np.float32),
               yaw=np.zeros((f, n, m), np.float32), shape=np.zeros((f, n, m, 8), np.float32),
               colour=np.zeros((f, n, m, 3), np.float32), alpha=np.zeros((f, n, m), np.float32),
               board=np.zeros((f, n, 3), np.float32))
  table["shape"][...] = cat.SHAPES["circle"]
  for k, name in enumerate(_FAMILIES):
    family = cat.VLTHINK[name]
    table["board"][k, :len(family.items)] = family.boards
    for i, prims in enumerate(family.symbols):
      for j, (dx, dy, size, yaw, shape, colour) in enumerate(prims):
        table["offset"][k, i, j] = dx * cat.SYMBOL_SCALE, dy * cat.SYMBOL_SCALE
        table["size"][k, i, j], table["yaw"][k, i, j] = size * cat.SYMBOL_SCALE, yaw
        table["shape"][k, i, j], table["colour"][k, i, j] = cat.SHAPES[shape], colour
        table["alpha"][k, i, j] = 1.0
  return table


_SYMBOLS = _symbol_tables()


def _pool(values) -> np.ndarray:
  values = np.asarray(values, np.int32)
  return np.pad(values, (0, POOL - len(values)))


def split_arrays(split) -> dict:
  """The split's pools and switches as arrays (traced under jit, so splits that share a
  `layout` share one compiled program). Pools are padded to POOL; `*_count` says how
  many entries are real."""
  spec = cat.get_split(split)
  arrays = {}
  for name in ("objects", "receptacles", "templates", "tables", "backgrounds"):
    values = getattr(spec, name)
    arrays[name], arrays[name + "_count"] = _pool(values), np.int32(len(values))
  arrays.update(
      unseen_positions=np.bool_(spec.positions == "unseen"), ee_perturb=np.bool_(spec.ee_perturb),
      object_blend=np.float32(spec.object_blend), whole_blend=np.float32(spec.whole_blend),
      change_step=np.int32(spec.change_step),
      family=np.int32(_FAMILIES.index(spec.vlthink) if spec.vlthink else 0),
      family_count=np.int32(len(cat.VLTHINK[spec.vlthink].items) if spec.vlthink else 1))
  return arrays


def layout(split) -> tuple:
  """The static part of a split: (n_objects, n_receptacles, is_vlthink)."""
  spec = cat.get_split(split)
  return spec.n_objects, spec.n_receptacles, bool(spec.vlthink)


def _choice(key, options, count=None, shape=()):
  """Uniform draw from options[:count] (all options when count is None)."""
  options = jnp.asarray(options)
  count = len(options) if count is None else count
  return options[jax.random.randint(key, shape, 0, count)]


def _distinct(key, options, count, n: int):
  """`n` distinct draws from options[:count]."""
  options = jnp.asarray(options)
  weights = (jnp.arange(options.shape[0]) < count).astype(jnp.float32)
  return options[jax.random.choice(key, options.shape[0], (n,), replace=False,
                                   p=weights / weights.sum())]


def _stratified(key, box, count: int):
  """`count` points in box ((x0, x1), (y0, y1)), one per horizontal band (no overlaps)."""
  (x0, x1), (y0, y1) = box
  kx, ky = jax.random.split(key)
  x = jax.random.uniform(kx, (count,), minval=x0, maxval=x1)
  band = (y1 - y0) / count
  y = y0 + band * (jnp.arange(count) + jax.random.uniform(ky, (count,), minval=0.2,
                                                         maxval=0.8))
  return jnp.stack([x, y], -1)


def _receptacle_sprites(xy, rec_id) -> rnd.Sprites:
  g = lambda k: jnp.asarray(_REC[k])[rec_id]
  return rnd.make_sprites(xy, 0.0, 0.0, g("size"), g("shape"), g("colour"), g("colour2"),
                          g("pattern"))


def _board_sprites(family, xy, items) -> rnd.Sprites:
  """Three boards with their symbols: rows [R] boards then [R * SYMBOL_SLOTS] symbols."""
  table = {k: jnp.asarray(v)[family] for k, v in _SYMBOLS.items()}
  r = xy.shape[0]
  boards = rnd.make_sprites(xy, 0.0, 0.0, cat.BOARD_SIZE, cat.SHAPES["square"],
                            table["board"][items], jnp.array([0.3, 0.3, 0.3]),
                            jax.nn.one_hot(cat.PATTERNS.index("rimmed"), len(cat.PATTERNS)))
  flat = lambda a: a[items].reshape((r * cat.SYMBOL_SLOTS,) + a.shape[2:])
  sym_xy = (xy[:, None, :] + table["offset"][items]).reshape(-1, 2)
  symbols = rnd.make_sprites(sym_xy, 0.0, flat(table["yaw"]), flat(table["size"]),
                             flat(table["shape"]), flat(table["colour"]),
                             alpha=flat(table["alpha"]))
  return rnd.concat_sprites(boards, symbols)


def _vlthink_items(key, family, count):
  """Board items [3] (target first) for one VL-Think episode."""
  kt, kd = jax.random.split(key)
  target = jax.random.randint(kt, (), 0, count)
  others = _distinct(kd, jnp.arange(_MAX_ITEMS - 1), count - 1, 2)
  distinct_others = others + (others >= target)
  # parity: item i shows digit i + 1; the distractors show digits of the other parity.
  opposite = _distinct(kd, jnp.arange(_MAX_ITEMS // 2) * 2, count // 2, 2) + (target + 1) % 2
  is_parity = family == _FAMILIES.index("parity")
  return jnp.concatenate([target[None], jnp.where(is_parity, opposite, distinct_others)])


def reset(key: jax.Array, split, max_steps: int = MAX_STEPS) -> EnvState:
  """A fresh episode of `split` (a name or `SplitSpec`, static), determined by `key`.

  Jittable and vmappable over `key`; `split` and `max_steps` must be static.
  """
  return reset_from_arrays(key, split_arrays(split), layout(split), max_steps)


def reset_from_arrays(key, arrays, layout_, max_steps: int = MAX_STEPS) -> EnvState:
  """`reset` with the split given as `split_arrays` (traceable) and `layout` (static)."""
  n_obj, n_rec, vlthink = layout_
  a = {name: jnp.asarray(value) for name, value in arrays.items()}
  k = jax.random.split(key, 16)
  obj_id = _distinct(k[0], a["objects"], a["objects_count"], n_obj)
  grid = jnp.asarray(cat.object_grid())
  unseen = a["unseen_positions"]
  cells = _distinct(k[1], jnp.arange(len(grid)), len(grid), n_obj + 1)
  obj_xy = jnp.where(unseen, _stratified(k[2], cat.UNSEEN_OBJECT_BOX, n_obj),
                     grid[cells[:n_obj]])
  change_xy = grid[cells[n_obj]]
  if vlthink:
    obj_xy = jnp.stack([_choice(k[2], cat.VLTHINK_OBJECT_X, shape=(n_obj,)),
                        jnp.full((n_obj,), cat.VLTHINK_OBJECT_Y)], -1)
  # Unseen yaws lie half-way between the grid's, jittered.
  obj_yaw = _choice(k[3], cat.OBJECT_GRID_YAW, shape=(n_obj,)) + jnp.where(
      unseen, np.pi / 8 + jax.random.uniform(k[4], (n_obj,), minval=-0.1, maxval=0.1), 0.0)

  if vlthink:
    items = _vlthink_items(k[5], a["family"], a["family_count"])
    order = jax.random.permutation(k[6], 3)  # board slot of items[0], items[1], items[2]
    rec_id = jnp.zeros((3,), jnp.int32).at[order].set(items)
    rec_xy = jnp.stack([jnp.asarray(cat.VLTHINK_BOARD_X, jnp.float32),
                        jnp.full((3,), cat.VLTHINK_BOARD_Y, jnp.float32)], -1)
    target_rec = order[0]
    scenery = _board_sprites(a["family"], rec_xy, rec_id)
  else:
    rec_id = _distinct(k[5], a["receptacles"], a["receptacles_count"], n_rec)
    rows = _distinct(k[6], jnp.asarray(cat.RECEPTACLE_GRID_Y), 3, n_rec)
    grid_xy = jnp.stack([_choice(k[7], cat.RECEPTACLE_GRID_X, shape=(n_rec,)), rows], -1)
    rec_xy = jnp.where(unseen, _stratified(k[8], cat.UNSEEN_RECEPTACLE_BOX, n_rec), grid_xy)
    target_rec = jnp.int32(0)
    scenery = _receptacle_sprites(rec_xy, rec_id)

  offset = jax.random.uniform(k[9], (3,), minval=jnp.array([-0.1, -0.02, -0.06]),
                              maxval=jnp.array([0.1, 0.06, 0.06]))
  ee = jnp.asarray(EE_START) + jnp.where(a["ee_perturb"], offset, 0.0)
  ee_yaw = jnp.where(a["ee_perturb"], jax.random.uniform(k[10], (), minval=-0.8, maxval=0.8),
                     0.0)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  return EnvState(
      t=i32(0), max_steps=i32(max_steps), ee=f32(ee), ee_yaw=f32(ee_yaw), gripper=f32(1.0),
      obj_xy=f32(obj_xy), obj_z=jnp.zeros((n_obj,), jnp.float32), obj_yaw=f32(obj_yaw),
      obj_id=i32(obj_id), held=i32(-1), rec_id=i32(rec_id), target_rec=i32(target_rec),
      scenery=scenery, table_tex=i32(_choice(k[11], a["tables"], a["tables_count"])),
      background_tex=i32(_choice(k[12], a["backgrounds"], a["backgrounds_count"])),
      blend_tex=i32(_choice(k[13], cat.BLEND_TEXTURES)), object_blend=f32(a["object_blend"]),
      whole_blend=f32(a["whole_blend"]),
      template=i32(_choice(k[14], a["templates"], a["templates_count"])),
      change_step=i32(a["change_step"]), change_xy=f32(change_xy),
      done=jnp.bool_(False), success=jnp.bool_(False))


def wrap_angle(a, period=2 * np.pi):
  """Maps angles to [-period/2, period/2)."""
  return jnp.mod(a + period / 2, period) - period / 2


def target_receptacle(state: EnvState):
  """(xy [2], sprite row) of the target receptacle."""
  row = jax.tree.map(lambda x: x[state.target_rec], state.scenery)
  return row.xy, row


def _on_target(state: EnvState, obj_xy):
  _, row = target_receptacle(state)
  dist, _ = rnd.shape_sdf(obj_xy, row.xy, row.yaw, row.size, row.shape)
  return dist < -SUCCESS_MARGIN


def advance(state: EnvState, action) -> Tuple[EnvState, jax.Array]:
  """Physics of one step, nothing rendered; returns (new state, reward).

  A finished episode (`state.done`) is returned unchanged, its step counter included.
  """
  a = jnp.clip(jnp.asarray(action, jnp.float32), ACTION_LOW, ACTION_HIGH)
  ee = jnp.clip(state.ee + a[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
  ee_yaw = wrap_angle(state.ee_yaw + a[5])
  gripper = a[6]
  closing = (state.gripper >= 0.5) & (gripper < 0.5)
  opening = (state.gripper < 0.5) & (gripper >= 0.5)

  reach = jnp.linalg.norm(state.obj_xy - ee[:2], axis=-1)
  graspable = (reach < GRASP_RADIUS) & (ee[2] < GRASP_HEIGHT)
  if GRASP_NEEDS_YAW:
    graspable &= yaw_aligned(state.obj_yaw, ee_yaw, state.obj_id)
  nearest = jnp.argmin(jnp.where(graspable, reach, jnp.inf)).astype(jnp.int32)
  held = jnp.where(closing & graspable.any() & (state.held < 0), nearest, state.held)
  held = jnp.where(opening, -1, held)

  rows = jnp.arange(state.obj_xy.shape[0])
  carried = rows == held
  obj_xy = jnp.where(carried[:, None], ee[:2], state.obj_xy)
  obj_z = jnp.where(carried, jnp.maximum(ee[2] - HELD_DROP, 0.0), 0.0)
  obj_yaw = jnp.where(carried, state.obj_yaw + (ee_yaw - state.ee_yaw), state.obj_yaw)
  t = state.t + 1
  jump = (t == state.change_step) & (held != 0)
  obj_xy = obj_xy.at[0].set(jnp.where(jump, state.change_xy, obj_xy[0]))

  success = _on_target(state, obj_xy[0]) & (held != 0) & (gripper >= 0.5)
  done = success | (t >= state.max_steps)
  new = state._replace(t=t, ee=ee, ee_yaw=ee_yaw, gripper=gripper, obj_xy=obj_xy,
                       obj_z=obj_z, obj_yaw=obj_yaw, held=held, done=done, success=success)
  new = jax.tree.map(lambda n, o: jnp.where(state.done, o, n), new, state)
  reward = (success & ~state.done).astype(jnp.float32)
  return new, reward


def proprio(state: EnvState) -> jax.Array:
  """State vector float32 [7]: x, y, z, roll (0), pitch (0), yaw, gripper."""
  zero = jnp.zeros((), jnp.float32)
  return jnp.stack([state.ee[0], state.ee[1], state.ee[2], zero, zero, state.ee_yaw,
                    state.gripper]).astype(jnp.float32)


def _effector_sprites(state: EnvState) -> Tuple[rnd.Sprites, rnd.Sprites]:
  """(shadow, [arm, two fingers, wrist]) of the end effector."""
  ee, yaw = state.ee, state.ee_yaw
  shadow = rnd.make_sprites(ee[None, :2], 0.0, 0.0, 0.016, cat.SHAPES["circle"],
                            jnp.zeros(3), alpha=0.35)
  base = jnp.asarray(ARM_BASE)
  delta = ee[:2] - base
  half = jnp.maximum(jnp.linalg.norm(delta) / 2, 1e-3)
  arm_shape = jnp.array(cat.SHAPES["square"]).at[0].set(ARM_HALF_WIDTH / half)
  arm = rnd.make_sprites(((ee[:2] + base) / 2)[None], ee[2] + 0.01,
                         jnp.arctan2(delta[1], delta[0]), half / np.cos(np.pi / 4),
                         arm_shape, jnp.array([0.35, 0.36, 0.4]))
  gap = 0.012 + 0.02 * state.gripper
  side = jnp.stack([-jnp.sin(yaw), jnp.cos(yaw)])
  finger_xy = ee[:2] + jnp.array([[1.0], [-1.0]]) * gap * side
  finger_shape = jnp.array(cat.SHAPES["square"]).at[0].set(0.35)
  fingers = rnd.make_sprites(finger_xy, ee[2], yaw, 0.018, finger_shape,
                             jnp.array([0.12, 0.12, 0.14]))
  wrist = rnd.make_sprites(ee[None, :2], ee[2] + 0.012, yaw, 0.009, cat.SHAPES["square"],
                           jnp.array([0.9, 0.45, 0.1]))
  return shadow, rnd.concat_sprites(arm, fingers, wrist)


def _object_sprites(state: EnvState) -> rnd.Sprites:
  g = lambda k: jnp.asarray(_OBJ[k])[state.obj_id]
  blend = jnp.zeros(state.obj_id.shape).at[0].set(state.object_blend)
  return rnd.make_sprites(state.obj_xy, state.obj_z, state.obj_yaw, g("size"), g("shape"),
                          g("colour"), g("colour2"), g("pattern"), blend)


def _max_reach(sizes, shapes, image_size: int) -> float:
  """Largest `render.sprite_reach` over catalogue rows (sizes [N], shape parameters [N, 8])."""
  return max(rnd.sprite_reach(float(size), float(shape[0]), image_size)
             for size, shape in zip(sizes, shapes))


def _row_reach(state: EnvState, image_size: int) -> tuple:
  """Static `render.sprite_reach` of each row `render` draws (None: the arm, any length).

  Rows: scenery (receptacles, or VL-Think's 3 boards then their symbol slots), the
  shadow, the objects, then arm, two fingers, wrist (`_effector_sprites`).
  """
  boards = 3
  if state.scenery.xy.shape[0] == boards * (1 + cat.SYMBOL_SLOTS):
    real = _SYMBOLS["alpha"] > 0  # empty slots have alpha 0 and draw nothing anywhere
    scenery = ((rnd.sprite_reach(cat.BOARD_SIZE, 1.0, image_size),) * boards
               + (_max_reach(_SYMBOLS["size"][real], _SYMBOLS["shape"][real], image_size),)
               * (boards * cat.SYMBOL_SLOTS))
  else:
    scenery = (_max_reach(_REC["size"], _REC["shape"], image_size),) * state.scenery.xy.shape[0]
  objects = (_max_reach(_OBJ["size"], _OBJ["shape"], image_size),) * state.obj_xy.shape[0]
  return (scenery + (rnd.sprite_reach(0.016, 1.0, image_size),) + objects
          + (None,) + (rnd.sprite_reach(0.018, 0.35, image_size),) * 2
          + (rnd.sprite_reach(0.009, 1.0, image_size),))


def _arm_strip() -> tuple:
  """`render.render_scene` strip hint of the arm: (half width (m), least |sin yaw|).

  The arm is the square `_effector_sprites` stretches from ARM_BASE to the effector; a
  square's `shape_sdf` distance is at least its distance across the long edges, so the
  arm is opaque only within ARM_HALF_WIDTH (+ half a pixel of edge) of its axis. The
  effector stays in the workspace, so the axis is never closer to horizontal than from
  ARM_BASE to a far workspace corner.
  """
  dy = ARM_BASE[1] - WORKSPACE_HIGH[1]
  dx = max(abs(WORKSPACE_LOW[0] - ARM_BASE[0]), abs(WORKSPACE_HIGH[0] - ARM_BASE[0]))
  return ARM_HALF_WIDTH, 0.99 * float(dy / np.hypot(dx, dy))


def _row_hints(state: EnvState, image_size: int) -> dict:
  """Static per-row hints for `render.render_scene` (reach, plain, strip)."""
  reach = _row_reach(state, image_size)
  # Solid, unblended rows: board symbols (VL-Think), shadow, arm, fingers, wrist.
  n_scenery, n_obj = state.scenery.xy.shape[0], state.obj_xy.shape[0]
  vlthink = n_scenery == 3 * (1 + cat.SYMBOL_SLOTS)
  plain = (tuple(vlthink and i >= 3 for i in range(n_scenery)) + (True,)
           + (False,) * n_obj + (True,) * 4)
  strip = tuple(_arm_strip() if r is None else None for r in reach)  # the arm's row
  return dict(reach=reach, plain=plain, strip=strip)


def _scene(state: EnvState):
  shadow, effector = _effector_sprites(state)
  sprites = rnd.concat_sprites(state.scenery, shadow, _object_sprites(state), effector)
  return sprites, state.table_tex, state.background_tex, state.blend_tex, state.whole_blend


def render(state: EnvState, image_size: int = 64) -> jax.Array:
  """The camera image uint8 [image_size, image_size, 3] (image_size static)."""
  return rnd.render_scene(*_scene(state), image_size, **_row_hints(state, image_size))


def render_v1(state: EnvState, image_size: int = 64) -> jax.Array:
  """`render` by the previous fast path `render.render_scene_v1`: the same image, kept for
  benchmarks/sim_speed.py."""
  hints = _row_hints(state, image_size)
  return rnd.render_scene_v1(*_scene(state), image_size, reach=hints["reach"],
                             plain=hints["plain"])


def render_reference(state: EnvState, image_size: int = 64) -> jax.Array:
  """`render` by `render.render_reference` (every row at every pixel): the same image."""
  return rnd.render_reference(*_scene(state), image_size)


def observe(state: EnvState, image_size: int = 64) -> Dict[str, jax.Array]:
  """{"image": uint8 [S, S, 3], "state": float32 [7]}."""
  return {"image": render(state, image_size), "state": proprio(state)}


def step(state: EnvState, action, image_size: int = 64):
  """One environment step (jittable, vmappable; no input checks: see `check_action`).

  Args:
    state: current state.
    action: float32 [7] (module docstring: bounds and convention).
    image_size: side of the rendered image (static).
  Returns:
    (state, obs, reward [], done [], info) where obs = `observe(state)` after the step
    and info = {"success": bool [], "held": int32 [], "t": int32 []}.
  """
  new, reward = advance(state, action)
  info = {"success": new.success, "held": new.held, "t": new.t}
  return new, observe(new, image_size), reward, new.done, info


def check_action(action, batch: int | None = None) -> np.ndarray:
  """Validates actions at the Python boundary; returns them as float32 numpy.

  Args:
    action: [7] or, with `batch`, [batch, 7].
  Raises:
    InputError: wrong shape, or NaN / inf values.
  """
  array = np.asarray(action)
  expected = (7,) if batch is None else (batch, 7)
  if array.shape != expected:
    raise InputError(f"Tabletop actions must have shape {expected} (xyz delta, rpy delta, "
                     f"gripper), got {array.shape}. Return one 7-D action per environment.")
  if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
    raise InputError("Tabletop actions must be finite numbers; found NaN or inf. Check the "
                     "policy output (and the action de-normalisation statistics).")
  return array.astype(np.float32)


def check_action_chunk(actions, batch: int) -> np.ndarray:
  """A policy's output for `batch` environments as float32 [K, batch, 7] (time first).

  Accepts one action per environment [batch, 7] (K = 1) or a chunk [batch, K, 7] that is
  executed open loop; raises InputError (`check_action`'s) for anything else.
  """
  array = np.asarray(actions)
  if array.ndim == 3 and array.shape[0] == batch and array.shape[1] >= 1:
    return np.stack([check_action(array[:, k], batch) for k in range(array.shape[1])])
  if array.ndim == 3:
    raise InputError(f"A chunk of tabletop actions must have shape ({batch}, K, 7) with K >= 1 "
                     f"(one chunk per environment), got {array.shape}.")
  return check_action(array, batch)[None]


# ------------------------------------------------------------------------------- text ----
def receptacle_name(spec: cat.SplitSpec, rec_id: int) -> str:
  """The target's name: a receptacle's, or the VL-Think phrase for a board item id."""
  if spec.vlthink:
    family = cat.VLTHINK[spec.vlthink]
    item = family.items[rec_id]
    if spec.vlthink == "parity":
      item = "odd" if int(item) % 2 else "even"
    return family.phrase.format(item=item)
  return cat.RECEPTACLES[rec_id].name


def _names(spec: cat.SplitSpec, obj_id: int, rec_id: int) -> Tuple[str, str]:
  return cat.OBJECTS[obj_id].name, receptacle_name(spec, rec_id)


def instruction(split, state: Any) -> str:
  """The instruction text of one (unbatched) state."""
  spec = cat.get_split(split)
  obj, target = _names(spec, int(state.obj_id[0]),
                       int(np.asarray(state.rec_id)[int(state.target_rec)]))
  if spec.vlthink:
    return f"put the {obj} on {target}"
  return cat.TEMPLATES[int(state.template)].format(object=obj, receptacle=target)


def instructions(split, states: EnvState) -> List[str]:
  """Instruction texts of a batch of states (leading axis B)."""
  host = jax.device_get(states)
  return [instruction(split, jax.tree.map(lambda x: x[i], host))
          for i in range(host.t.shape[0])]


def episode_names(split, state: Any) -> Tuple[str, str]:
  """(object name, receptacle name or VL-Think target phrase) of one state."""
  spec = cat.get_split(split)
  return _names(spec, int(state.obj_id[0]), int(np.asarray(state.rec_id)[int(state.target_rec)]))
