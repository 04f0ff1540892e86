"""Device mesh, parameter partitioning by rules, batch sharding and the sharded jit.

The mesh has three named axes: `data` (pure data parallelism: parameters replicated),
`fsdp` (data parallelism with parameters, gradients and optimizer state sharded) and
`tensor` (attention heads / MLP hidden units split across devices). A parameter's
PartitionSpec comes from, in order: a regex override from the config; a tensor-parallel
rule (which axis of an attention or MLP kernel is split over `tensor`); then FSDP, which
puts the largest remaining axis divisible by the `fsdp` size on `fsdp` when the array is
above a size floor (small arrays stay replicated: sharding them costs more in
communication than it saves). The rules read only paths and shapes, so the same
function shards the student, the teacher, the LoRA factors and the optimizer state
(whose leaves end in the same paths). Batches are split over (`data`, `fsdp`).
"""

import dataclasses
import functools
import logging
import math
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vla_jax.errors import ConfigError, InputError
from vla_jax.models import lora as lora_lib
from vla_jax.models.constraints import BATCH_AXES  # the batch axes, shared with the models
from vla_jax.typed_config import require

AXES = ("data", "fsdp", "tensor")

# (path regex, axis split over `tensor`), first match wins; negative axes so that a
# leading scan axis of stacked layers does not shift them. Column-parallel kernels
# split their output features, row-parallel ones their input features, so an
# attention or MLP block needs one all-reduce.
TENSOR_RULES: Tuple[Tuple[str, int], ...] = (
    # Llama / Gemma decoder.
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", -1),
    (r"(o_proj|down_proj)/kernel$", -2),
    (r"(q_einsum|kv_einsum|qkv_einsum)/w$", -3),  # [..., heads, D, head_dim]
    (r"attn_vec_einsum/w$", -3),  # [heads, head_dim, D]
    (r"mlp/gating_einsum$", -1),
    (r"mlp/linear$", -2),
    (r"lm_head/kernel$", -1),  # [D, vocab]
    (r"(input_embedding|embedder/embedding)$", -2),  # [vocab, D]
    # ViTs (SigLIP big_vision names, DINOv2, C-RADIO): qkv [D, heads, head_dim], out
    # [heads, head_dim, D].
    (r"(query|key|value)/kernel$", -2),
    (r"(MultiHeadDotProductAttention_0|attn)/out/kernel$", -3),
    (r"(MlpBlock_0/Dense_0|mlp/fc1)/kernel$", -1),
    (r"(MlpBlock_0/Dense_1|mlp/fc2)/kernel$", -2),
)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """Mesh sizes and partition rules.

  Attributes:
    data, fsdp, tensor: mesh axis sizes; exactly one may be -1 (all remaining devices).
    fsdp_min_size: arrays with fewer elements stay replicated over `fsdp`.
    overrides: ((path regex, spec), ...) checked first; a spec is a tuple with one entry
      per array axis, each None, an axis name or a tuple of names, e.g.
      (("lm_head/kernel$", (None, "tensor")),).
    tensor_rules: apply `TENSOR_RULES` when the `tensor` axis has size > 1.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  fsdp_min_size: int = 2 ** 18
  overrides: Tuple[Tuple[str, Tuple[Any, ...]], ...] = ()
  tensor_rules: bool = True

  def __post_init__(self):
    sizes = {axis: getattr(self, axis) for axis in AXES}
    for axis, size in sizes.items():
      require(isinstance(size, int) and (size == -1 or size >= 1),
              f"sharding.{axis} must be a positive int or -1 (the rest), got {size!r}.")
    require(sum(size == -1 for size in sizes.values()) <= 1,
            f"at most one mesh axis may be -1, got {sizes}.")
    require(isinstance(self.fsdp_min_size, int) and self.fsdp_min_size >= 0,
            f"sharding.fsdp_min_size must be an int >= 0, got {self.fsdp_min_size!r}.")
    overrides = []
    for entry in self.overrides:
      try:
        regex, spec = entry
        re.compile(regex)
      except (TypeError, ValueError, re.error):
        raise ConfigError(f"sharding.overrides entries must be (path regex, spec tuple); got "
                          f"{entry!r}.") from None
      overrides.append((regex, tuple(tuple(s) if isinstance(s, list) else s for s in spec)))
    object.__setattr__(self, "overrides", tuple(overrides))


def mesh_shape(config: ShardingConfig, num_devices: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) sizes with -1 resolved; ConfigError if they do not fit."""
  sizes = [getattr(config, axis) for axis in AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f"mesh axes {dict(zip(AXES, sizes))} need a device count divisible by "
                        f"{fixed}, but there are {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices but "
                      f"{num_devices} are available; make the product equal or set one axis "
                      "to -1.")
  return tuple(sizes)


def make_mesh(config: ShardingConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  auto = (AxisType.Auto,) * len(AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def _axis_size(mesh: Mesh, names) -> int:
  names = (names,) if isinstance(names, str) else tuple(names or ())
  return math.prod(mesh.shape[n] for n in names)


def partition_spec(path: str, shape: Tuple[int, ...], mesh: Mesh,
                   config: ShardingConfig) -> PartitionSpec:
  """The PartitionSpec of one array from its `/`-joined path and shape."""
  for regex, spec in config.overrides:
    if re.search(regex, path):
      if len(spec) != len(shape):
        raise ConfigError(f"sharding.overrides {regex!r} gives spec {spec} ({len(spec)} axes) "
                          f"for '{path}' of shape {shape}; give one entry per axis.")
      for dim, names in zip(shape, spec):
        if names is not None and dim % _axis_size(mesh, names):
          raise ConfigError(f"sharding.overrides {regex!r} splits an axis of size {dim} of "
                            f"'{path}' over {names} (size {_axis_size(mesh, names)}), which "
                            "does not divide it.")
      return PartitionSpec(*spec)
  spec = [None] * len(shape)
  tensor = mesh.shape["tensor"]
  if config.tensor_rules and tensor > 1:
    for regex, axis in TENSOR_RULES:
      if re.search(regex, path) and -len(shape) <= axis < len(shape):
        if shape[axis] % tensor == 0:
          spec[axis] = "tensor"
        break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and math.prod(shape) >= config.fsdp_min_size:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
    if free:
      largest = max(free, key=lambda i: (shape[i], -i))
      spec[largest] = "fsdp"
  return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, config: ShardingConfig) -> Any:
  """NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
  def one(path, leaf):
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))
    return NamedSharding(mesh, partition_spec(lora_lib.path_str(path), shape, mesh, config))
  return jax.tree_util.tree_map_with_path(one, tree)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, config: ShardingConfig,
                 *args: Any, donate: bool = False) -> Tuple[Any, Any]:
  """Runs `init_fn(*args)` jitted so that every output is created already sharded.

  Args:
    donate: donate `args` (e.g. the loaded params a train state is built from), so
      their buffers can become the outputs' instead of coexisting with a copy.
  Returns:
    (outputs, their shardings); outputs are never gathered on a single device.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, config)
  donate_argnums = tuple(range(len(args))) if donate else ()
  return jax.jit(init_fn, out_shardings=shardings, donate_argnums=donate_argnums)(*args), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"); the other axes replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """ConfigError unless every micro-batch splits evenly over the data-parallel devices."""
  size = data_parallel_size(mesh)
  if batch_size % (size * grad_accum_steps):
    raise ConfigError(
        f"global batch size {batch_size} does not split over the mesh: data x fsdp = "
        f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {size} devices"
        + (f" for each of {grad_accum_steps} micro-batches" if grad_accum_steps > 1 else "")
        + f". Use a batch size that is a multiple of {size * grad_accum_steps}, or change "
        "the mesh (sharding.data / sharding.fsdp).")


def shard_batch(batch: Dict[str, Any], mesh: Mesh) -> Dict[str, jax.Array]:
  """Host-local numpy batch -> global jax arrays split over ("data", "fsdp").

  On one host this is a device_put; on several, each host passes its own slice
  (`jax.make_array_from_process_local_data`) and the global batch is their union.
  """
  sharding = batch_sharding(mesh)
  local = data_parallel_size(mesh) // jax.process_count()
  for key, value in batch.items():
    if np.shape(value)[0] % max(local, 1):
      raise InputError(f"batch['{key}'] has {np.shape(value)[0]} rows on this host, not a "
                       f"multiple of its {local} data-parallel devices.")
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


# What `initialize_distributed` reads to start processes by hand (localhost, a cluster
# without a scheduler JAX detects). JAX itself reads only the coordinator address; the
# count and the id otherwise come from SLURM / Open MPI / TPU metadata.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_settings(environ: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """The `jax.distributed.initialize` arguments given in the environment ({} if none).

  JAX_NUM_PROCESSES and JAX_PROCESS_ID come together and need JAX_COORDINATOR_ADDRESS
  (host:port of process 0); without them the cluster is auto-detected, and a lone
  JAX_COORDINATOR_ADDRESS is left to JAX (it combines it with what it detects).
  """
  environ = os.environ if environ is None else environ
  given = {name: environ[name] for name in DISTRIBUTED_ENV if environ.get(name, "") != ""}
  if not ({"JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & set(given)):
    return {}
  missing = [name for name in DISTRIBUTED_ENV if name not in given]
  if missing:
    raise ConfigError(
        f"multi-process settings are half given: {', '.join(f'{k}={v}' for k, v in given.items())}"
        f" but {', '.join(missing)} unset. Set all of {', '.join(DISTRIBUTED_ENV)} (e.g. "
        "JAX_COORDINATOR_ADDRESS=localhost:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 on the "
        "first process), or none of them to let JAX detect the cluster (SLURM, TPU pods).")
  try:
    count, index = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
  except ValueError:
    raise ConfigError(f"JAX_NUM_PROCESSES={given['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                      f"{given['JAX_PROCESS_ID']!r} must be integers.") from None
  if not (count >= 1 and 0 <= index < count):
    raise ConfigError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count}).")
  if ":" not in given["JAX_COORDINATOR_ADDRESS"]:
    raise ConfigError(f"JAX_COORDINATOR_ADDRESS={given['JAX_COORDINATOR_ADDRESS']!r} must be "
                      "host:port (the address process 0 listens on), e.g. localhost:1234.")
  return {"coordinator_address": given["JAX_COORDINATOR_ADDRESS"], "num_processes": count,
          "process_id": index}


def initialize_distributed(enabled: bool) -> None:
  """`jax.distributed.initialize` when enabled, before any other JAX call.

  The settings come from `distributed_settings()` (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID) or, when those are unset, from the cluster JAX
  detects. Not enabled, but JAX_NUM_PROCESSES / JAX_PROCESS_ID set: ConfigError, since
  each process would otherwise train alone and fight over the workdir.
  """
  settings = distributed_settings()
  if not enabled:
    if settings:
      raise ConfigError("JAX_NUM_PROCESSES / JAX_PROCESS_ID are set but config.distributed is "
                        "False; pass --config.distributed=True (or unset them for a "
                        "single-process run).")
    return
  jax.distributed.initialize(**settings)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
  """`fn` traced with `mesh` as the current (abstract) mesh, which turns on the models'
  activation sharding constraints; called outside a trace it behaves the same."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings: Any,
                   frozen_shardings: Any) -> Callable:
  """`train_step` jitted with in/out shardings on `mesh`; the input state is donated.

  The batch is split over ("data", "fsdp"), metrics come back replicated; the models are
  traced under the mesh, so their block boundaries keep the batch split there too
  (`models.constraints.shard_batch_axis`).
  """
  return jax.jit(traced_under(mesh, train_step),
                 in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, mesh: Mesh, state_shardings: Any,
                  frozen_shardings: Any) -> Callable:
  """`eval_step` jitted like `jit_train_step`, without donation."""
  return jax.jit(traced_under(mesh, eval_step),
                 in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
