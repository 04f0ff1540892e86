"""`PatchEmbed`, the towers' patch stem, is the stride-p convolution it replaces: same
parameters drawn from the same key, same outputs and kernel gradients in float32 and
bfloat16, with and without bias; images of partial patches are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.models.patch_embed import PatchEmbed


def _conv(features, p, use_bias, dtype):
  return nn.Conv(features, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                 dtype=dtype)


@pytest.mark.parametrize("dtype,use_bias,tol", [(jnp.float32, True, 1e-5),
                                                (jnp.float32, False, 1e-5),
                                                (jnp.bfloat16, True, 3e-2)])
def test_patch_embed_equals_strided_conv(dtype, use_bias, tol):
  p, features = 4, 24
  image = jax.random.normal(jax.random.key(1), (2, 16, 12, 3))  # 4 x 3 patches, not square
  ours = PatchEmbed(features, p, use_bias=use_bias, dtype=dtype)
  conv = _conv(features, p, use_bias, dtype)
  params = ours.init(jax.random.key(0), image)
  conv_params = conv.init(jax.random.key(0), image)
  jax.tree.map(np.testing.assert_array_equal, params, conv_params)  # names, shapes, values
  if use_bias:  # zero-initialised; make it count
    params = {"params": {**params["params"], "bias": jnp.arange(features) / features}}

  out, conv_out = ours.apply(params, image), conv.apply(params, image)
  assert out.shape == conv_out.shape == (2, 4, 3, features) and out.dtype == conv_out.dtype
  np.testing.assert_allclose(np.float32(out), np.float32(conv_out), rtol=tol, atol=tol)

  def kernel_grad(module):
    cotangent = jax.random.normal(jax.random.key(2), out.shape)
    return jax.grad(lambda q: jnp.sum(module.apply(q, image).astype(jnp.float32)
                                      * cotangent))(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b),
                                                       rtol=tol, atol=tol * 10),
               kernel_grad(ours), kernel_grad(conv))


def test_patch_embed_refuses_partial_patches():
  image = jnp.zeros((1, 18, 16, 3))
  with pytest.raises(ValueError, match="not a whole number of 4x4 patches"):
    PatchEmbed(8, 4).init(jax.random.key(0), image)
