"""The patch stem every ViT-like tower shares: a p x p, stride-p convolution, as a matmul.

`PatchEmbed` has exactly `nn.Conv(features, (p, p), strides=(p, p), padding="VALID")`'s
parameters (`kernel` [p, p, C, features], optional `bias`, the same initialisers), so
big_vision / HF / timm checkpoints load unchanged and the same key draws the same
weights. It computes the convolution as one dot of the flattened patches with the
flattened kernel. Why not the convolution: XLA:CPU computes a convolution's kernel
gradient as a dilated convolution, 11 ms in one op of a full-fine-tuning step at 64 px;
as a dot it is a plain matmul, and the step's wall time fell 8 ms (of 205; README, "Train
step vs the PyTorch reference").
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def patchify(image: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]: row-major patches, each flattened (row,
  column, channel) with the channel fastest: a p x p conv kernel's [p, p, C] order, and
  how transformers' Siglip2 image processor (`convert_image_to_patches`) lays them out."""
  b, h, w, c = image.shape
  x = image.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class PatchEmbed(nn.Module):
  """[B, H, W, C] -> [B, H / p, W / p, features]; H and W must be multiples of p."""
  features: int
  patch_size: int
  use_bias: bool = True
  dtype: Optional[Any] = None  # compute dtype; None -> the promoted input/param dtype
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    p = self.patch_size
    batch, height, width, channels = image.shape
    if height % p or width % p:
      raise ValueError(f"PatchEmbed: image {height}x{width} is not a whole number of "
                       f"{p}x{p} patches; resize it to a multiple of {p}.")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, channels, self.features), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    image, kernel, bias = nn.dtypes.promote_dtype(image, kernel, bias, dtype=self.dtype)
    x = jnp.dot(patchify(image, p), kernel.reshape(p * p * channels, self.features))
    x = x.reshape(batch, height // p, width // p, self.features)
    return x if bias is None else x + bias
