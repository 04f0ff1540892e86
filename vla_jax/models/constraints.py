"""Activation sharding constraints at block boundaries, active only under a mesh.

The models call `shard_batch_axis` on the activations between transformer blocks, so
that XLA's sharding propagation keeps the batch split over the data-parallel mesh axes
("data", "fsdp") through every block instead of choosing a layout of its own (with FSDP
it may otherwise all-gather activations to follow a weight's sharding). The jitted
train and eval steps trace the models under the mesh (`vla_jax.train.sharding`); traced
anywhere else (one device, evaluation, serving, tests) this is the identity.
"""

import math

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")


def shard_batch_axis(x: jax.Array) -> jax.Array:
  """`x` with its leading (batch) axis pinned to the current mesh's data-parallel axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  # A batch that does not divide (a single prompt being decoded) stays as XLA lays it out.
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))
