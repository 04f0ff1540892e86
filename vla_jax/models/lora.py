"""LoRA for any Flax model, without wrapping its modules: factors live in their own tree.

LoRA factors live in their own small tree keyed by the `/`-joined path of the kernel they
adapt; the model's modules and parameter names are unchanged (checkpoints load as
before). The base params stay frozen and the LoRA tree is what the optimizer trains, so
"LoRA or full fine-tune" is a choice of trainable set, not a code path. Two ways to run
the adapted model, equal up to float rounding:
- in the layers (`apply_in_layer`, the train step's default, `lora.in_layer=True`): every
  adapted `nn.Dense` / `nn.DenseGeneral` computes `x @ W + s * (x @ A) @ B`, with the
  factors passed as the `lora` variable collection and added by a method interceptor.
  The frozen W gets no gradient, so the backward pass forms no kernel-sized dL/dW: it
  costs O(tokens * rank * (in + out)) per kernel instead of O(tokens * in * out), as
  openpi's LoRA layers do;
- as a pytree transform (`apply_lora`): the effective parameters
  `kernel + (alpha / rank) * A @ B` (reshaped to the kernel's layout) that the unchanged
  model is applied with. It works for any kernel, also outside Dense layers, but the
  gradient of the materialised kernel is a full dL/dW per adapted kernel.
`merge` / `unmerge` fold the factors into the kernels and back (export).

A kernel of shape [*layers, *in, *out] is seen as an [in, out] matrix: `layers` is a
leading scan axis (scanned blocks get one A/B pair per layer), `in` defaults to the
first remaining axis and can be overridden per path (attention output kernels
[heads, head_dim, D] take two input axes; Gemma's einsum weights put the input axis
elsewhere). Materialising W + dW costs one kernel-sized temporary per adapted kernel;
XLA fuses it into the consumer where it can.
"""

import dataclasses
import functools
import math
import re
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import flat_dense
from vla_jax.typed_config import require

INITS = ("gaussian", "kaiming")

# (regex on the kernel path, input axes counted after the layer axis). First match wins.
DEFAULT_IN_AXES: Tuple[Tuple[str, Tuple[int, ...]], ...] = (
    (r"(^|/)out/kernel$", (0, 1)),  # flax MultiHeadDotProductAttention: [heads, head_dim, D]
    (r"(^|/)attn_vec_einsum/w$", (0, 1)),  # Gemma attention output: [heads, head_dim, D]
    (r"(^|/)q_einsum/w$", (1,)),  # Gemma query: [heads, D, head_dim]
    (r"(^|/)kv_einsum/w$", (2,)),  # Gemma key/value: [2, kv_heads, D, head_dim]
    (r"(^|/)qkv_einsum/w$", (2,)),  # Gemma fused: [3, heads, D, head_dim]
)

# A scanned stack of blocks is a node literally named `layers`, `encoderblock` or
# `blocks` (looped layouts name them `layers_0`, `encoderblock_0`, ...).
DEFAULT_LAYER_AXIS_REGEX = r"(^|/)(layers|encoderblock|blocks)/"

_SHOW = 8


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get LoRA factors, and how (defaults: the paper's rank 32, alpha 16).

  Attributes:
    rank: r, the inner dimension of A [in, r] and B [r, out].
    alpha: the delta is scaled by alpha / rank.
    dropout: rate of dropout on the LoRA path (rows of A, i.e. its input features;
      one mask per call, shared by the batch); only when not deterministic.
    init: "gaussian" (A ~ N(0, (1/rank)^2), PEFT's `init_lora_weights="gaussian"`) or
      "kaiming" (A ~ U(-1/sqrt(in), 1/sqrt(in)), PEFT's default); B is always zero so
      the adapted model starts equal to the base model.
    target_regex: `re.search`ed in each candidate kernel's `/`-joined path.
    kernel_names: leaf names that are candidate kernels (with >= 2 non-layer axes).
    in_axes: ((path regex, input axes), ...) overrides of which non-layer axes are
      the matrix input; the first matching regex wins, default (0,).
    layer_axis_regex: paths matching it have a leading scanned layer axis.
    in_layer: the train step runs the LoRA path inside the Dense layers
      (`apply_in_layer`: no dL/dW for frozen kernels); False materialises
      W + s * A @ B per kernel (`apply_lora`), which also adapts kernels outside
      `nn.Dense` / `nn.DenseGeneral`.
  """
  rank: int = 32
  alpha: float = 16.0
  dropout: float = 0.0
  init: str = "gaussian"
  target_regex: str = r".*"
  kernel_names: Tuple[str, ...] = ("kernel", "w")
  in_axes: Tuple[Tuple[str, Tuple[int, ...]], ...] = DEFAULT_IN_AXES
  layer_axis_regex: str = DEFAULT_LAYER_AXIS_REGEX
  in_layer: bool = True

  def __post_init__(self):
    require(isinstance(self.rank, int) and self.rank > 0,
            f"lora.rank must be a positive int, got {self.rank!r}.")
    require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha!r}.")
    require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
    require(self.init in INITS, f"lora.init must be one of {INITS}, got {self.init!r}.")
    require(isinstance(self.in_layer, bool),
            f"lora.in_layer must be True or False, got {self.in_layer!r}.")
    for key in ("target_regex", "layer_axis_regex"):
      _compile(getattr(self, key), f"lora.{key}")
    # Configs built from JSON/ConfigDicts give lists; normalise to hashable tuples.
    try:
      in_axes = tuple((str(regex), tuple(int(a) for a in axes)) for regex, axes in self.in_axes)
    except (TypeError, ValueError):
      raise ConfigError(f"lora.in_axes must be a sequence of (path regex, (axis, ...)) pairs, "
                        f"got {self.in_axes!r}.") from None
    for regex, axes in in_axes:
      _compile(regex, "lora.in_axes")
      require(len(axes) > 0 and len(set(axes)) == len(axes),
              f"lora.in_axes entry {regex!r} needs distinct input axes, got {axes}.")
    object.__setattr__(self, "in_axes", in_axes)
    object.__setattr__(self, "kernel_names", tuple(self.kernel_names))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _compile(regex: str, key: str) -> "re.Pattern":
  try:
    return re.compile(regex)
  except (re.error, TypeError) as e:
    raise ConfigError(f"{key} is not a valid regular expression: {regex!r} ({e}).") from None


@dataclasses.dataclass(frozen=True)
class LoraTarget:
  """How one kernel is viewed as a matrix: axes are absolute indices into its shape."""
  path: str
  shape: Tuple[int, ...]
  layer_axes: Tuple[int, ...]
  in_axes: Tuple[int, ...]
  out_axes: Tuple[int, ...]

  @property
  def in_size(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def out_size(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)

  @property
  def layer_shape(self) -> Tuple[int, ...]:
    return tuple(self.shape[a] for a in self.layer_axes)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """A jax key path -> "a/b/kernel"."""
  return "/".join(_key_name(k) for k in path)


def _candidates(params: Any, config: LoraConfig) -> Dict[str, Tuple[int, ...]]:
  """Every kernel LoRA could adapt: path -> shape."""
  layer_re = re.compile(config.layer_axis_regex)
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    if not path or _key_name(path[-1]) not in config.kernel_names:
      continue
    layer_dims = 1 if layer_re.search(name) else 0
    if np.ndim(leaf) - layer_dims >= 2:
      found[name] = tuple(np.shape(leaf))
  return found


def _relative_in_axes(path: str, config: LoraConfig) -> Tuple[str, Tuple[int, ...]]:
  """(the in_axes regex that matched `path` or "", its input axes; default (0,))."""
  for regex, axes in config.in_axes:
    if re.search(regex, path):
      return regex, axes
  return "", (0,)


def _target(path: str, shape: Tuple[int, ...], config: LoraConfig) -> LoraTarget:
  layer_dims = 1 if re.search(config.layer_axis_regex, path) else 0
  rank = len(shape) - layer_dims
  regex, relative = _relative_in_axes(path, config)
  bad = [a for a in relative if not -rank <= a < rank]
  if regex and (bad or len(relative) >= rank):
    raise ConfigError(
        f"lora.in_axes entry {regex!r} gives input axes {relative} for '{path}' of shape "
        f"{shape} ({layer_dims} layer axis); they must leave at least one output axis "
        f"among its {rank} non-layer axes. Narrow the regex or fix the axes.")
  in_axes = tuple(sorted(layer_dims + (a % rank) for a in relative))
  out_axes = tuple(a for a in range(layer_dims, len(shape)) if a not in in_axes)
  return LoraTarget(path, shape, tuple(range(layer_dims)), in_axes, out_axes)


def lora_targets(params: Any, config: LoraConfig) -> Dict[str, LoraTarget]:
  """The kernels `config` adapts, path -> LoraTarget (sorted by path).

  Raises ConfigError listing a few candidate kernel paths when `target_regex`
  matches none of them.
  """
  candidates = _candidates(params, config)
  target_re = re.compile(config.target_regex)
  chosen = sorted(p for p in candidates if target_re.search(p))
  if not chosen:
    shown = ", ".join(sorted(candidates)[:_SHOW]) or "(none)"
    more = f", ... ({len(candidates) - _SHOW} more)" if len(candidates) > _SHOW else ""
    raise ConfigError(
        f"lora.target_regex {config.target_regex!r} matches none of the {len(candidates)} "
        f"candidate kernels (leaves named {config.kernel_names} with >= 2 non-layer axes). "
        f"Available: {shown}{more}. Use a regex that matches some of these paths.")
  return {p: _target(p, candidates[p], config) for p in chosen}


def init_lora(key: jax.Array, params: Any, config: LoraConfig) -> Dict[str, Dict[str, jax.Array]]:
  """Fresh LoRA factors for every targeted kernel of `params`.

  Returns:
    {kernel path: {"a": [*L, in, rank], "b": [*L, rank, out]}} in float32, where L is
    the layer axis of scanned kernels (absent otherwise) and in/out are the flattened
    input/output sizes. B is zero, so `apply_lora` initially returns `params` unchanged.
  """
  lora = {}
  for i, (path, target) in enumerate(lora_targets(params, config).items()):
    a_shape = target.layer_shape + (target.in_size, config.rank)
    b_shape = target.layer_shape + (config.rank, target.out_size)
    sub = jax.random.fold_in(key, i)
    if config.init == "gaussian":
      a = jax.random.normal(sub, a_shape, jnp.float32) / config.rank
    else:
      bound = 1.0 / math.sqrt(target.in_size)
      a = jax.random.uniform(sub, a_shape, jnp.float32, -bound, bound)
    lora[path] = {"a": a, "b": jnp.zeros(b_shape, jnp.float32)}
  return lora


def _delta(target: LoraTarget, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """scale * A @ B [*L, in, out] laid out like the kernel [*shape] (float32)."""
  delta = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
  shape = target.shape
  grouped = (target.layer_shape + tuple(shape[x] for x in target.in_axes)
             + tuple(shape[x] for x in target.out_axes))
  order = target.layer_axes + target.in_axes + target.out_axes
  return jnp.transpose(delta.reshape(grouped), np.argsort(order))


def _check_factors(targets: Dict[str, LoraTarget], lora_params: Dict[str, Any],
                   config: LoraConfig) -> None:
  unknown = sorted(set(lora_params) - set(targets))
  if unknown:
    raise InputError(
        f"LoRA factors for {unknown[:_SHOW]} have no matching targeted kernel in params "
        f"(targeted: {sorted(targets)[:_SHOW]}...). Use the LoraConfig and params the "
        f"factors were made with (init_lora).")
  for path, factors in lora_params.items():
    t = targets[path]
    want_a = t.layer_shape + (t.in_size, config.rank)
    want_b = t.layer_shape + (config.rank, t.out_size)
    got_a, got_b = tuple(np.shape(factors["a"])), tuple(np.shape(factors["b"]))
    if got_a != want_a or got_b != want_b:
      raise InputError(
          f"LoRA factors for '{path}' (kernel {t.shape}) should be a {want_a}, b {want_b}; "
          f"got a {got_a}, b {got_b}. Were they made with another rank or in_axes?")


def _dropped(a: jax.Array, rng: Optional[jax.Array], index: int, dropout: float) -> jax.Array:
  """A with LoRA dropout applied: dropping input features of the LoRA path == dropping
  rows of A (one mask per call and kernel, the `index`-th of the sorted paths)."""
  if dropout <= 0.0:
    return a
  keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - dropout,
                              a.shape[:-1] + (1,))
  return jnp.where(keep, a / (1.0 - dropout), 0.0)


def _check_rng(config: LoraConfig, rng: Optional[jax.Array], deterministic: bool,
               caller: str) -> float:
  """The dropout rate to apply; InputError when it needs a key and has none."""
  dropout = 0.0 if deterministic else config.dropout
  if dropout > 0.0 and rng is None:
    raise InputError(f"{caller} with lora.dropout={config.dropout} and deterministic=False "
                     f"needs an rng key; pass rng=... or deterministic=True.")
  return dropout


def _add_deltas(params: Any, lora_params: Dict[str, Any], config: LoraConfig, sign: float,
                rng: Optional[jax.Array], dropout: float) -> Any:
  targets = lora_targets(params, config)
  _check_factors(targets, lora_params, config)
  index = {p: i for i, p in enumerate(sorted(lora_params))}

  def update(path, kernel):
    name = path_str(path)
    if name not in lora_params:
      return kernel
    a = _dropped(lora_params[name]["a"], rng, index[name], dropout)
    delta = _delta(targets[name], a, lora_params[name]["b"], config.scale)
    return (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)

  return jax.tree_util.tree_map_with_path(update, params)


def apply_lora(params: Any, lora_params: Dict[str, Any], config: LoraConfig, *,
               rng: Optional[jax.Array] = None, deterministic: bool = True) -> Any:
  """Effective params: each targeted kernel + (alpha / rank) * reshape(A @ B).

  Args:
    params: the (frozen) base parameter tree; any pytree of arrays.
    lora_params: `init_lora`'s tree (the trainable part).
    config: the LoraConfig the factors were made with.
    rng: dropout key, needed when `not deterministic and config.dropout > 0`.
    deterministic: no dropout when True.

  Returns:
    A tree with the structure and dtypes of `params`.
  """
  dropout = _check_rng(config, rng, deterministic, "apply_lora")
  return _add_deltas(params, lora_params, config, +1.0, rng, dropout)


def merge(params: Any, lora_params: Dict[str, Any], config: LoraConfig) -> Any:
  """Folds the factors into the kernels (deterministic apply_lora), e.g. for export."""
  return _add_deltas(params, lora_params, config, +1.0, None, 0.0)


def unmerge(merged: Any, lora_params: Dict[str, Any], config: LoraConfig) -> Any:
  """Inverse of `merge`: subtracts exactly the delta `merge` added."""
  return _add_deltas(merged, lora_params, config, -1.0, None, 0.0)


# ----------------------------------------------------------------- in-layer LoRA
LORA_COLLECTION = "lora"
_LAYER_KERNEL = "kernel"  # the parameter name of nn.Dense / nn.DenseGeneral


def layer_factors(lora_params: Dict[str, Any], config: LoraConfig, *,
                  rng: Optional[jax.Array] = None, deterministic: bool = True
                  ) -> Dict[str, Any]:
  """The factors as the `lora` variable collection `apply_in_layer` reads.

  Args:
    lora_params: `init_lora`'s tree {kernel path: {"a", "b"}}.
    config: the LoraConfig the factors were made with.
    rng, deterministic: LoRA dropout, exactly as `apply_lora` draws it (same masks).
  Returns:
    A nested tree by module path ({"llm": {"layers": {"attn": {"q_proj": {"a", "b"}}}}}),
    A with dropout applied and B scaled by alpha / rank, so a layer adds (x @ A) @ B.
  Raises:
    ConfigError for a factor whose kernel is not a Dense layer's `kernel` (such kernels
    need the pytree path, lora.in_layer=False).
  """
  dropout = _check_rng(config, rng, deterministic, "layer_factors")
  tree: Dict[str, Any] = {}
  for index, path in enumerate(sorted(lora_params)):
    *modules, leaf = path.split("/")
    if leaf != _LAYER_KERNEL or not modules:
      raise ConfigError(
          f"in-layer LoRA adapts nn.Dense / nn.DenseGeneral kernels (a leaf named "
          f"'{_LAYER_KERNEL}'), but lora.target_regex picked '{path}'. Narrow "
          f"lora.target_regex, or set lora.in_layer=False to adapt it as a pytree transform.")
    node = tree
    for name in modules:
      node = node.setdefault(name, {})
    node["a"] = _dropped(lora_params[path]["a"], rng, index, dropout)
    node["b"] = config.scale * lora_params[path]["b"]
  return tree


def _factor_paths(tree: Dict[str, Any], prefix: Tuple[str, ...] = ()) -> Set[str]:
  if "a" in tree and "b" in tree:
    return {"/".join(prefix + (_LAYER_KERNEL,))}
  return set().union(*(_factor_paths(v, prefix + (k,)) for k, v in tree.items()))


def _layer_axes(module: nn.Module, x: jax.Array) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """(the axes of x a Dense / DenseGeneral contracts, sorted; its output features)."""
  found = flat_dense.dense_axes(module, x.ndim)
  if found is None:
    raise ConfigError(f"in-layer LoRA does not support nn.DenseGeneral with batch_dims "
                      f"('{'/'.join(module.path)}'); set lora.in_layer=False.")
  axes, features = found
  return tuple(sorted(axes)), features


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank_delta(x: jax.Array, a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """(x @ A) @ B for x [T, in], with the gradients autodiff gives, computed differently.

  The factor gradients contract the T rows: dA = x^T @ du, dB = u^T @ dy. Autodiff writes
  them with x and dy as the *left* operands, contracted over their first axis, and
  XLA:CPU then copies each [T, in] activation into transposed layout, fused into the
  elementwise op that produces it (in the step_vs_torch profile a fifth of the LoRA step).
  Here the small [T, rank] operand is on the left and x and dy are read as stored
  (dA = (du^T @ x)^T): the LoRA train step at step_vs_torch's size ran x1.24-1.30 faster.
  """
  return jnp.dot(jnp.dot(x, a, precision=precision), b, precision=precision)


def _low_rank_delta_fwd(x, a, b, precision):
  u = jnp.dot(x, a, precision=precision)
  return jnp.dot(u, b, precision=precision), (x, a, b, u)


def _low_rank_delta_bwd(precision, residuals, dy):
  x, a, b, u = residuals
  contract_rows = (((0,), (0,)), ((), ()))
  du = jax.lax.dot_general(dy, b, (((1,), (1,)), ((), ())), precision=precision)
  db = jax.lax.dot_general(u, dy, contract_rows, precision=precision)
  da = jax.lax.dot_general(du, x, contract_rows, precision=precision).T
  dx = jax.lax.dot_general(du, a, (((1,), (1,)), ((), ())), precision=precision)
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank_delta.defvjp(_low_rank_delta_fwd, _low_rank_delta_bwd)


def _lora_interceptor(config: LoraConfig, used: Set[str], next_fun, args, kwargs, context):
  """Adds s * (x @ A) @ B to the output of every Dense layer holding `lora` factors."""
  out = next_fun(*args, **kwargs)
  module = context.module
  if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
      or not module.has_variable(LORA_COLLECTION, "a")):
    return out
  path = "/".join(module.path + (_LAYER_KERNEL,))
  x = args[0] if args else kwargs["inputs"]
  axes, features = _layer_axes(module, x)
  kernel_rank = len(axes) + len(features)
  regex, relative = _relative_in_axes(path, config)
  if tuple(sorted(a % kernel_rank for a in relative)) != tuple(range(len(axes))):
    raise ConfigError(
        f"lora.in_axes gives '{path}' input axes {relative} (entry {regex or 'default'!r}), "
        f"but the layer contracts the first {len(axes)} axes of its kernel; fix "
        f"lora.in_axes or set lora.in_layer=False.")
  a = module.get_variable(LORA_COLLECTION, "a")
  b = module.get_variable(LORA_COLLECTION, "b")
  in_size = math.prod(x.shape[i] for i in axes)
  if a.shape != (in_size, a.shape[-1]) or b.shape != (a.shape[-1], math.prod(features)):
    raise InputError(f"LoRA factors for '{path}' are a {a.shape}, b {b.shape}; the layer "
                     f"maps {in_size} inputs to {features}. Were they made for another model?")
  dtype = module.dtype or jnp.result_type(x, a)
  batch_ndim = x.ndim - len(axes)
  x = jnp.moveaxis(x, axes, tuple(range(batch_ndim, x.ndim)))
  x = x.reshape(-1, in_size).astype(dtype)  # rows in the order of out's leading axes
  delta = _low_rank_delta(x, a.astype(dtype), b.astype(dtype), module.precision)
  used.add(path)
  return out + delta.reshape(out.shape).astype(out.dtype)


def apply_in_layer(module: nn.Module, params: Any, factors: Dict[str, Any], config: LoraConfig,
                   *args, **kwargs) -> Any:
  """`module.apply` with the LoRA path inside the layers: x @ W + s * (x @ A) @ B.

  Args:
    module: the model (root module; factor paths are relative to it).
    params: its (frozen) base parameters.
    factors: `layer_factors(...)`'s tree.
    config: the LoraConfig (checks each layer's input axes).
    *args, **kwargs: passed to `module.apply`.
  Returns:
    What `module.apply` returns; equal to `module.apply({"params": apply_lora(...)})`
    up to float rounding.
  Raises:
    ConfigError if some factor's kernel was never called as a Dense layer (it would
    otherwise be silently ignored).
  """
  used: Set[str] = set()
  with nn.intercept_methods(functools.partial(_lora_interceptor, config, used)):
    out = module.apply({"params": params, LORA_COLLECTION: factors}, *args, **kwargs)
  unused = sorted(_factor_paths(factors) - used)
  if unused:
    raise ConfigError(
        f"in-layer LoRA found no nn.Dense / nn.DenseGeneral call for {unused[:_SHOW]}: their "
        f"factors would be ignored. Narrow lora.target_regex, or set lora.in_layer=False.")
  return out


def lora_mask(params: Any, config: LoraConfig) -> Any:
  """Tree of bools like `params`: True at the kernels `config` adapts.

  The trainable set is a mask: with a train state holding {"base": params, "lora":
  lora_params}, a LoRA run masks the optimizer with
  `{"base": jax.tree.map(lambda _: False, params), "lora": jax.tree.map(lambda _: True,
  lora_params)}`; this mask says which base kernels those factors modify (e.g. to
  fine-tune exactly the LoRA-targeted kernels in full instead).
  """
  targets = lora_targets(params, config)
  return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path) in targets, params)


def count_params(lora_params: Dict[str, Any]) -> int:
  """Number of trainable LoRA parameters."""
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(lora_params))
