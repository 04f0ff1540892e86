"""Named, procedurally drawn content of the tabletop benchmark and its splits.

Everything a scene can show is an entry of a catalogue table built here once, in numpy:
shapes (parameters of one generic signed-distance shape), colours, patterns, objects
(shape x colour x pattern with a human name), receptacles, textures (tables,
backgrounds and the unseen blend textures share one parametric family), instruction
templates, and the VL-Think symbol library. A `SplitSpec` (frozen, hashable, so jit can
treat it as static) says which entries a split samples from; `get_split(name)` returns
the training split, every OOD split of the paper and the VL-Think environments.
"""

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

from vla_jax.errors import ConfigError

# ----------------------------------------------------------------------------------------
# Shapes: one generic shape (see render.shape_sdf). Parameters, in order:
# aspect (local y scale), n (polygon sides / star points), is_poly (1: straight edges),
# star (indent depth 0..1), hole (inner radius, 0 = none), cut_dx, cut_r (a disc cut out at
# (cut_dx, 0), 0 = none), phase (rotation of the polygon's vertices).
SHAPE_PARAMS = ("aspect", "n", "is_poly", "star", "hole", "cut_dx", "cut_r", "phase")
_PI = np.pi
SHAPES: Dict[str, Tuple[float, ...]] = {
    "circle": (1, 1, 0, 0, 0, 0, 0, 0),
    "square": (1, 4, 1, 0, 0, 0, 0, _PI / 4),
    "triangle": (1, 3, 1, 0, 0, 0, 0, _PI / 2),
    "hexagon": (1, 6, 1, 0, 0, 0, 0, 0),
    "pentagon": (1, 5, 1, 0, 0, 0, 0, _PI / 2),
    "octagon": (1, 8, 1, 0, 0, 0, 0, _PI / 8),
    "star": (1, 5, 0, 0.55, 0, 0, 0, _PI / 2),
    "ring": (1, 1, 0, 0, 0.5, 0, 0, 0),
    "crescent": (1, 1, 0, 0, 0, 0.45, 0.85, 0),
    "cross": (1, 4, 0, 0.7, 0, 0, 0, 0),
    "diamond": (0.7, 4, 1, 0, 0, 0, 0, 0),
    "rectangle": (0.55, 4, 1, 0, 0, 0, 0, _PI / 4),
    "ellipse": (0.6, 1, 0, 0, 0, 0, 0, 0),
    "bar": (0.3, 4, 1, 0, 0, 0, 0, _PI / 4),
    "carrot": (0.38, 3, 1, 0, 0, 0, 0, 0),
    "flower": (1, 6, 0, 0.3, 0, 0, 0, 0),
    "sunburst": (1, 10, 0, 0.35, 0, 0, 0, 0),
    "snowflake": (1, 6, 0, 0.8, 0, 0, 0, 0),
    "triangle_head": (1, 3, 1, 0, 0, 0, 0, 0),  # an arrow head, pointing along +x
}
SHAPE_NAMES = tuple(SHAPES)

COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12), "green": (0.15, 0.68, 0.2), "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.2, 0.75), "orange": (0.98, 0.5, 0.05),
    "cyan": (0.1, 0.8, 0.85), "pink": (0.98, 0.55, 0.75), "brown": (0.5, 0.3, 0.12),
    "white": (0.96, 0.96, 0.94), "black": (0.08, 0.08, 0.1), "grey": (0.55, 0.55, 0.58),
    "magenta": (0.9, 0.1, 0.7), "lime": (0.65, 0.95, 0.2),
}

# Patterns mix a sprite's two colours; index into the one-hot used by render.
PATTERNS = ("solid", "striped", "dotted", "checkered", "rimmed")


@dataclasses.dataclass(frozen=True)
class Thing:
  """One drawable catalogue entry (an object or a receptacle)."""
  name: str
  shape: str
  colour: Tuple[float, float, float]
  colour2: Tuple[float, float, float]
  pattern: str
  size: float  # circumradius in metres


def _lighter(rgb, amount=0.45):
  return tuple(float(c + (1 - c) * amount) for c in rgb)


def _darker(rgb, amount=0.45):
  return tuple(float(c * (1 - amount)) for c in rgb)


OBJECT_SIZE = 0.028

# Training objects: 4 shapes x 4 colours, patterns in a latin square (every shape shows
# every pattern once).
_TRAIN_SHAPES = (("square", "cube"), ("circle", "ball"), ("triangle", "pyramid"),
                 ("hexagon", "nut"))
_TRAIN_COLOURS = ("red", "green", "blue", "yellow")
_TRAIN_PATTERNS = ("solid", "striped", "dotted", "checkered")


def _train_objects() -> List[Thing]:
  things = []
  for i, (shape, noun) in enumerate(_TRAIN_SHAPES):
    for j, colour in enumerate(_TRAIN_COLOURS):
      pattern = _TRAIN_PATTERNS[(i + j) % 4]
      words = [colour] + ([] if pattern == "solid" else [pattern]) + [noun]
      rgb = COLOURS[colour]
      things.append(Thing(" ".join(words), shape, rgb, _lighter(rgb, 0.6), pattern,
                          OBJECT_SIZE))
  return things


# Unseen objects use shapes (and mostly colours) no training object has.
_UNSEEN_OBJECTS = (
    ("carrot", "carrot", "orange", "solid"), ("purple star", "star", "purple", "solid"),
    ("pink dotted donut", "ring", "pink", "dotted"), ("cyan moon", "crescent", "cyan", "solid"),
    ("brown egg", "ellipse", "brown", "solid"), ("orange cross", "cross", "orange", "solid"),
    ("white striped bar", "rectangle", "white", "striped"),
    ("magenta diamond", "diamond", "magenta", "solid"),
    ("lime flower", "flower", "lime", "solid"),
)


def _unseen_objects() -> List[Thing]:
  return [Thing(name, shape, COLOURS[c], _darker(COLOURS[c], 0.5), p,
                OBJECT_SIZE * (1.25 if shape in ("carrot", "rectangle") else 1.0))
          for name, shape, c, p in _UNSEEN_OBJECTS]


OBJECTS: Tuple[Thing, ...] = tuple(_train_objects() + _unseen_objects())
TRAIN_OBJECTS = tuple(range(16))
UNSEEN_OBJECTS = tuple(range(16, len(OBJECTS)))

RECEPTACLE_SIZE = 0.056
# (name, shape, colour, rim colour, pattern)
_RECEPTACLES = (
    ("plate", "circle", (0.97, 0.97, 0.95), (0.7, 0.7, 0.72), "rimmed"),
    # unseen receptacles
    ("blue plate", "circle", (0.55, 0.7, 0.95), (0.2, 0.35, 0.75), "rimmed"),
    ("square plate", "square", (0.97, 0.97, 0.95), (0.6, 0.6, 0.62), "rimmed"),
    ("bowl", "circle", (0.35, 0.22, 0.12), (0.75, 0.55, 0.35), "rimmed"),
    ("green bowl", "circle", (0.1, 0.4, 0.15), (0.4, 0.8, 0.45), "rimmed"),
    ("wooden board", "rectangle", (0.72, 0.5, 0.28), (0.55, 0.36, 0.18), "striped"),
    ("cutting board", "square", (0.9, 0.82, 0.62), (0.7, 0.6, 0.4), "rimmed"),
    ("tray", "rectangle", (0.6, 0.62, 0.66), (0.3, 0.32, 0.36), "rimmed"),
    ("red tray", "rectangle", (0.85, 0.3, 0.3), (0.55, 0.1, 0.1), "rimmed"),
    ("hexagonal mat", "hexagon", (0.3, 0.6, 0.6), (0.15, 0.4, 0.4), "solid"),
    ("black plate", "circle", (0.15, 0.15, 0.17), (0.4, 0.4, 0.45), "rimmed"),
    ("yellow dish", "octagon", (0.98, 0.9, 0.45), (0.8, 0.65, 0.1), "rimmed"),
    ("pink plate", "circle", (0.98, 0.75, 0.85), (0.85, 0.45, 0.6), "dotted"),
    ("octagonal mat", "octagon", (0.45, 0.35, 0.6), (0.3, 0.2, 0.45), "solid"),
    ("oval platter", "ellipse", (0.95, 0.93, 0.85), (0.7, 0.6, 0.4), "rimmed"),
    ("checkered cloth", "square", (0.95, 0.95, 0.95), (0.8, 0.15, 0.15), "checkered"),
    ("flower plate", "flower", (0.8, 0.9, 1.0), (0.3, 0.45, 0.8), "rimmed"),
)
RECEPTACLES: Tuple[Thing, ...] = tuple(
    Thing(n, s, tuple(map(float, c)), tuple(map(float, c2)), p,
          RECEPTACLE_SIZE * (1.25 if s in ("rectangle", "ellipse") else 1.0))
    for n, s, c, c2, p in _RECEPTACLES)
TRAIN_RECEPTACLES = (0,)
UNSEEN_RECEPTACLES = tuple(range(1, len(RECEPTACLES)))

# ----------------------------------------------------------------------------------------
# Textures: colour c1/c2 mixed by a procedural family at a frequency and angle
# (see render.texture). Rainbow ignores the colours.
TEXTURE_FAMILIES = ("mottled", "wood", "checker", "stripes", "dots", "marble", "tiles",
                    "rainbow", "gradient")


@dataclasses.dataclass(frozen=True)
class Texture:
  name: str
  family: str
  colour: Tuple[float, float, float]
  colour2: Tuple[float, float, float]
  freq: float
  angle: float = 0.0


def _t(name, family, c1, c2, freq, angle=0.0):
  return Texture(name, family, tuple(map(float, c1)), tuple(map(float, c2)), float(freq),
                 float(angle))


_TRAIN_TABLES = (
    _t("oak", "wood", (0.62, 0.45, 0.28), (0.5, 0.34, 0.2), 60),
    _t("pine", "wood", (0.85, 0.7, 0.5), (0.75, 0.58, 0.38), 45, 0.3),
    _t("walnut", "wood", (0.4, 0.26, 0.16), (0.3, 0.19, 0.1), 70, -0.2),
    _t("birch", "wood", (0.9, 0.82, 0.68), (0.82, 0.72, 0.56), 55, 1.57),
    _t("grey felt", "mottled", (0.5, 0.52, 0.55), (0.44, 0.46, 0.5), 40),
    _t("green felt", "mottled", (0.2, 0.45, 0.3), (0.16, 0.38, 0.25), 40),
    _t("steel", "stripes", (0.7, 0.72, 0.75), (0.64, 0.66, 0.7), 150, 0.78),
    _t("beige tiles", "tiles", (0.82, 0.78, 0.7), (0.55, 0.52, 0.48), 60),
    _t("white tiles", "tiles", (0.9, 0.9, 0.92), (0.6, 0.62, 0.66), 90),
    _t("grey marble", "marble", (0.78, 0.78, 0.8), (0.6, 0.6, 0.64), 30),
    _t("sand marble", "marble", (0.85, 0.78, 0.62), (0.7, 0.62, 0.48), 25, 0.5),
    _t("blue cloth", "checker", (0.55, 0.65, 0.8), (0.48, 0.57, 0.72), 80),
    _t("brown cloth", "checker", (0.55, 0.42, 0.32), (0.48, 0.36, 0.27), 70, 0.4),
    _t("cork", "dots", (0.72, 0.58, 0.4), (0.62, 0.48, 0.32), 120),
    _t("slate", "mottled", (0.3, 0.32, 0.35), (0.24, 0.26, 0.3), 60),
    _t("laminate", "stripes", (0.76, 0.68, 0.58), (0.7, 0.62, 0.52), 40, 1.57),
)
_TRAIN_BACKGROUNDS = (
    _t("cream wall", "gradient", (0.9, 0.88, 0.8), (0.7, 0.68, 0.62), 1),
    _t("grey wall", "gradient", (0.7, 0.72, 0.75), (0.5, 0.52, 0.55), 1),
    _t("brick wall", "tiles", (0.65, 0.3, 0.22), (0.85, 0.8, 0.75), 14),
    _t("lab shelves", "stripes", (0.35, 0.35, 0.38), (0.8, 0.8, 0.82), 20, 1.57),
)
# Unseen tables / backgrounds (vision_img) and blend textures (tex*, whole*).
_UNSEEN_TABLES = (
    _t("red carpet", "mottled", (0.6, 0.1, 0.12), (0.45, 0.05, 0.08), 50),
    _t("blue tiles", "tiles", (0.2, 0.35, 0.7), (0.9, 0.9, 0.95), 45),
    _t("black granite", "marble", (0.12, 0.12, 0.14), (0.35, 0.35, 0.38), 45),
    _t("yellow checker", "checker", (0.95, 0.85, 0.2), (0.3, 0.25, 0.1), 40),
    _t("mint stripes", "stripes", (0.6, 0.9, 0.75), (0.95, 0.95, 0.95), 35, 0.78),
)
_UNSEEN_BACKGROUNDS = (
    _t("forest", "marble", (0.1, 0.35, 0.12), (0.35, 0.6, 0.2), 12),
    _t("night sky", "dots", (0.05, 0.05, 0.2), (0.9, 0.9, 0.7), 40),
    _t("kitchen", "tiles", (0.95, 0.95, 0.98), (0.3, 0.5, 0.8), 25),
    _t("sunset", "gradient", (0.98, 0.55, 0.2), (0.5, 0.15, 0.4), 1),
    _t("curtain", "stripes", (0.6, 0.1, 0.35), (0.35, 0.05, 0.2), 30),
)
_BLEND_TEXTURES = (
    _t("rainbow", "rainbow", (0, 0, 0), (0, 0, 0), 25, 0.6),
    _t("zebra", "stripes", (0.02, 0.02, 0.02), (0.98, 0.98, 0.98), 120, 0.4),
    _t("leopard", "dots", (0.9, 0.7, 0.3), (0.15, 0.1, 0.05), 90),
    _t("camouflage", "marble", (0.3, 0.4, 0.15), (0.55, 0.45, 0.25), 35),
    _t("magenta checker", "checker", (0.95, 0.1, 0.8), (0.1, 0.95, 0.3), 70),
)
TEXTURES: Tuple[Texture, ...] = (_TRAIN_TABLES + _TRAIN_BACKGROUNDS + _UNSEEN_TABLES +
                                 _UNSEEN_BACKGROUNDS + _BLEND_TEXTURES)


def _span(start, items):
  return tuple(range(start, start + len(items)))


TRAIN_TABLES = _span(0, _TRAIN_TABLES)
TRAIN_BACKGROUNDS = _span(TRAIN_TABLES[-1] + 1, _TRAIN_BACKGROUNDS)
UNSEEN_TABLES = _span(TRAIN_BACKGROUNDS[-1] + 1, _UNSEEN_TABLES)
UNSEEN_BACKGROUNDS = _span(UNSEEN_TABLES[-1] + 1, _UNSEEN_BACKGROUNDS)
BLEND_TEXTURES = _span(UNSEEN_BACKGROUNDS[-1] + 1, _BLEND_TEXTURES)

# ----------------------------------------------------------------------------------------
# Instructions. Template 0 is the only training template.
TEMPLATES = (
    "put the {object} on the {receptacle}",
    # paraphrases (instruct split)
    "place the {object} onto the {receptacle}",
    "move the {object} to the {receptacle}",
    "pick up the {object} and put it on the {receptacle}",
    "set the {object} down on the {receptacle}",
    "could you put the {object} on the {receptacle}",
    "the {object} goes on the {receptacle}",
    "transfer the {object} onto the {receptacle}",
    "grab the {object} and drop it on the {receptacle}",
    "lay the {object} on the {receptacle}",
    "get the {object} onto the {receptacle}",
    "relocate the {object} to the {receptacle}",
    "i want the {object} on the {receptacle}",
    "deposit the {object} on the {receptacle}",
    "carry the {object} over to the {receptacle}",
    "position the {object} on top of the {receptacle}",
    "take the {object} and leave it on the {receptacle}",
)
TRAIN_TEMPLATES = (0,)
UNSEEN_TEMPLATES = tuple(range(1, len(TEMPLATES)))

# ----------------------------------------------------------------------------------------
# VL-Think: three boards; the instruction names the target board by a concept. Every
# item is a board colour plus up to SYMBOL_SLOTS primitives (offset x, offset y, size,
# yaw, shape, colour) drawn on the board, in the board's frame (metres).
SYMBOL_SLOTS = 7
BOARD_SIZE = 0.07
SYMBOL_SCALE = 1.35  # symbols below are drawn for a board of size 0.05
_INK = (0.08, 0.08, 0.12)
_BOARD = (0.93, 0.93, 0.9)
Primitive = Tuple[float, float, float, float, str, Tuple[float, float, float]]


def _digit(d: int) -> List[Primitive]:
  """A seven-segment digit of bars."""
  segments = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd",
              6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}[d]
  h, w, length = 0.022, 0.012, 0.013
  where = {"a": (0, h, 0), "g": (0, 0, 0), "d": (0, -h, 0), "b": (w, h / 2, _PI / 2),
           "c": (w, -h / 2, _PI / 2), "f": (-w, h / 2, _PI / 2), "e": (-w, -h / 2, _PI / 2)}
  return [(where[s][0], where[s][1], length, where[s][2], "bar", _INK) for s in segments]


def _arrow(angle: float) -> List[Primitive]:
  c, s = np.cos(angle), np.sin(angle)
  return [(-0.008 * c, -0.008 * s, 0.022, angle, "bar", _INK),
          (0.016 * c, 0.016 * s, 0.018, angle, "triangle_head", _INK)]


_RED, _WHITE, _YEL, _BLU = (0.85, 0.1, 0.1), (0.98, 0.98, 0.98), (0.98, 0.8, 0.1), (0.15, 0.3, 0.8)
_SHAPE_ITEMS = ("circle", "square", "triangle", "star", "hexagon", "pentagon", "diamond",
                "cross", "crescent", "ring", "octagon", "rectangle", "ellipse")
_COLOUR_ITEMS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SIGNS = {
    "stop": [(0, 0, 0.034, 0, "octagon", _RED), (0, 0, 0.02, 0, "bar", _WHITE)],
    "yield": [(0, 0, 0.036, _PI, "triangle", _RED), (0, 0.004, 0.018, _PI, "triangle", _WHITE)],
    "no entry": [(0, 0, 0.034, 0, "circle", _RED), (0, 0, 0.022, 0, "bar", _WHITE)],
    "warning": [(0, 0, 0.036, 0, "diamond", _YEL), (0, 0.004, 0.014, _PI / 2, "bar", _INK),
                (0, -0.014, 0.004, 0, "circle", _INK)],
    "hospital": [(0, 0, 0.034, 0, "square", _BLU), (0, 0, 0.02, 0, "bar", _WHITE),
                 (0, 0, 0.02, _PI / 2, "bar", _WHITE)],
}
_WEATHER = {
    "sun": [(0, 0, 0.034, 0, "sunburst", (0.98, 0.7, 0.1)), (0, 0, 0.018, 0, "circle", _YEL)],
    "moon": [(0, 0, 0.03, 0.4, "crescent", (0.85, 0.75, 0.2))],
    "cloud": [(-0.014, -0.004, 0.014, 0, "circle", (0.45, 0.5, 0.6)),
              (0.0, 0.006, 0.017, 0, "circle", (0.45, 0.5, 0.6)),
              (0.015, -0.004, 0.013, 0, "circle", (0.45, 0.5, 0.6))],
    "snow": [(0, 0, 0.034, 0, "snowflake", (0.3, 0.6, 0.95))],
    "rain": [(-0.01, 0.01, 0.014, 0, "circle", (0.4, 0.45, 0.55)),
             (0.008, 0.012, 0.016, 0, "circle", (0.4, 0.45, 0.55)),
             (-0.012, -0.016, 0.007, _PI / 2, "ellipse", _BLU),
             (0.0, -0.02, 0.007, _PI / 2, "ellipse", _BLU),
             (0.012, -0.016, 0.007, _PI / 2, "ellipse", _BLU)],
}


@dataclasses.dataclass(frozen=True)
class VLThinkFamily:
  """A concept family: item names, the phrase naming the target, and each item's look."""
  name: str
  items: Tuple[str, ...]
  phrase: str  # formatted with {item}
  boards: Tuple[Tuple[float, float, float], ...]  # board colour per item
  symbols: Tuple[Tuple[Primitive, ...], ...]  # primitives per item


def _family(name, items, phrase, symbols, boards=None):
  boards = boards or tuple(_BOARD for _ in items)
  return VLThinkFamily(name, tuple(items), phrase, tuple(boards),
                       tuple(tuple(s) for s in symbols))


VLTHINK: Dict[str, VLThinkFamily] = {
    "shape": _family("shape", _SHAPE_ITEMS, "the board with the {item}",
                     [[(0, 0, 0.032, 0, s, (0.15, 0.25, 0.6))] for s in _SHAPE_ITEMS]),
    "colour": _family("colour", _COLOUR_ITEMS, "the {item} board", [[] for _ in _COLOUR_ITEMS],
                      [COLOURS[c] for c in _COLOUR_ITEMS]),
    "arrow": _family("arrow", ("right", "up", "left", "down"),
                     "the board with the arrow pointing {item}",
                     [_arrow(a) for a in (0, _PI / 2, _PI, 3 * _PI / 2)]),
    # Eight digits; the target concept is the parity ("odd" / "even") of the digit shown.
    "parity": _family("parity", tuple(str(d) for d in range(1, 9)),
                      "the board with the {item} number", [_digit(d) for d in range(1, 9)]),
    "sign": _family("sign", tuple(_SIGNS), "the board with the {item} sign",
                    list(_SIGNS.values())),
    "weather": _family("weather", tuple(_WEATHER), "the board with the {item} symbol",
                       list(_WEATHER.values())),
}
VLTHINK_OBJECT = 0  # "red cube": a training object, easy to grasp

# ----------------------------------------------------------------------------------------
# Splits.
@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """What one environment samples from (static under jit: frozen and hashable).

  Attributes:
    name: split name.
    objects: catalogue ids the target (and any distractor) object is drawn from.
    receptacles: catalogue ids the target (and any distractor) receptacle is drawn from.
    n_objects: 1, or 2 with a distractor object (distinct, same pool).
    n_receptacles: 1, or 2 with a distractor receptacle; VL-Think uses 3 boards.
    templates: instruction template ids.
    tables, backgrounds: texture ids.
    positions: "grid" (training grid of positions and yaws) or "unseen".
    ee_perturb: perturb the initial end-effector pose.
    object_blend: ratio of a blend texture mixed into the target object (0 = none).
    whole_blend: ratio of a blend texture mixed over the whole image (0 = none).
    change_step: step at which the target object jumps to a new place (-1 = never).
    vlthink: VL-Think family name, or "" for pick-and-place splits.
  """
  name: str
  objects: Tuple[int, ...] = TRAIN_OBJECTS
  receptacles: Tuple[int, ...] = TRAIN_RECEPTACLES
  n_objects: int = 1
  n_receptacles: int = 1
  templates: Tuple[int, ...] = TRAIN_TEMPLATES
  tables: Tuple[int, ...] = TRAIN_TABLES
  backgrounds: Tuple[int, ...] = TRAIN_BACKGROUNDS
  positions: str = "grid"
  ee_perturb: bool = False
  object_blend: float = 0.0
  whole_blend: float = 0.0
  change_step: int = -1
  vlthink: str = ""


def _vlthink_split(family: str) -> SplitSpec:
  return SplitSpec(f"vlthink_{family}", objects=(VLTHINK_OBJECT,), n_receptacles=3,
                   vlthink=family)


SPLITS: Dict[str, SplitSpec] = {s.name: s for s in (
    SplitSpec("train"),
    SplitSpec("carrot", objects=UNSEEN_OBJECTS),
    SplitSpec("instruct", templates=UNSEEN_TEMPLATES),
    SplitSpec("multi_carrot", objects=UNSEEN_OBJECTS, n_objects=2),
    SplitSpec("multi_plate", receptacles=UNSEEN_RECEPTACLES, n_receptacles=2),
    SplitSpec("plate", receptacles=UNSEEN_RECEPTACLES),
    SplitSpec("vision_img", tables=UNSEEN_TABLES, backgrounds=UNSEEN_BACKGROUNDS),
    SplitSpec("tex03", object_blend=0.3),
    SplitSpec("tex05", object_blend=0.5),
    SplitSpec("whole03", whole_blend=0.3),
    SplitSpec("whole05", whole_blend=0.5),
    SplitSpec("position", positions="unseen"),
    SplitSpec("ee_pose", ee_perturb=True),
    SplitSpec("pos_change_to", change_step=5),
    *(_vlthink_split(f) for f in VLTHINK),
)}

AXES: Dict[str, str] = {
    "carrot": "semantic", "instruct": "semantic", "multi_carrot": "semantic",
    "multi_plate": "semantic", "plate": "semantic", "vision_img": "vision", "tex03": "vision",
    "tex05": "vision", "whole03": "vision", "whole05": "vision", "position": "execution",
    "ee_pose": "execution", "pos_change_to": "execution",
    **{f"vlthink_{f}": "vlthink" for f in VLTHINK},
}


def get_split(name: str) -> SplitSpec:
  """The `SplitSpec` called `name`; ConfigError listing the known names otherwise."""
  if isinstance(name, SplitSpec):
    return name
  if name not in SPLITS:
    raise ConfigError(f"Unknown tabletop split {name!r}. Known splits: "
                      f"{', '.join(SPLITS)}. Pick one of these names.")
  return SPLITS[name]


# ----------------------------------------------------------------------------------------
# Positions (metres, table frame: x right, y away from the camera, table = [-0.22, 0.22]^2).
OBJECT_GRID_X = (-0.17, -0.11, -0.05)
OBJECT_GRID_Y = (-0.1, -0.04, 0.02, 0.08)
OBJECT_GRID_YAW = (0.0, _PI / 4, _PI / 2, 3 * _PI / 4)
RECEPTACLE_GRID_X = (0.08, 0.14)
RECEPTACLE_GRID_Y = (-0.1, 0.0, 0.1)
# Unseen positions: the sides swap (objects right, receptacles left), yaws off the grid.
UNSEEN_OBJECT_BOX = ((0.04, 0.18), (-0.12, 0.1))
UNSEEN_RECEPTACLE_BOX = ((-0.16, -0.08), (-0.1, 0.1))
VLTHINK_BOARD_X = (-0.15, 0.0, 0.15)
VLTHINK_BOARD_Y = 0.1
VLTHINK_OBJECT_X = (-0.1, -0.06, 0.06, 0.1)
VLTHINK_OBJECT_Y = -0.06


def object_grid() -> np.ndarray:
  """Training object positions [12, 2] (metres)."""
  return np.array([(x, y) for x in OBJECT_GRID_X for y in OBJECT_GRID_Y], np.float32)
