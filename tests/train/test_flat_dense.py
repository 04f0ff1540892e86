"""`flat_dense.flat_dense_layers`: Dense / DenseGeneral layers inside it give the same
outputs and gradients as the layers themselves (every handled and unhandled kind, fp32
and bf16, and the tiny VLA student's whole forward), and their kernel gradient is one
contraction over rows."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import make_batch
from vla_jax.models import flat_dense
from vla_jax.train import step as step_lib


class Layers(nn.Module):
  """One of each kind: Dense, DenseGeneral to heads, from heads, and two it must leave
  to flax (batch dims; contracted axes not trailing)."""
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):  # x [B, T, 12]
    h = nn.Dense(16, dtype=self.dtype)(x)
    heads = nn.DenseGeneral((4, 6), axis=-1, dtype=self.dtype)(jnp.tanh(h))
    merged = nn.DenseGeneral(12, axis=(-2, -1), use_bias=False, dtype=self.dtype)(heads)
    batched = nn.DenseGeneral(5, axis=-1, batch_dims=(0,), dtype=self.dtype)(merged)
    leading = nn.DenseGeneral(3, axis=1, dtype=self.dtype)(jnp.moveaxis(batched, 1, -1))
    return jnp.sum(jnp.sin(leading.astype(jnp.float32))) + jnp.sum(merged ** 2)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_layers_give_the_same_values_and_gradients(dtype, tol):
  model = Layers(dtype)
  x = jax.random.normal(jax.random.key(0), (2, 7, 12))
  with flat_dense.flat_dense_layers():  # init inside is plain flax init
    params = model.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, model.init(jax.random.key(1), x))
  # A new function each time: jit caches traces by function, not by the context.
  value_and_grads = lambda: jax.jit(jax.value_and_grad(
      lambda p, inputs: model.apply(p, inputs), argnums=(0, 1)))
  plain = value_and_grads()(params, x)
  with flat_dense.flat_dense_layers():
    ours = value_and_grads()(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.float32(a), np.float32(b), rtol=tol, atol=tol), ours, plain)


def _kernel_gradient_contractions(text):
  """The contracting dims of every dot_general producing a [16, 12] array (the Dense's
  kernel gradient, dy^T x), from lowered StableHLO."""
  return re.findall(r"dot_general .*contracting_dims = (\[[\d, ]*\]) x .*-> tensor<16x12xf32>",
                    text)


def test_kernel_gradient_is_one_contraction_over_rows():
  model = nn.Dense(16)
  x = jnp.ones((2, 5, 12))
  params = model.init(jax.random.key(0), x)
  grad = lambda: jax.jit(lambda p: jax.grad(lambda p: jnp.sum(jnp.tanh(model.apply(p, x))))(p))
  assert _kernel_gradient_contractions(grad().lower(params).as_text()) == ["[0, 1]"]
  with flat_dense.flat_dense_layers():
    assert _kernel_gradient_contractions(grad().lower(params).as_text()) == ["[0]"]


def test_student_forward_gradients_equal_the_layers_own(tiny_setup):
  experiment, models, params = tiny_setup
  del experiment
  batch = jax.tree.map(jnp.asarray, make_batch(0))
  prefix = step_lib.supervised_prefix_mask(batch["input_mask"], batch["loss_mask"])

  def loss(p, flat):
    if flat:  # what the train step runs
      logits = step_lib.student_forward(models.student, p, batch)["logits"]
    else:
      logits = models.student.apply({"params": p}, batch["images"], batch["tokens"],
                                    batch["input_mask"], prefix_mask=prefix)["logits"]
    return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 7])

  ours = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params["student"])
  plain = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params["student"])
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               ours[1], plain[1])
