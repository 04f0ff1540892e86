"""Visual Representation Alignment: the projector, the losses and teacher-grid matching.

During fine-tuning the student's hidden states at the visual-token positions of one
middle LLM layer (`align_layer`) are mapped by `AlignProjector` into the teacher's
feature space and pulled toward the frozen teacher's patch features by
`alignment_loss` (Kachaev et al., 2025). The total loss is
`loss/action + align_coeff * loss/align`; this module computes `loss/align` only.
Several layers can be aligned at once (`align_layers`, the reference code's
MultiProjector; the paper found one middle layer best): each gets its own frozen,
independently initialised projector (`MultiProjector`) and their losses are summed
(`multi_layer_alignment_loss`); `alignment_from_hidden` handles either case.
The teacher's patch grid must equal the student's token grid: either the teacher sees
the image resized to `teacher_input_size(...)` pixels (`grid_match="resize_input"`, the
paper's choice) or its patch features are resampled (`grid_match="resample_features"`).
Everything here is pure and jittable; shapes are static.
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import ConfigError, InputError
from vla_jax.typed_config import require

LOSSES = ("cosine", "l2", "nt_xent", "kl")
GRID_MATCH_MODES = ("resize_input", "resample_features")

# F.normalize's epsilon: a zero vector normalises to zero instead of NaN.
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """Hyper-parameters of the alignment regulariser (defaults: the paper's recipe).

  Attributes:
    align_layer: index of the LLM layer whose output hidden states are aligned
      (16 of Llama-2-7B's 32).
    align_layers: None (the default: align `align_layer` alone), or a tuple of distinct
      layer indices aligned at once, which then replaces `align_layer`. Each layer has
      its own frozen projector (`MultiProjector`) and `loss/align` is the SUM of the
      per-layer losses, as the reference code's MultiProjector: each layer is pulled as
      hard as a single aligned layer would be, so `align_coeff` keeps its meaning per
      layer (an average would weaken every layer's pull by 1 / len(align_layers)). The
      paper found aligning one middle layer best. A one-layer tuple `(k,)` is exactly
      `align_layer=k` (the same single projector and parameter names).
    align_coeff: lambda in `loss = loss/action + lambda * loss/align`; 0 is plain SFT.
    projector_width: hidden width of the projector MLP.
    projector_dropout: dropout rate inside the projector (only used when trainable).
    projector_trainable: the paper freezes the randomly initialised projector (eval
      mode, so no dropout); a trainable one lets the projector alone absorb the loss.
    loss: "cosine" (paper), "l2", "nt_xent" or "kl".
    temperature: softmax temperature of the "nt_xent" and "kl" losses.
    grid_match: "resize_input" (the teacher sees an image sized so its patch grid is
      the student's) or "resample_features" (its patch grid is resampled).
  """
  align_layer: int = 16
  align_layers: Optional[Tuple[int, ...]] = None
  align_coeff: float = 0.2
  projector_width: int = 2048
  projector_dropout: float = 0.1
  projector_trainable: bool = False
  loss: str = "cosine"
  temperature: float = 0.1
  grid_match: str = "resize_input"

  def __post_init__(self):
    require(isinstance(self.align_layer, int) and self.align_layer >= 0,
            f"align.align_layer must be a layer index >= 0, got {self.align_layer!r}.")
    if self.align_layers is not None:
      layers = self.align_layers
      require(isinstance(layers, tuple) and len(layers) > 0,
              f"align.align_layers must be None (align align.align_layer alone) or a "
              f"non-empty tuple of LLM layer indices such as (8, 16), got {layers!r}.")
      bad = [v for v in layers if not isinstance(v, int) or isinstance(v, bool) or v < 0]
      require(not bad, f"align.align_layers must hold layer indices >= 0, got {layers!r} "
              f"(not valid: {bad!r}).")
      repeated = sorted({v for v in layers if layers.count(v) > 1})
      require(not repeated, f"align.align_layers must not repeat a layer, got {layers!r} "
              f"(repeated: {repeated!r}); list each layer once.")
    require(self.align_coeff >= 0,
            f"align.align_coeff must be >= 0 (0 disables alignment), got {self.align_coeff!r}.")
    require(isinstance(self.projector_width, int) and self.projector_width > 0,
            f"align.projector_width must be a positive int, got {self.projector_width!r}.")
    require(0.0 <= self.projector_dropout < 1.0,
            f"align.projector_dropout must be in [0, 1), got {self.projector_dropout!r}.")
    require(self.loss in LOSSES,
            f"align.loss must be one of {LOSSES}, got {self.loss!r}.")
    require(self.temperature > 0,
            f"align.temperature must be > 0, got {self.temperature!r}.")
    require(self.grid_match in GRID_MATCH_MODES,
            f"align.grid_match must be one of {GRID_MATCH_MODES}, got {self.grid_match!r}.")

  @property
  def layers(self) -> Tuple[int, ...]:
    """The aligned LLM layers: `align_layers`, or `(align_layer,)` when that is None."""
    return self.align_layers if self.align_layers is not None else (self.align_layer,)

  @property
  def multi_layer(self) -> bool:
    """True when several layers are aligned (one projector each, summed losses)."""
    return len(self.layers) > 1

  @property
  def capture(self) -> Union[int, Tuple[int, ...]]:
    """What the student captures (`VLA.__call__(align_layer=...)`): the one layer's
    index, or the tuple of several, so a one-layer run keeps its [B, N, D] output."""
    return self.layers if self.multi_layer else self.layers[0]


# ---------------------------------------------------------------------------------------
# Projector.
# ---------------------------------------------------------------------------------------
def _torch_linear_kernel_init():
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default weight init.

  The projector stays at its random init (it is frozen), so its init distribution is
  part of the method; we reproduce the PyTorch reference's.
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default bias init."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class AlignProjector(nn.Module):
  """LayerNorm -> Dense(width) -> SiLU -> Dropout -> Dense(width) -> SiLU -> Dropout -> Dense.

  Maps student hidden states [B, N, Ds] to the teacher's feature space [B, N, Dt]. It
  always computes in float32 (the loss is an fp32 quantity), whatever the LLM's compute
  dtype. A frozen projector (`trainable=False`, the paper's setting) never applies
  dropout, so it consumes no randomness even when called with `deterministic=False`.

  Attributes:
    teacher_dim: Dt, the teacher's feature width.
    width: hidden width (`AlignConfig.projector_width`).
    dropout: dropout rate (`AlignConfig.projector_dropout`).
    trainable: `AlignConfig.projector_trainable`.
  """
  teacher_dim: int
  width: int = 2048
  dropout: float = 0.1
  trainable: bool = False

  @classmethod
  def from_config(cls, config: AlignConfig, teacher_dim: int, **kwargs) -> "AlignProjector":
    return cls(teacher_dim=teacher_dim, width=config.projector_width,
               dropout=config.projector_dropout, trainable=config.projector_trainable, **kwargs)

  @nn.compact
  def __call__(self, hidden: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """hidden [B, N, Ds] (any float dtype) -> projected [B, N, Dt] float32."""
    deterministic = deterministic or not self.trainable or self.dropout == 0.0
    x = hidden.astype(jnp.float32)
    # torch.nn.LayerNorm's epsilon, as in the reference projector.
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="norm")(x)
    fan_in = x.shape[-1]
    for i, features in enumerate((self.width, self.width, self.teacher_dim)):
      x = nn.Dense(features, dtype=jnp.float32, kernel_init=_torch_linear_kernel_init(),
                   bias_init=_torch_linear_bias_init(fan_in), name=f"fc{i + 1}")(x)
      fan_in = features
      if i < 2:
        x = nn.silu(x)
        x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    return x


class MultiProjector(nn.Module):
  """One frozen `AlignProjector` per aligned layer, `layer_{k}` for LLM layer k.

  Each projector is its own random init (flax derives each submodule's init key from its
  name), as the reference code's MultiProjector builds one projector per layer. Maps a
  sequence of hidden states [B, N, Ds] (in `layers`' order) to a tuple of [B, N, Dt].
  """
  layers: Tuple[int, ...]
  teacher_dim: int
  width: int = 2048
  dropout: float = 0.1
  trainable: bool = False

  @nn.compact
  def __call__(self, hiddens: Sequence[jax.Array], *,
               deterministic: bool = True) -> Tuple[jax.Array, ...]:
    if len(hiddens) != len(self.layers):
      raise InputError(f"MultiProjector for layers {self.layers} got {len(hiddens)} hidden "
                       "states; pass one per aligned layer, in that order.")
    return tuple(
        AlignProjector(self.teacher_dim, self.width, self.dropout, self.trainable,
                       name=f"layer_{layer}")(hidden, deterministic=deterministic)
        for layer, hidden in zip(self.layers, hiddens))


def build_projector(config: AlignConfig, teacher_dim: int) -> nn.Module:
  """The frozen projector(s) of `config`: one `AlignProjector` for one aligned layer (its
  parameter names `norm`, `fc1..fc3` unchanged, so older checkpoints load), a
  `MultiProjector` for several."""
  if not config.multi_layer:
    return AlignProjector.from_config(config, teacher_dim=teacher_dim)
  return MultiProjector(layers=config.layers, teacher_dim=teacher_dim,
                        width=config.projector_width, dropout=config.projector_dropout,
                        trainable=config.projector_trainable)


# ---------------------------------------------------------------------------------------
# Losses. Each takes student [B, N, D], teacher [B, N, D], mask [B, N] | None -> scalar.
# ---------------------------------------------------------------------------------------
def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, eps) along `axis`; finite value and gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def _weights(mask: Optional[jax.Array], shape: Tuple[int, ...]) -> jax.Array:
  """Per-patch weights [B, N] in float32 (all ones without a mask)."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(mask, shape).astype(jnp.float32)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of values [B, N] over the patches where weights [B, N] are nonzero."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cosine_similarity(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Per-patch cosine similarity [B, N] of student, teacher [B, N, D]."""
  return jnp.sum(l2_normalize(student) * l2_normalize(teacher), axis=-1)


def cosine_loss(student: jax.Array, teacher: jax.Array,
                mask: Optional[jax.Array] = None) -> jax.Array:
  """-mean_j cos(u_j, z_j) over (masked) patches: -1 aligned, 0 orthogonal, +1 opposite."""
  cos = cosine_similarity(student, teacher)
  return -_masked_mean(cos, _weights(mask, cos.shape))


def l2_loss(student: jax.Array, teacher: jax.Array,
            mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean over patches of ||u_j - z_j||^2 of the L2-normalised features (= 2 - 2 cos)."""
  diff = l2_normalize(student) - l2_normalize(teacher)
  sq = jnp.sum(jnp.square(diff), axis=-1)
  return _masked_mean(sq, _weights(mask, sq.shape))


def nt_xent_loss(student: jax.Array, teacher: jax.Array, mask: Optional[jax.Array] = None,
                 temperature: float = 0.1) -> jax.Array:
  """InfoNCE over all patches of the batch: student patch j must pick teacher patch j.

  Both sides are L2-normalised; logits are cos / temperature between every student
  patch and every teacher patch of the batch ([B*N, B*N]); the positive of a student
  patch is the teacher patch of the same image and position, every other (unmasked)
  teacher patch is a negative. Masked patches are neither anchors nor negatives.
  """
  b, n, d = student.shape
  u = l2_normalize(student).reshape(b * n, d)
  z = l2_normalize(teacher).reshape(b * n, d)
  weights = _weights(mask, (b, n)).reshape(b * n)
  logits = (u @ z.T) / temperature
  # A large finite negative (not -inf) keeps fully masked rows and their gradients finite.
  logits = jnp.where(weights[None, :] > 0, logits, -1e9)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  positive = jnp.diagonal(log_probs)
  return -jnp.sum(positive * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_loss(student: jax.Array, teacher: jax.Array, mask: Optional[jax.Array] = None,
            temperature: float = 0.1) -> jax.Array:
  """Mean over patches of KL(p_teacher || p_student), p = softmax(normalised feature / T).

  The distributions are over the feature dimension of each patch; features are
  L2-normalised first so the temperature has the same meaning for any feature scale.
  """
  log_p_student = jax.nn.log_softmax(l2_normalize(student) / temperature, axis=-1)
  log_p_teacher = jax.nn.log_softmax(l2_normalize(teacher) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return _masked_mean(kl, _weights(mask, kl.shape))


def _loss_fn(config: AlignConfig) -> Callable[..., jax.Array]:
  if config.loss == "cosine":
    return cosine_loss
  if config.loss == "l2":
    return l2_loss
  if config.loss == "nt_xent":
    return lambda s, t, m: nt_xent_loss(s, t, m, temperature=config.temperature)
  if config.loss == "kl":
    return lambda s, t, m: kl_loss(s, t, m, temperature=config.temperature)
  raise ConfigError(f"align.loss must be one of {LOSSES}, got {config.loss!r}.")


def alignment_loss(config: AlignConfig, student_proj: jax.Array, teacher: jax.Array,
                   mask: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """`loss/align` (unscaled: the caller multiplies by `align_coeff`) and its metrics.

  Args:
    config: chooses the loss (and its temperature).
    student_proj: projected student visual tokens [B, N, Dt] (any float dtype).
    teacher: teacher patch features [B, N, Dt], already on the student's grid. No
      gradient flows into it (stop_gradient is applied here).
    mask: optional [B, N] (bool or 0/1) selecting the patches that count.

  Returns:
    (loss scalar float32, metrics) with "align/cos_sim" (mean per-patch cosine, the
    paper's quantity whatever the loss), "align/student_norm" and "align/teacher_norm"
    (mean per-patch L2 norms before normalisation: a collapse shows up here).
  """
  if student_proj.ndim != 3 or student_proj.shape != teacher.shape:
    raise InputError(
        f"alignment_loss expects student_proj and teacher of equal shape [B, N, D]; got "
        f"{student_proj.shape} and {teacher.shape}. Match the teacher grid to the student's "
        f"(match_teacher_grid) and set the projector's teacher_dim to the teacher width.")
  if mask is not None and tuple(mask.shape) != student_proj.shape[:2]:
    raise InputError(f"alignment_loss expects mask [B, N] = {student_proj.shape[:2]}, got "
                     f"{tuple(mask.shape)}.")
  student = student_proj.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  loss = _loss_fn(config)(student, teacher, mask)
  weights = _weights(mask, student.shape[:2])
  metrics = {
      "align/cos_sim": _masked_mean(cosine_similarity(student, teacher), weights),
      "align/student_norm": _masked_mean(jnp.linalg.norm(student, axis=-1), weights),
      "align/teacher_norm": _masked_mean(jnp.linalg.norm(teacher, axis=-1), weights),
  }
  return loss, metrics


def multi_layer_alignment_loss(config: AlignConfig, student_projs: Sequence[jax.Array],
                               teacher: jax.Array, mask: Optional[jax.Array] = None
                               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """`loss/align` over several layers: the SUM of each layer's `alignment_loss`.

  Args:
    config: its `layers` name the entries of `student_projs`, in order.
    student_projs: one projected [B, N, Dt] per aligned layer.
    teacher, mask: as for `alignment_loss` (one teacher target for every layer).
  Returns:
    (summed loss, metrics): per layer k "loss/align/layer_k", "align/cos_sim/layer_k" and
    "align/student_norm/layer_k"; over layers "align/cos_sim" and "align/student_norm"
    (means: similarities and norms do not add up) and "align/teacher_norm".
  """
  layers = config.layers
  if len(student_projs) != len(layers):
    raise InputError(f"multi_layer_alignment_loss: align.align_layers={layers} but "
                     f"{len(student_projs)} projected hidden states were given.")
  total, metrics, cos, norm = 0.0, {}, [], []
  for layer, projected in zip(layers, student_projs):
    loss, values = alignment_loss(config, projected, teacher, mask)
    total = total + loss
    metrics[f"loss/align/layer_{layer}"] = loss
    for key in ("align/cos_sim", "align/student_norm"):
      metrics[f"{key}/layer_{layer}"] = values[key]
    cos.append(values["align/cos_sim"])
    norm.append(values["align/student_norm"])
    metrics["align/teacher_norm"] = values["align/teacher_norm"]
  metrics["align/cos_sim"] = sum(cos) / len(cos)
  metrics["align/student_norm"] = sum(norm) / len(norm)
  return total, metrics


def alignment_from_hidden(config: AlignConfig, projector: nn.Module, projector_params: Any,
                          align_hidden: Union[jax.Array, Sequence[jax.Array]],
                          teacher: jax.Array, mask: Optional[jax.Array] = None
                          ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The alignment term from the student's captured hidden states, one layer or several.

  Args:
    projector: `build_projector(config, ...)`; projector_params: its (frozen) params.
    align_hidden: the student's `align_hidden` for `config.capture`: [B, N, Ds], or a
      tuple of them for several layers.
    teacher: teacher patch features [B, N, Dt] on the student's grid; mask as above.
  Returns:
    (`loss/align`, metrics): `alignment_loss`'s for one layer (unchanged), else
    `multi_layer_alignment_loss`'s (summed over layers, per-layer metrics).
  """
  projected = projector.apply({"params": projector_params}, align_hidden)
  if config.multi_layer:
    return multi_layer_alignment_loss(config, projected, teacher, mask)
  return alignment_loss(config, projected, teacher, mask)


# ---------------------------------------------------------------------------------------
# Matching the teacher's patch grid to the student's token grid.
# ---------------------------------------------------------------------------------------
def teacher_input_size(student_grid: int, teacher_patch: int) -> int:
  """Image side (pixels) giving a teacher with `teacher_patch` a student_grid^2 grid.

  E.g. a 16x16 student grid: patch 14 (DINOv2) -> 224, patch 16 (RADIO, SigLIP) -> 256.
  """
  if student_grid <= 0 or teacher_patch <= 0:
    raise ConfigError(f"teacher_input_size needs positive student_grid and teacher_patch, "
                      f"got {student_grid} and {teacher_patch}.")
  return student_grid * teacher_patch


def resize_images(images: jax.Array, size) -> jax.Array:
  """Antialiased bilinear resize of images [B, H, W, C] to [B, h, w, C] (size: int or (h, w)).

  Keeps the dtype of `images`; used to give the teacher its `teacher_input_size`.
  """
  if images.ndim != 4:
    raise InputError(f"resize_images expects images [B, H, W, C], got shape {images.shape}.")
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  if (h, w) == tuple(images.shape[1:3]):
    return images
  out = jax.image.resize(images.astype(jnp.float32), (images.shape[0], h, w, images.shape[3]),
                         method="bilinear", antialias=True)
  if jnp.issubdtype(images.dtype, jnp.integer):  # uint8 pixels: round, don't truncate
    out = jnp.clip(jnp.round(out), jnp.iinfo(images.dtype).min, jnp.iinfo(images.dtype).max)
  return out.astype(images.dtype)


def grid_side(count: int) -> Optional[int]:
  """sqrt(count) if `count` tokens form a square grid, else None."""
  side = math.isqrt(count)
  return side if side * side == count and count > 0 else None


def _resample_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights resampling a 1-D row of patch tokens from src to dst cells.

  Token i of an n-cell row summarises the interval [i/n, (i+1)/n] of the image, so it
  sits at the cell centre. The tokens define a field by linear interpolation between
  centres (extended linearly for the half cell beyond the outermost ones); a target
  token is that field at its centre when growing (bilinear), and the field's mean over
  its cell when shrinking (sampled at 2*ceil(src/dst) points: an antialiasing box
  filter). Either way constant and linear fields are reproduced exactly.
  """
  if dst == src:
    return np.eye(dst)
  if src == 1:
    return np.ones((dst, 1))
  samples = 1 if dst > src else 2 * math.ceil(src / dst)
  # Sample points inside each target cell, symmetric about its centre, in [0, 1].
  points = (np.arange(dst)[:, None] + (np.arange(samples)[None, :] + 0.5) / samples) / dst
  pos = points * src - 0.5  # in source index units (cell centres at 0..src-1)
  left = np.clip(np.floor(pos).astype(int), 0, src - 2)
  frac = pos - left
  rows = np.broadcast_to(np.arange(dst)[:, None], pos.shape)
  weights = np.zeros((dst, src))
  np.add.at(weights, (rows, left), (1.0 - frac) / samples)
  np.add.at(weights, (rows, left + 1), frac / samples)
  return weights


def resample_patch_grid(features: jax.Array, student_grid: int) -> jax.Array:
  """Resamples square-grid patch features [B, Nt, D] to [B, student_grid^2, D].

  Separable per axis (see `_resample_matrix`: bilinear between token centres when
  growing, averaged over each target cell when shrinking); computed in float32,
  returned in the input dtype. Tokens are row-major (row, column), as ViTs flatten them.
  """
  b, nt, d = features.shape
  side = grid_side(nt)
  if side is None:
    raise InputError(f"resample_patch_grid expects a square patch grid, got {nt} tokens. Drop "
                     f"class/register tokens before resampling.")
  if side == student_grid:
    return features
  m = jnp.asarray(_resample_matrix(side, student_grid), jnp.float32)
  grid = features.astype(jnp.float32).reshape(b, side, side, d)
  out = jnp.einsum("yh,bhwd,xw->byxd", m, grid, m, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, student_grid * student_grid, d).astype(features.dtype)


def match_teacher_grid(teacher_features: jax.Array, student_count: int,
                       mode: str = "resize_input") -> jax.Array:
  """Returns teacher patch features [B, Nt, D] on the student's grid [B, student_count, D].

  With `mode="resize_input"` the teacher must already produce the student's grid (it
  was given an image of `teacher_input_size(...)` pixels); with "resample_features"
  a different square grid is resampled. Raises ConfigError naming both grids and the
  two fixes otherwise.
  """
  if mode not in GRID_MATCH_MODES:
    raise ConfigError(f"align.grid_match must be one of {GRID_MATCH_MODES}, got {mode!r}.")
  count = teacher_features.shape[1]
  if count == student_count:
    return teacher_features
  t_side, s_side = grid_side(count), grid_side(student_count)

  def describe(n, side):
    return f"{side}x{side} ({n} tokens)" if side else f"{n} tokens (not a square grid)"

  fixes = (f"Fix: resize the teacher's input to teacher_input_size({s_side or '<student grid>'}, "
           f"<teacher patch size>) pixels with align.grid_match='resize_input', or set "
           f"align.grid_match='resample_features' to resample the teacher's patch grid.")
  grids = (f"teacher grid {describe(count, t_side)} vs student grid "
           f"{describe(student_count, s_side)}")
  if t_side is None or s_side is None:
    raise ConfigError(f"Cannot match the teacher's patch grid to the student's: {grids}; both "
                      f"must be square grids (drop class/register tokens first). {fixes}")
  if mode == "resize_input":
    raise ConfigError(f"align.grid_match='resize_input' needs equal grids, got {grids}. {fixes}")
  return resample_patch_grid(teacher_features, s_side)
