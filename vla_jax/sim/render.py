"""Pure-jnp rendering of tabletop scenes: signed-distance sprites over procedural textures.

The camera is fixed and oblique: the table plane is seen from above and in front, heights
lift things up the image, and a band of background "wall" shows beyond the far table edge.
Every drawable is a `Sprites` row (one generic signed-distance shape with a colour pattern);
a scene is rendered by evaluating all rows at once (vmapped, no per-object Python loop) and
alpha-compositing them in order. Works at any resolution.

Three renderers give the same images up to float rounding (tests/sim/test_render.py: at
most one level, at no more than 1 in 1,000 pixel values; where a value sits within rounding
of a level boundary, the side it lands on depends on the code XLA generates for the CPU,
so bit identity is not portable): `render_reference`
evaluates every texture family and every sprite at every pixel (O(rows x pixels)), the
specification; `render_scene_v1` (the previous fast path, kept for comparison) reads
textures from per-resolution tables computed once by the same code (`texture_tables`) and
evaluates each sprite only in a static window around it that holds every pixel it can
touch (`sprite_reach`), except rows the caller marks as unbounded; `render_scene` (used by
`env.render`) also draws long thin rows in per-image-row strips, calls libm (atan2, cos,
sin) only where a value can reach the image and never for fmod, skips at run time the
features no row of the batch uses, and composites one colour plane at a time (see "the
fast path" below).
"""

import concurrent.futures
import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vla_jax.sim import catalogue as cat

# Camera: table x in [-X_HALF, X_HALF] fills the width; table y in [-Y_FAR, Y_FAR] fills
# rows V_FAR..1 of the image; a height z moves a point up by z * Z_LIFT image heights.
X_HALF = 0.22
Y_FAR = 0.22
V_FAR = 0.16
SY = (1.0 - V_FAR) / (2 * Y_FAR)
Z_LIFT = 0.8 * SY


class Sprites(NamedTuple):
  """N drawable rows; every field has leading dimension N.

  xy [N, 2] centre on the table (m); z [N] height (m); yaw [N] (rad); size [N]
  circumradius (m); shape [N, 8] (`catalogue.SHAPE_PARAMS`); colour, colour2 [N, 3] in
  [0, 1]; pattern [N, 5] one-hot over `catalogue.PATTERNS`; blend [N] ratio of the
  scene's blend texture mixed in; alpha [N] opacity (0 hides a row).
  """
  xy: jax.Array
  z: jax.Array
  yaw: jax.Array
  size: jax.Array
  shape: jax.Array
  colour: jax.Array
  colour2: jax.Array
  pattern: jax.Array
  blend: jax.Array
  alpha: jax.Array


def concat_sprites(*parts: Sprites) -> Sprites:
  """Concatenates sprite tables along the row axis (draw order = argument order)."""
  return jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *parts)


def make_sprites(xy, z, yaw, size, shape, colour, colour2=None, pattern=None, blend=None,
                 alpha=None) -> Sprites:
  """Builds a `Sprites` table from [N]-leading arrays, filling defaults (solid, opaque)."""
  xy = jnp.asarray(xy, jnp.float32)
  n = xy.shape[0]
  colour = jnp.broadcast_to(jnp.asarray(colour, jnp.float32), (n, 3))
  return Sprites(
      xy=xy, z=jnp.broadcast_to(jnp.asarray(z, jnp.float32), (n,)),
      yaw=jnp.broadcast_to(jnp.asarray(yaw, jnp.float32), (n,)),
      size=jnp.broadcast_to(jnp.asarray(size, jnp.float32), (n,)),
      shape=jnp.broadcast_to(jnp.asarray(shape, jnp.float32), (n, 8)),
      colour=colour,
      colour2=colour if colour2 is None else jnp.broadcast_to(
          jnp.asarray(colour2, jnp.float32), (n, 3)),
      pattern=(jnp.zeros((n, len(cat.PATTERNS)), jnp.float32).at[:, 0].set(1.0)
               if pattern is None else jnp.broadcast_to(
                   jnp.asarray(pattern, jnp.float32), (n, len(cat.PATTERNS)))),
      blend=jnp.zeros((n,), jnp.float32) if blend is None else jnp.broadcast_to(
          jnp.asarray(blend, jnp.float32), (n,)),
      alpha=jnp.ones((n,), jnp.float32) if alpha is None else jnp.broadcast_to(
          jnp.asarray(alpha, jnp.float32), (n,)))


def shape_sdf(points, xy, yaw, size, shape):
  """Approximate signed distance (m, < 0 inside) from `points` [..., 2] to one shape.

  Args:
    points: [..., 2] table coordinates (m).
    xy: [2] centre; yaw: [] rotation; size: [] circumradius; shape: [8] parameters.
  Returns:
    (distance [...], local coordinates [..., 2] in units of `size`).
  """
  aspect, n, is_poly, star, hole, cut_dx, cut_r, phase = [shape[i] for i in range(8)]
  d = points - xy
  c, s = jnp.cos(yaw), jnp.sin(yaw)
  lx = (c * d[..., 0] + s * d[..., 1]) / size
  ly = (-s * d[..., 0] + c * d[..., 1]) / size
  qy = ly / aspect
  rho = jnp.sqrt(lx * lx + qy * qy + 1e-12)
  theta = jnp.arctan2(qy, lx) - phase
  seg = 2 * jnp.pi / jnp.maximum(n, 1.0)
  a = jnp.mod(theta, seg) - seg / 2  # 0 at edge midpoints, +-seg/2 at vertices
  polygon = jnp.cos(seg / 2) / jnp.cos(a)
  spikes = 1.0 - star * (1.0 - jnp.abs(a) / (seg / 2))
  radius = jnp.where(is_poly > 0.5, polygon, 1.0) * spikes
  scale = size * jnp.minimum(aspect, 1.0)
  dist = (rho - radius) * scale
  dist = jnp.where(hole > 0, jnp.maximum(dist, (hole - rho) * scale), dist)
  cut = (cut_r - jnp.sqrt((lx - cut_dx) ** 2 + qy ** 2)) * scale
  dist = jnp.where(cut_r > 0, jnp.maximum(dist, cut), dist)
  return dist, jnp.stack([lx, ly], -1)


# Texture tables (constants gathered by id inside traced code).
_TEX = cat.TEXTURES
TEX_COLOUR = np.array([t.colour for t in _TEX], np.float32)
TEX_COLOUR2 = np.array([t.colour2 for t in _TEX], np.float32)
TEX_FAMILY = np.eye(len(cat.TEXTURE_FAMILIES), dtype=np.float32)[
    [cat.TEXTURE_FAMILIES.index(t.family) for t in _TEX]]
TEX_FREQ = np.array([t.freq for t in _TEX], np.float32)
TEX_ANGLE = np.array([t.angle for t in _TEX], np.float32)


def _hsv_rainbow(h):
  """Fully saturated colour of hue h in [0, 1): [..., 3]."""
  k = jnp.mod(jnp.stack([5.0, 3.0, 1.0], -1) + h[..., None] * 6, 6)
  return 1 - jnp.clip(jnp.minimum(k, 4 - k), 0, 1)


def texture(tex_id, p):
  """Colour [..., 3] of texture `tex_id` at 2-D coordinates p [..., 2] (metres)."""
  f, angle = jnp.asarray(TEX_FREQ)[tex_id], jnp.asarray(TEX_ANGLE)[tex_id]
  a = jnp.cos(angle) * p[..., 0] + jnp.sin(angle) * p[..., 1]
  b = -jnp.sin(angle) * p[..., 0] + jnp.cos(angle) * p[..., 1]
  soft = lambda x: jnp.clip(0.5 + 3 * x, 0, 1)
  fract = lambda x: x - jnp.floor(x)
  mottled = 0.5 + 0.25 * jnp.sin(a * f * 1.3) * jnp.sin(b * f * 0.9) + 0.2 * jnp.sin(
      (a + 2 * b) * f * 0.37)
  wood = 0.5 + 0.5 * jnp.sin(a * f + 2.0 * jnp.sin(b * f * 0.11) + 0.8 * jnp.sin(
      a * f * 0.07 + b * f * 0.23))
  checker = soft(jnp.sin(a * f) * jnp.sin(b * f))
  stripes = soft(jnp.sin(a * f))
  cell = jnp.stack([fract(a * f / (2 * jnp.pi)), fract(b * f / (2 * jnp.pi))], -1) - 0.5
  dots = soft(0.3 - jnp.sqrt(jnp.sum(cell ** 2, -1)))
  marble = 0.5 + 0.5 * jnp.sin(a * f + 3 * jnp.sin(b * f * 0.5) + jnp.sin((a + b) * f * 1.7))
  row = jnp.floor(b * f / (2 * jnp.pi))
  brick = fract(a * f / (2 * jnp.pi) + 0.5 * jnp.mod(row, 2)) - 0.5
  tiles = soft(jnp.maximum(jnp.abs(brick), jnp.abs(cell[..., 1])) - 0.44)
  gradient = jnp.clip(b * 2.5 + 0.5, 0, 1)
  values = jnp.stack([mottled, wood, checker, stripes, dots, marble, tiles,
                      jnp.zeros_like(a), gradient], -1)
  family = jnp.asarray(TEX_FAMILY)[tex_id]
  v = jnp.sum(values * family, -1)[..., None]
  mixed = (1 - v) * jnp.asarray(TEX_COLOUR)[tex_id] + v * jnp.asarray(TEX_COLOUR2)[tex_id]
  rainbow = _hsv_rainbow(fract((a + b) * f / (2 * jnp.pi)))
  is_rainbow = family[cat.TEXTURE_FAMILIES.index("rainbow")]
  return is_rainbow * rainbow + (1 - is_rainbow) * mixed


def _pattern_mask(local, dist, size, pattern):
  """Where colour2 shows (0..1) for each pattern, selected by one-hot `pattern` [5]."""
  soft = lambda x: jnp.clip(0.5 + 3 * x, 0, 1)
  fract = lambda x: x - jnp.floor(x)
  stripes = soft(jnp.sin(local[..., 0] * 2.5 * jnp.pi))
  cell = fract(local * 1.6) - 0.5
  dots = soft(0.27 - jnp.sqrt(jnp.sum(cell ** 2, -1)))
  checker = soft(jnp.sin(local[..., 0] * 2.2 * jnp.pi) * jnp.sin(local[..., 1] * 2.2 * jnp.pi))
  rim = (dist > -0.22 * size).astype(jnp.float32)
  masks = jnp.stack([jnp.zeros_like(rim), stripes, dots, checker, rim], -1)
  return jnp.sum(masks * pattern, -1)


def _pixel_grid(image_size: int):
  centres = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) / image_size
  v, u = jnp.meshgrid(centres, centres, indexing="ij")
  return u, v


def table_y(v, z):
  """Table y (m) seen at image row fraction v for a point at height z."""
  return Y_FAR - (v - V_FAR + z * Z_LIFT) / SY


def project(xyz):
  """Image coordinates (u, v) in [0, 1] of table points xyz [..., 3]."""
  u = xyz[..., 0] / (2 * X_HALF) + 0.5
  v = V_FAR + (Y_FAR - xyz[..., 1]) * SY - xyz[..., 2] * Z_LIFT
  return jnp.stack([u, v], -1)


def _sprite_layer(sprite: Sprites, u, v, blend_rgb, pixel):
  """Opacity [H, W] and colour [H, W, 3] of one sprite row."""
  points = jnp.stack([(u - 0.5) * 2 * X_HALF, table_y(v, sprite.z)], -1)
  dist, local = shape_sdf(points, sprite.xy, sprite.yaw, sprite.size, sprite.shape)
  alpha = jnp.clip(0.5 - dist / pixel, 0, 1) * sprite.alpha
  m = _pattern_mask(local, dist, sprite.size, sprite.pattern)[..., None]
  rgb = (1 - m) * sprite.colour + m * sprite.colour2
  rgb = (1 - sprite.blend) * rgb + sprite.blend * blend_rgb
  return alpha, rgb


def _plain_layer(sprite: Sprites, u, v, pixel):
  """`_sprite_layer` of a solid (pattern 0), unblended row: the same values, computed
  without the pattern and blend terms (they add exact zeros there)."""
  points = jnp.stack([(u - 0.5) * 2 * X_HALF, table_y(v, sprite.z)], -1)
  dist, _ = shape_sdf(points, sprite.xy, sprite.yaw, sprite.size, sprite.shape)
  alpha = jnp.clip(0.5 - dist / pixel, 0, 1) * sprite.alpha
  return alpha, jnp.broadcast_to(sprite.colour, alpha.shape + (3,))


def render_reference(sprites: Sprites, table_tex, background_tex, blend_tex, whole_blend,
                     image_size: int) -> jax.Array:
  """Renders one scene the direct way (every texture family, every row at every pixel).

  The specification of `render_scene`, kept for tests and benchmarks/sim_speed.py.

  Args:
    sprites: rows in draw order (later rows cover earlier ones).
    table_tex, background_tex, blend_tex: texture ids (int32 scalars).
    whole_blend: ratio of the blend texture mixed over the whole image.
    image_size: output side in pixels (static).
  Returns:
    uint8 image [image_size, image_size, 3].
  """
  u, v = _pixel_grid(image_size)
  x = (u - 0.5) * 2 * X_HALF
  y0 = table_y(v, 0.0)
  pixel = 0.5 * (2 * X_HALF / image_size + 1.0 / (image_size * SY))
  table = texture(table_tex, jnp.stack([x, y0], -1))
  wall = texture(background_tex, jnp.stack([x, (V_FAR - v) * 0.5], -1))
  # A dark table edge, then the wall behind it.
  edge = jnp.clip((y0 - (Y_FAR - 0.008)) / pixel, 0, 1)[..., None]
  wall_mix = jnp.clip((y0 - Y_FAR) / pixel, 0, 1)[..., None]
  image = (1 - edge) * table + edge * 0.6 * table
  image = (1 - wall_mix) * image + wall_mix * wall
  blend_rgb = texture(blend_tex, jnp.stack([x, y0], -1))
  alphas, colours = jax.vmap(_sprite_layer, in_axes=(0, None, None, None, None))(
      sprites, u, v, blend_rgb, pixel)

  def over(canvas, layer):
    alpha, rgb = layer
    return canvas * (1 - alpha[..., None]) + rgb * alpha[..., None], None

  image, _ = jax.lax.scan(over, image, (alphas, colours))
  image = (1 - whole_blend) * image + whole_blend * blend_rgb
  return jnp.round(jnp.clip(image, 0, 1) * 255).astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def texture_tables(image_size: int):
  """Every texture at every pixel, computed once per resolution with `texture` itself.

  Returns:
    (table [T, S, S, 3], wall [T, S, S, 3]) float32 numpy: texture t on the table plane
    (also the blend texture's coordinates) and on the background wall.
  """
  ids = np.arange(len(_TEX), dtype=np.int32)

  def both(tex_id):
    # As in `render_reference`: the pixel grid is a constant of the compiled program, so
    # XLA folds the same subexpressions and the values match to the bit.
    u, v = _pixel_grid(image_size)
    x = (u - 0.5) * 2 * X_HALF
    return (texture(tex_id, jnp.stack([x, table_y(v, 0.0)], -1)),
            texture(tex_id, jnp.stack([x, (V_FAR - v) * 0.5], -1)))

  def compute():
    table, wall = jax.jit(jax.vmap(both))(ids)
    return np.asarray(table), np.asarray(wall)

  # Callers trace (jit, vmap); JAX's trace state is per thread, so a fresh thread computes
  # concrete tables that become constants of the caller's program.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(compute).result()


def sprite_reach(size: float, aspect: float, image_size: int) -> float:
  """Distance (m) from a sprite's centre beyond which it leaves every pixel untouched.

  For `shape_sdf` shapes with radius <= 1 (all catalogue shapes): alpha > 0 needs
  dist < pixel / 2, i.e. rho < 1 + pixel / (2 size min(aspect, 1)).
  """
  pixel = 0.5 * (2 * X_HALF / image_size + 1.0 / (image_size * SY))
  return size * max(1.0, aspect) + 0.5 * pixel * max(1.0, aspect) / min(aspect, 1.0)


def _window(reach: float, image_size: int) -> int:
  """Static side (pixels) of a window that holds a sprite of `reach` metres."""
  per_m = image_size * max(1.0 / (2 * X_HALF), SY)
  return 2 * int(np.ceil(reach * per_m)) + 3


def render_scene_v1(sprites: Sprites, table_tex, background_tex, blend_tex, whole_blend,
                    image_size: int, reach=None, plain=None) -> jax.Array:
  """The previous fast path (texture tables, square windows, every channel at once).

  Kept unchanged so that benchmarks/sim_speed.py and tests/sim/test_render.py can compare
  `render_scene` with it. Arguments and result as `render_scene`'s, without `strip` (a
  row with reach None is evaluated at every pixel).
  """
  n = sprites.xy.shape[0]
  reach = (None,) * n if reach is None else tuple(reach)
  plain = (False,) * n if plain is None else tuple(plain)
  if len(reach) != n:
    raise ValueError(f"reach must give one entry per sprite row ({n}), got {len(reach)}.")
  u, v = _pixel_grid(image_size)
  x = (u - 0.5) * 2 * X_HALF
  y0 = table_y(v, 0.0)
  pixel = 0.5 * (2 * X_HALF / image_size + 1.0 / (image_size * SY))
  tables, walls = texture_tables(image_size)
  table = jnp.asarray(tables)[table_tex]
  wall = jnp.asarray(walls)[background_tex]
  edge = jnp.clip((y0 - (Y_FAR - 0.008)) / pixel, 0, 1)[..., None]
  wall_mix = jnp.clip((y0 - Y_FAR) / pixel, 0, 1)[..., None]
  image = (1 - edge) * table + edge * 0.6 * table
  image = (1 - wall_mix) * image + wall_mix * wall
  blend_rgb = jnp.asarray(tables)[blend_tex]
  for i in range(n):
    row = jax.tree.map(lambda a, i=i: a[i], sprites)
    side = None if reach[i] is None else _window(reach[i], image_size)
    layer = ((lambda uu, vv, _: _plain_layer(row, uu, vv, pixel)) if plain[i] else
             (lambda uu, vv, bb: _sprite_layer(row, uu, vv, bb, pixel)))
    if side is None or side >= image_size:
      alpha, rgb = layer(u, v, blend_rgb)
      image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
      continue
    centre = project(jnp.concatenate([row.xy, row.z[None]]))
    start = jnp.clip(jnp.floor(centre * image_size).astype(jnp.int32) - side // 2, 0,
                     image_size - side)  # (column, row)
    cut = lambda a: jax.lax.dynamic_slice(
        a, (start[1], start[0]) + (0,) * (a.ndim - 2), (side, side) + a.shape[2:])
    # The window's pixel centres, computed as `_pixel_grid` does (same values).
    cols = (start[0] + jnp.arange(side)).astype(jnp.float32)
    rows = (start[1] + jnp.arange(side)).astype(jnp.float32)
    wv, wu = jnp.meshgrid((rows + 0.5) / image_size, (cols + 0.5) / image_size,
                          indexing="ij")
    alpha, rgb = layer(wu, wv, None if plain[i] else cut(blend_rgb))
    patch = cut(image) * (1 - alpha[..., None]) + rgb * alpha[..., None]
    image = jax.lax.dynamic_update_slice(image, patch, (start[1], start[0], 0))
  image = (1 - whole_blend) * image + whole_blend * blend_rgb
  return jnp.round(jnp.clip(image, 0, 1) * 255).astype(jnp.uint8)


# ------------------------------------------------------------------ the fast path ----
# `render_scene` gives `render_reference`'s image with far fewer libm calls. XLA on CPU
# calls glibc for atan2, fmod, cos and sin one element at a time (atan2f ~55 ns, fmodf
# ~40 ns, against ~1 ns for a vectorised multiply-add), so those calls, not arithmetic,
# were the cost of a sprite. Every value that can reach the image is still computed by
# the same expressions as `shape_sdf` / `_pattern_mask`; only values that provably cannot
# reach it (an angle that a round shape ignores, a pixel the sprite cannot cover, a
# pattern the sprite does not use) get trivial libm arguments, and fmod (exact by
# definition) is computed without libm. Note that XLA fuses multiply-adds into FMAs, so
# "the same expressions" must also keep the same products next to the same adds.


def pixel_size(image_size: int) -> float:
  """Mean pixel pitch (m) on the table plane: the width of a sprite's antialiased edge."""
  return 0.5 * (2 * X_HALF / image_size + 1.0 / (image_size * SY))


def _rem(x, y):
  """`lax.rem(x, y)` (C fmod), bit for bit, in vectorised integer arithmetic.

  fmod is exact (its result is representable), so any exact method reproduces libm.
  Valid for finite float32 x, y > 2**-100 and |x| < 2**7 y (one reduction step of up to
  6 exponent bits); `shape_sdf` angles (|theta| < 5) satisfy this for polygons of up to
  150 sides (the catalogue's have at most 10).
  """
  ax = jnp.abs(x)
  bx = lax.bitcast_convert_type(ax, jnp.int32)
  by = lax.bitcast_convert_type(y, jnp.int32)
  d = (bx >> 23) - (by >> 23)  # exponent difference
  my = (by & 0x7FFFFF) | 0x800000  # y = my * 2**(ey - 150)
  r = (bx & 0x7FFFFF) | 0x800000  # ax = r * 2**(ex - 150)
  # r << d < 2**30 and q * my <= r + my < 2**31: no int32 overflow. The float quotient is
  # off by at most one; the two corrections make r exact.
  n = r << jnp.clip(d, 0, 6)
  q = jnp.floor(n.astype(jnp.float32) / my.astype(jnp.float32)).astype(jnp.int32)
  r = n - q * my
  r = jnp.where(r < 0, r + my, r)
  r = jnp.where(r >= my, r - my, r)
  scale = lax.bitcast_convert_type(jnp.maximum((by >> 23) - 23, 1) << 23, jnp.float32)
  out = jnp.where(d < 0, ax, r.astype(jnp.float32) * scale)  # |x| < y: fmod = x
  return jnp.copysign(out, x)


def _mod(x, y):
  """`jnp.mod(x, y)` bit for bit (jnp's own sign fix-up around `_rem`)."""
  trunc = _rem(x, y)
  plus = ((trunc < 0) != (y < 0)) & (trunc != 0)
  return jnp.where(plus, trunc + y, trunc)


def _sdf_fast(x, y, sprite: Sprites, pixel: float, angle: bool = True):
  """`shape_sdf` of one row at table points (x, y) [...], exact wherever it matters.

  Returns (dist, lx, ly). The angle (atan2, cos) only matters for polygons and stars, and
  only where the row can be visible: `shape_sdf` radii are <= 1 (regular polygons of
  >= 3 sides, spikes with 0 <= star <= 1) and holes and cuts only grow `dist`, so beyond
  rho = 1 + pixel / (2 scale) the opacity is 0 whatever the angle. There the libm calls
  get arguments they return at once (atan2 of NaN, cos of 0); elsewhere the expressions
  are `shape_sdf`'s. angle=False (static) promises that no pixel needs the angle (a round
  or hidden row) and leaves the calls out.
  """
  aspect, n, is_poly, star, hole, cut_dx, cut_r, phase = [sprite.shape[i] for i in range(8)]
  d0, d1 = x - sprite.xy[0], y - sprite.xy[1]
  c, s = jnp.cos(sprite.yaw), jnp.sin(sprite.yaw)
  lx = (c * d0 + s * d1) / sprite.size
  ly = (-s * d0 + c * d1) / sprite.size
  qy = ly / aspect
  rho = jnp.sqrt(lx * lx + qy * qy + 1e-12)
  scale = sprite.size * jnp.minimum(aspect, 1.0)
  bounded = ((is_poly <= 0.5) | (n >= 3)) & (star >= 0) & (star <= 1)
  near = rho < 1.01 + 0.51 * pixel / scale  # margins far above float rounding
  need = ((is_poly > 0.5) | (star != 0)) & (sprite.alpha != 0) & (near | ~bounded)
  if not angle:
    need = jnp.zeros_like(need)
  theta = jnp.where(need, jnp.arctan2(jnp.where(need, qy, jnp.nan), lx), 0.0) - phase
  seg = 2 * jnp.pi / jnp.maximum(n, 1.0)
  a = _mod(theta, seg) - seg / 2
  polygon = jnp.cos(seg / 2) / jnp.cos(jnp.where(need & (is_poly > 0.5), a, 0.0))
  spikes = 1.0 - star * (1.0 - jnp.abs(a) / (seg / 2))
  radius = jnp.where(is_poly > 0.5, polygon, 1.0) * spikes
  dist = (rho - radius) * scale
  dist = jnp.where(hole > 0, jnp.maximum(dist, (hole - rho) * scale), dist)
  cut = (cut_r - jnp.sqrt((lx - cut_dx) ** 2 + qy ** 2)) * scale
  dist = jnp.where(cut_r > 0, jnp.maximum(dist, cut), dist)
  return dist, lx, ly


def _pattern_fast(lx, ly, dist, size, pattern, alpha, sines: bool = True):
  """`_pattern_mask` (one-hot `pattern`), with sines only where the pattern uses them.

  Stripes and checks share one sine of x; pixels the row does not cover (alpha 0) or
  patterns without sines get sin(0), and sines=False (static) leaves them out. The
  one-hot sum is written out (XLA's reduction of a 5-wide axis cost more than the
  patterns) and is exact: one term is the mask, the others are exact zeros.
  """
  soft = lambda v: jnp.clip(0.5 + 3 * v, 0, 1)
  fract = lambda v: v - jnp.floor(v)
  shown = (alpha > 0) & sines
  use_stripes = shown & (pattern[1] != 0)
  use_checker = shown & (pattern[3] != 0)
  sin_x = jnp.sin(jnp.where(use_stripes, lx * 2.5 * jnp.pi,
                            jnp.where(use_checker, lx * 2.2 * jnp.pi, 0.0)))
  sin_y = jnp.sin(jnp.where(use_checker, ly * 2.2 * jnp.pi, 0.0))
  c0, c1 = fract(lx * 1.6) - 0.5, fract(ly * 1.6) - 0.5
  # `_pattern_mask` adds the squares unfused (a reduction); max(., 0), a no-op on a
  # square, keeps LLVM from contracting one of them into the add as an FMA.
  dots = soft(0.27 - jnp.sqrt(jnp.maximum(c0 * c0, 0.0) + jnp.maximum(c1 * c1, 0.0)))
  rim = (dist > -0.22 * size).astype(jnp.float32)
  return (soft(sin_x) * pattern[1] + dots * pattern[2] + soft(sin_x * sin_y) * pattern[3]
          + rim * pattern[4])


def _row_values(sprite: Sprites, u, v, pixel: float, plain: bool, angle: bool = True,
                sines: bool = True):
  """(opacity, pattern mask m or None for a plain row) of one row at pixel centres u, v."""
  dist, lx, ly = _sdf_fast((u - 0.5) * 2 * X_HALF, table_y(v, sprite.z), sprite, pixel,
                           angle)
  alpha = jnp.clip(0.5 - dist / pixel, 0, 1) * sprite.alpha
  if plain:
    return alpha, None
  return alpha, _pattern_fast(lx, ly, dist, sprite.size, sprite.pattern, alpha, sines)


@jax.custom_batching.custom_vmap
def _batch_any(flag):
  """`flag` (a bool scalar); under vmap, whether it holds for any environment of the batch,
  unbatched. A `lax.cond` / `lax.switch` on it stays a branch under vmap (on a batched
  predicate it would become a select that computes every branch)."""
  return flag


@_batch_any.def_vmap
def _batch_any_batched(axis_size, in_batched, flag):
  del axis_size
  return (jnp.any(flag) if in_batched[0] else flag), False


def _group_values(rows: Sprites, u, v, pixel: float, plain: bool):
  """`_row_values` of a group of rows ([g]-leading, pixel centres [g, ...]).

  Computes only the features some row of the batch uses: the angle (polygons, stars) and
  the sines (stripes, checks), chosen at run time (`_batch_any`). Leaving a feature out is
  exact: where no row needs it, its terms are exact zeros or ones (`_sdf_fast`,
  `_pattern_fast`).
  """
  visible = rows.alpha != 0
  angle = _batch_any(jnp.any(((rows.shape[:, 2] > 0.5) | (rows.shape[:, 3] != 0)) & visible))
  sines = _batch_any(jnp.any(((rows.pattern[:, 1] != 0) | (rows.pattern[:, 3] != 0))
                             & visible))
  variants = [(a, s) for a in (False, True) for s in ((False,) if plain else (False, True))]
  branches = [functools.partial(lambda r, uu, vv, a, s: jax.vmap(
      lambda ri, ui, vi: _row_values(ri, ui, vi, pixel, plain, a, s))(r, uu, vv), a=a, s=s)
              for a, s in variants]
  index = angle.astype(jnp.int32) if plain else 2 * angle.astype(jnp.int32) + sines
  return lax.switch(index, branches, rows, u, v)


def window_shape(reach: float, image_size: int) -> tuple:
  """Static (rows, columns) of a window that holds every pixel within `reach` metres.

  A metre spans image_size * SY rows and image_size / (2 X_HALF) columns; 2 ceil(r) + 3
  pixels hold every centre within r pixels of any point (`render_scene` anchors the
  window at the floor of the sprite's centre).
  """
  rows = 2 * int(np.ceil(reach * image_size * SY)) + 3
  cols = 2 * int(np.ceil(reach * image_size / (2 * X_HALF))) + 3
  return min(rows, image_size), min(cols, image_size)


def strip_columns(half_width: float, min_sin: float, image_size: int) -> int:
  """Static width (pixels) of a strip row: every image row, at a row's height, meets
  the band of `half_width` metres around the sprite's axis (|sin yaw| >= min_sin) in
  at most 2 half_width / min_sin metres, i.e. ceil of that in pixels plus one for the
  pixel grid and one for rounding of the axis."""
  span = 2 * half_width / min_sin * image_size / (2 * X_HALF)
  return min(int(np.ceil(span)) + 2, image_size)


class _Group(NamedTuple):
  """Consecutive rows drawn alike: kind "window" (shape (rows, cols)), "strip" (shape:
  columns per image row) or "full" (shape None)."""
  start: int
  stop: int
  kind: str
  shape: object
  plain: bool


def _groups(reach, plain, strip, size: int, pixel: float) -> list:
  groups = []
  for i, (r, p, st) in enumerate(zip(reach, plain, strip)):
    if st is not None:
      kind, shape = "strip", strip_columns(st[0] + 0.5 * pixel + 1e-4, st[1], size)
    elif r is None:
      kind, shape = "full", None
    else:
      kind, shape = "window", window_shape(r, size)
    if groups and groups[-1][2:] == (kind, shape, p):
      groups[-1] = groups[-1]._replace(stop=i + 1)
    else:
      groups.append(_Group(i, i + 1, kind, shape, p))
  return groups


def _place(row: Sprites, group: _Group, size: int):
  """(start, u, v) of one row: where its window lies and its pixel centres there.

  window: start (column, row) of the [rows, cols] window; strip: start [S] of each image
  row's run of columns; full: start 0 and the whole grid. Centres as `_pixel_grid`
  computes them (the same values).
  """
  centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
  if group.kind == "full":
    u, v = _pixel_grid(size)
    return jnp.zeros((), jnp.int32), u, v
  if group.kind == "strip":
    width = group.shape
    # Column of the row's axis at each image row (a float estimate: it only picks the
    # strip, whose width has a pixel to spare for it).
    axis_x = row.xy[0] + (table_y(centres, row.z) - row.xy[1]) / jnp.tan(row.yaw)
    axis_col = (axis_x / (2 * X_HALF) + 0.5) * size
    start = jnp.clip(jnp.floor(axis_col - 0.5 * (width - 1)).astype(jnp.int32), 0,
                     size - width)
    cols = (start[:, None] + jnp.arange(width)[None, :]).astype(jnp.float32)
    return start, (cols + 0.5) / size, jnp.broadcast_to(centres[:, None], cols.shape)
  rows_, cols_ = group.shape
  centre = project(jnp.concatenate([row.xy, row.z[None]]))
  start = jnp.floor(centre * size).astype(jnp.int32) - jnp.array([cols_ // 2, rows_ // 2])
  start = jnp.clip(start, 0, jnp.array([size - cols_, size - rows_]))  # (column, row)
  v, u = jnp.meshgrid((start[1] + jnp.arange(rows_) + 0.5) / size,
                      (start[0] + jnp.arange(cols_) + 0.5) / size, indexing="ij")
  return start, u, v


def _composite(image, table_c, blend_tex, c, row: Sprites, group: _Group, start, alpha, m):
  """One channel plane `image` [S, S] with one row drawn over it (`render_reference`'s
  per-pixel arithmetic, inside the row's window)."""
  colour = row.colour[c]
  if group.kind == "strip":
    # Each image row's strip is a run of columns of its own.
    cut = jax.vmap(lambda r, s0: lax.dynamic_slice(r, (s0,), (group.shape,)))(image, start)
    patch = cut * (1 - alpha) + colour * alpha
    return jax.vmap(lambda r, p, s0: lax.dynamic_update_slice(r, p, (s0,)))(image, patch, start)
  corner = (start[1], start[0])
  if group.kind == "full":
    blend, cut = table_c[blend_tex], image
  else:
    blend = lax.dynamic_slice(table_c, (blend_tex,) + corner, (1,) + group.shape)[0]
    cut = lax.dynamic_slice(image, corner, group.shape)
  rgb = colour
  if m is not None:
    # Also when blend is 0: skipping the term would change which product LLVM fuses
    # into the next add (an FMA), and with it the last bit.
    rgb = (1 - m) * colour + m * row.colour2[c]
    rgb = (1 - row.blend) * rgb + row.blend * blend
  patch = cut * (1 - alpha) + rgb * alpha
  return patch if group.kind == "full" else lax.dynamic_update_slice(image, patch, corner)


def render_scene(sprites: Sprites, table_tex, background_tex, blend_tex, whole_blend,
                 image_size: int, reach=None, plain=None, strip=None) -> jax.Array:
  """Renders one scene as `render_reference` does (up to rare one-level differences from
  float rounding, see the module docstring).

  Each row is evaluated once, in a static window that holds every pixel it can touch:
  a `window_shape(reach)` rectangle, a `strip_columns` wide strip per image row for a
  long thin row (the arm), or the whole image; consecutive rows with the same window are
  evaluated as one batch. Only the values that reach the image go through libm
  (`_sdf_fast`, `_pattern_fast`), and features no row of a group uses (in the whole
  batch, under vmap) are skipped at run time (`_group_values`). The rows are then
  composited in draw order one colour channel at a time (a loop over channels), so that
  a batch holds one float32 plane instead of an [S, S, 3] canvas: at batch 1024 the
  canvas was 50 MB of fresh pages (page faults) per step.

  Args:
    sprites: rows in draw order (later rows cover earlier ones).
    table_tex, background_tex, blend_tex: texture ids (int32 scalars).
    whole_blend: ratio of the blend texture mixed over the whole image.
    image_size: output side in pixels (static).
    reach: static tuple, per row, of `sprite_reach` (m), or None for a row evaluated at
      every pixel (or in a strip); None (default) evaluates every row at every pixel.
    plain: static tuple of bools, per row: True promises a solid, unblended row (pattern
      "solid", blend 0), drawn without the pattern code; None: no such rows.
    strip: static tuple, per row, of None or (half_width, min_sin): a promise that every
      pixel the row can touch lies within half_width + pixel_size / 2 metres (in the
      table plane at the row's height) of the line through its xy along its yaw, and
      that |sin yaw| >= min_sin. Such a row is evaluated in `strip_columns` pixels of
      each image row. None: no strip rows.
  Returns:
    uint8 image [image_size, image_size, 3].
  """
  n = sprites.xy.shape[0]
  reach = (None,) * n if reach is None else tuple(reach)
  plain = (False,) * n if plain is None else tuple(plain)
  strip = (None,) * n if strip is None else tuple(strip)
  if not len(reach) == len(plain) == len(strip) == n:
    raise ValueError(f"reach, plain and strip must give one entry per sprite row ({n}), got "
                     f"{len(reach)}, {len(plain)} and {len(strip)}.")
  size = image_size
  pixel = pixel_size(size)
  tables, walls = (jnp.asarray(t) for t in texture_tables(size))

  # 1. Every row's opacity (and pattern mask) in its window; none depends on the canvas.
  layers = []
  for group in _groups(reach, plain, strip, size, pixel):
    rows = jax.tree.map(lambda a, g=group: a[g.start:g.stop], sprites)
    start, u, v = jax.vmap(lambda r, g=group: _place(r, g, size))(rows)
    alpha, m = _group_values(rows, u, v, pixel, group.plain)
    layers.append((group, rows, start, alpha, m))

  # 2. Composite, one channel plane at a time: the same per-pixel arithmetic as
  # `render_reference` (a row leaves the pixels outside its window unchanged there too).
  _, v = _pixel_grid(size)
  y0 = table_y(v, 0.0)
  edge = jnp.clip((y0 - (Y_FAR - 0.008)) / pixel, 0, 1)
  wall_mix = jnp.clip((y0 - Y_FAR) / pixel, 0, 1)

  def channel(c, packed):
    table_c = lax.dynamic_index_in_dim(tables, c, axis=3, keepdims=False)  # [T, S, S]
    wall_c = lax.dynamic_index_in_dim(walls, c, axis=3, keepdims=False)
    table = table_c[table_tex]
    image = (1 - edge) * table + edge * 0.6 * table
    image = (1 - wall_mix) * image + wall_mix * wall_c[background_tex]
    for group, rows, start, alpha, m in layers:

      def draw(k, img, group=group, rows=rows, start=start, alpha=alpha, m=m):
        row = jax.tree.map(lambda a: a[k], rows)
        return _composite(img, table_c, blend_tex, c, row, group, start[k], alpha[k],
                          None if m is None else m[k])

      if group.stop - group.start == 1:
        image = draw(0, image)
      else:
        image = lax.fori_loop(0, group.stop - group.start, draw, image)
    image = (1 - whole_blend) * image + whole_blend * table_c[blend_tex]
    plane = jnp.round(jnp.clip(image, 0, 1) * 255).astype(jnp.uint32)
    # Byte c of a uint32 per pixel: XLA wrote a channel of a uint8 [S, S, 3] carry as a
    # select over the whole array, once per channel (15 % of the render).
    return packed | (plane << (8 * c).astype(jnp.uint32))

  packed = lax.fori_loop(0, 3, channel, jnp.zeros((size, size), jnp.uint32))
  return jnp.stack([(packed >> (8 * c)) & 0xFF for c in range(3)], -1).astype(jnp.uint8)
