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


class DivergenceError(VlaJaxError, RuntimeError):
  """Training produced NaN/inf losses or gradients for too many steps in a row."""


class TrainingStopped(VlaJaxError, RuntimeError):
  """Training stopped on SIGTERM / SIGINT after saving a checkpoint to resume from."""
