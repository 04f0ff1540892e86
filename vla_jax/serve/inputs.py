"""A request of either protocol -> one checked `Query` (image, prompt, state, stats key).

openpi clients send an observation dict whose keys depend on the robot (`ObservationKeys`:
LIBERO's "observation/image" by default, DROID's exterior camera and joint + gripper
positions with `droid`, any others by name); OpenVLA's REST clients send {"image",
"instruction", "unnorm_key"}. Both are checked here, before they reach a batch, so a bad
request is an `InputError` for its own client only: a uint8 RGB image [H, W, 3], a
UTF-8 prompt of bounded length, a finite state of the size the policy reads.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from vla_jax.errors import ConfigError, InputError


@dataclasses.dataclass(frozen=True)
class ObservationKeys:
  """Where an openpi observation keeps the camera image, the robot state and the prompt.

  A key is looked up as written, then as a "/"-separated path into nested dicts. The
  state is the concatenation of the `state` entries (DROID sends joints and gripper apart);
  it is optional unless the policy reads robot state (`proprio_dims`).
  """
  image: str = "observation/image"
  state: Tuple[str, ...] = ("observation/state",)
  prompt: str = "prompt"


OBSERVATION_KEYS = {
    "libero": ObservationKeys(),
    "droid": ObservationKeys(image="observation/exterior_image_1_left",
                             state=("observation/joint_position",
                                    "observation/gripper_position")),
}


def observation_keys(spec: str) -> ObservationKeys:
  """Parses `--serve_obs_keys`: a preset name or `image=KEY,state=KEY+KEY,prompt=KEY`.

  Fields left out of the second form keep the LIBERO defaults.
  """
  if spec in OBSERVATION_KEYS:
    return OBSERVATION_KEYS[spec]
  fields = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in ("image", "state", "prompt") or not value:
      raise ConfigError(f"observation keys {spec!r}: expected a preset {sorted(OBSERVATION_KEYS)} "
                        "or 'image=KEY,state=KEY[+KEY],prompt=KEY', got item {item!r}.")
    fields[name] = tuple(value.split("+")) if name == "state" else value
  return dataclasses.replace(ObservationKeys(), **fields)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a single request may carry (the byte size is limited by the server itself)."""
  max_prompt_chars: int = 512  # every new prompt length can cost a compile
  max_image_side: int = 4096


@dataclasses.dataclass
class Query:
  """One checked request: the policy's inputs for one robot at one step."""
  image: np.ndarray  # uint8 [H, W, 3]
  prompt: str
  state: Optional[np.ndarray]  # float64 [D], or None when the policy reads no state
  unnorm_key: str  # normalisation statistics to un-normalise with; "" = the default


def _lookup(obs: Mapping[str, Any], key: str, what: str, keys_flag: bool) -> Any:
  if key in obs:
    return obs[key]
  node = obs
  for part in key.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      hint = (" or start the server with --serve_obs_keys naming your client's keys "
              "(presets: libero, droid)" if keys_flag else "")
      raise InputError(f"the request has no {what} under {key!r} (its keys: "
                       f"{sorted(map(str, obs))}); send it{hint}.")
    node = node[part]
  return node


def check_image(image: Any, limits: Limits, where: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] RGB, else an InputError that says how to convert the frame."""
  if not isinstance(image, np.ndarray):
    raise InputError(f"{where} must be a numpy uint8 array [H, W, 3], got a "
                     f"{type(image).__name__}; send the camera frame as a numpy array.")
  if image.dtype != np.uint8:
    raise InputError(f"{where} must be uint8 [H, W, 3] (0..255 RGB), got {image.dtype} "
                     f"{list(image.shape)}; convert float frames with "
                     "(255 * frame).round().astype(np.uint8).")
  if image.ndim != 3 or image.shape[-1] != 3:
    hint = (" (channels first? send frame.transpose(1, 2, 0))"
            if image.ndim == 3 and image.shape[0] == 3 else "")
    raise InputError(f"{where} must be uint8 [H, W, 3] (one RGB frame), got shape "
                     f"{list(image.shape)}{hint}.")
  if min(image.shape[:2]) < 1 or max(image.shape[:2]) > limits.max_image_side:
    raise InputError(f"{where} is {image.shape[0]}x{image.shape[1]} px; the server takes 1 to "
                     f"{limits.max_image_side} px per side.")
  return image


def check_prompt(prompt: Any, limits: Limits, where: str = "prompt") -> str:
  """A non-empty UTF-8 string of at most `limits.max_prompt_chars` characters."""
  if isinstance(prompt, (bytes, np.bytes_)):
    try:
      prompt = bytes(prompt).decode("utf-8")
    except UnicodeDecodeError as e:
      raise InputError(f"{where} is not valid UTF-8 ({e}); send the instruction as UTF-8 "
                       "text.") from None
  if not isinstance(prompt, str):
    raise InputError(f"{where} must be a string, got {type(prompt).__name__}.")
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:  # lone surrogates, e.g. from a JSON "\udcff" escape
    raise InputError(f"{where} is not valid UTF-8 text ({e}).") from None
  if not prompt.strip():
    raise InputError(f"{where} is empty; send the task instruction.")
  if len(prompt) > limits.max_prompt_chars:
    raise InputError(f"{where} has {len(prompt)} characters; the server takes at most "
                     f"{limits.max_prompt_chars}.")
  return str(prompt)


def check_state(parts: Sequence[Any], state_dim: Optional[int], where: str) -> np.ndarray:
  """Concatenated finite float vector; [state_dim] when the policy reads state."""
  arrays = []
  for part in parts:
    if isinstance(part, (list, tuple, int, float, np.number)):
      part = np.asarray(part)
    if not isinstance(part, np.ndarray) or part.dtype.kind not in "biuf":
      raise InputError(f"{where} must be numeric (a numpy array or list of numbers), got "
                       f"{type(part).__name__}.")
    arrays.append(part.astype(np.float64).reshape(-1))
  state = np.concatenate(arrays) if arrays else np.zeros(0)
  if not np.all(np.isfinite(state)):
    raise InputError(f"{where} holds NaN or inf ({state.tolist()}); send the robot's measured "
                     "state.")
  if state_dim is not None and state.shape != (state_dim,):
    raise InputError(f"{where} has {state.size} values; this policy reads a robot state of "
                     f"{state_dim} (the training data's), send exactly that.")
  return state


def _optional_state(obs: Mapping[str, Any], keys: Sequence[str], state_dim: Optional[int],
                    keys_flag: bool) -> Optional[np.ndarray]:
  present = [k for k in keys if _has(obs, k)]
  if state_dim is None and not present:
    return None  # the policy reads no state and none was sent
  parts = [_lookup(obs, k, "robot state", keys_flag) for k in keys]
  return check_state(parts, state_dim, f"state {'+'.join(keys)}")


def _has(obs: Mapping[str, Any], key: str) -> bool:
  try:
    _lookup(obs, key, "", False)
    return True
  except InputError:
    return False


def parse_observation(obs: Any, keys: ObservationKeys, state_dim: Optional[int],
                      limits: Limits = Limits()) -> Query:
  """An openpi observation dict -> Query (default statistics).

  Args:
    obs: the unpacked request.
    keys: where the image, state and prompt are.
    state_dim: the robot-state size the policy reads, None if it reads none (a state
      sent anyway is still checked for NaN).
  """
  if not isinstance(obs, Mapping):
    raise InputError(f"an openpi request is an observation dict, got {type(obs).__name__}.")
  image = check_image(_lookup(obs, keys.image, "image", True), limits, f"image {keys.image!r}")
  prompt = check_prompt(_lookup(obs, keys.prompt, "prompt", True), limits,
                        f"prompt {keys.prompt!r}")
  state = _optional_state(obs, keys.state, state_dim, True)
  return Query(image, prompt, state if state_dim is not None else None, "")


def parse_act_payload(payload: Any, unnorm_keys: Sequence[str], state_dim: Optional[int],
                      limits: Limits = Limits()) -> Query:
  """An OpenVLA `/act` body {"image", "instruction", "unnorm_key"?, "state"?} -> Query.

  `state` is our extension for policies trained with robot state; OpenVLA sends none.
  """
  if not isinstance(payload, Mapping):
    raise InputError(f"the /act body must be a JSON object {{'image', 'instruction', "
                     f"'unnorm_key'?}}, got {type(payload).__name__}.")
  unknown = sorted(set(payload) - {"image", "instruction", "unnorm_key", "state"})
  if unknown:
    raise InputError(f"the /act body has unknown keys {unknown}; it takes 'image', "
                     "'instruction', optional 'unnorm_key' and 'state'.")
  image = check_image(_lookup(payload, "image", "image", False), limits)
  prompt = check_prompt(_lookup(payload, "instruction", "instruction", False), limits,
                        "instruction")
  key = payload.get("unnorm_key") or ""
  if key and key not in unnorm_keys:
    raise InputError(f"unnorm_key {key!r} is not in this checkpoint; it has statistics for "
                     f"{sorted(unnorm_keys)}. Pass one of them, or none for the default.")
  state = _optional_state(payload, ("state",), state_dim, False)
  return Query(image, prompt, state if state_dim is not None else None, str(key))
