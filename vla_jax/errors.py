"""The exceptions vla_jax raises for bad input, so callers can catch one family.

Every message says what was expected, what was found, and what to do about it.
"""


class VlaJaxError(Exception):
  """Base class of every error vla_jax raises on purpose."""


class ConfigError(VlaJaxError, ValueError):
  """A configuration key is unknown, missing, or inconsistent with another."""


class CheckpointError(VlaJaxError, ValueError):
  """A checkpoint file is unreadable or does not match the model it is loaded into."""


class InputError(VlaJaxError, ValueError):
  """An array passed to a model or function has the wrong shape, dtype or values."""
