"""Dense layers computed as one 2-D matmul over all leading axes, for training.

Inside `flat_dense_layers()`, every applied `nn.Dense` and `nn.DenseGeneral` whose kernel
contracts the input's trailing axes (no batch dims, no custom dot_general) computes
`x.reshape(rows, in) @ kernel.reshape(in, out)`, reshaped back: the same values, from the
parameters the layer itself created (the context changes no parameter, name or init).

Why: autodiff then forms the kernel gradient as one contraction over `rows`. With the
layer's own N-D `dot_general` it contracts the gradient and the input over all their
leading axes ([batch, tokens]: two contracting dimensions), and XLA:CPU laid that out by
transposing the gradient inside the element-wise fusion that produces it (the SiLU /
GELU backward of the MLPs, read column by column). The 64 px full-fine-tuning step runs
x1.06-1.07 faster (README, "Train step vs the PyTorch reference"). LoRA runs do not need
it: frozen kernels get no gradient, and the factors flatten their input already
(`lora._lora_interceptor`).
"""

import contextlib
import math
from typing import Iterator, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp


def dense_axes(module: nn.Module, ndim: int) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
  """(the input axes a Dense / DenseGeneral contracts, in its kernel's order; its output
  features), for an input of `ndim` axes; None for a DenseGeneral with batch dims."""
  if isinstance(module, nn.Dense):
    return (ndim - 1,), (module.features,)
  if module.batch_dims:
    return None
  axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  features = module.features if isinstance(module.features, tuple) else (module.features,)
  return tuple(a % ndim for a in axes), tuple(features)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  # Exact types: a subclass may compute something else.
  if (context.method_name != "__call__"
      or type(module) not in (nn.Dense, nn.DenseGeneral)  # pylint: disable=unidiomatic-typecheck
      or module.dot_general is not None or module.dot_general_cls is not None
      or not module.has_variable("params", "kernel")):
    return next_fun(*args, **kwargs)
  inputs = args[0] if args else kwargs["inputs"]
  found = dense_axes(module, inputs.ndim)
  if found is None or found[0] != tuple(range(inputs.ndim - len(found[0]), inputs.ndim)):
    return next_fun(*args, **kwargs)  # batch dims, or contracted axes not the trailing ones
  axes, features = found
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  lead = inputs.shape[:inputs.ndim - len(axes)]
  size_in = math.prod(inputs.shape[i] for i in axes)
  y = jnp.dot(inputs.reshape(-1, size_in), kernel.reshape(size_in, -1),
              precision=module.precision).reshape(*lead, *features)
  return y if bias is None else y + bias.reshape(features)


@contextlib.contextmanager
def flat_dense_layers() -> Iterator[None]:
  """Within this context, applied Dense / DenseGeneral layers run as 2-D matmuls."""
  with nn.intercept_methods(_interceptor):
    yield
