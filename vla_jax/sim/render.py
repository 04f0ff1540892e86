"""Pure-jnp rendering of tabletop scenes: signed-distance sprites over procedural textures.

The camera is fixed and oblique: the table plane is seen from above and in front, heights
lift things up the image, and a band of background "wall" shows beyond the far table edge.
Every drawable is a `Sprites` row (one generic signed-distance shape with a colour pattern);
a scene is rendered by evaluating all rows at once (vmapped, no per-object Python loop) and
alpha-compositing them in order. Works at any resolution.

Two renderers give bit-identical images (tests/sim/test_render.py): `render_reference`
evaluates every texture family and every sprite at every pixel (O(rows x pixels));
`render_scene` reads textures from per-resolution tables computed once by the same code
(`texture_tables`) and evaluates each sprite only in a static window around it that holds
every pixel it can touch (`sprite_reach`), except rows the caller marks as unbounded.
"""

import concurrent.futures
import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def render_scene(sprites: Sprites, table_tex, background_tex, blend_tex, whole_blend,
                 image_size: int, reach=None, plain=None) -> jax.Array:
  """Renders one scene, bit-identical to `render_reference`.

  Args:
    sprites: rows in draw order (later rows cover earlier ones).
    table_tex, background_tex, blend_tex: texture ids (int32 scalars).
    whole_blend: ratio of the blend texture mixed over the whole image.
    image_size: output side in pixels (static).
    reach: static tuple, per row, of `sprite_reach` (m), or None for a row evaluated at
      every pixel; None (default) evaluates every row at every pixel.
    plain: static tuple of bools, per row: True promises a solid, unblended row (pattern
      "solid", blend 0), drawn without the pattern code; None: no such rows.
  Returns:
    uint8 image [image_size, image_size, 3].
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
