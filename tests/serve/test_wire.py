"""openpi's msgpack-numpy wire format: round trips and refusals (no server, no model)."""

import msgpack
import numpy as np
import pytest

from vla_jax.errors import InputError
from vla_jax.serve import wire


def test_round_trip_keeps_arrays_scalars_and_nesting():
  obs = {"observation/image": np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
         "state": np.array([0.5, np.nan], np.float32), "step": np.int64(3),
         "nested": {"prompt": "put the carrot on the plate", "list": [1, 2.5]}}
  back = wire.unpackb(wire.packb(obs))
  np.testing.assert_array_equal(back["observation/image"], obs["observation/image"])
  assert back["observation/image"].dtype == np.uint8
  np.testing.assert_array_equal(back["state"], obs["state"])
  assert back["step"] == 3 and back["step"].dtype == np.int64
  assert back["nested"] == obs["nested"]


def test_arrays_travel_as_openpis_tagged_maps_with_bin_keys():
  raw = msgpack.unpackb(wire.packb({"a": np.zeros((2, 3), np.float32)}), raw=False)["a"]
  assert raw[b"__ndarray__"] is True and raw[b"dtype"] == "<f4" and raw[b"shape"] == [2, 3]
  assert raw[b"data"] == bytes(24)
  # str keys (other msgpack-numpy writers) decode too.
  str_keys = msgpack.packb({"__ndarray__": True, "data": bytes(4), "dtype": "<i2", "shape": [2]})
  np.testing.assert_array_equal(wire.unpackb(str_keys), np.zeros(2, np.int16))


@pytest.mark.parametrize("fields, match", [
    ({b"dtype": "|O", b"shape": [1], b"data": bytes(8)}, "must be numeric"),
    ({b"dtype": "not-a-dtype", b"shape": [1], b"data": bytes(1)}, "unknown numpy dtype"),
    ({b"dtype": "<f4", b"shape": [3], b"data": bytes(8)}, "needs 12 bytes, the request holds 8"),
    ({b"dtype": "<f4", b"shape": [-1], b"data": bytes(4)}, "non-negative ints"),
    ({b"dtype": "<f4", b"shape": [1]}, "lacks its 'data' field"),
])
def test_malformed_arrays_are_input_errors(fields, match):
  with pytest.raises(InputError, match=match):
    wire.unpackb(msgpack.packb({b"__ndarray__": True, **fields}))


def test_not_msgpack_and_bad_utf8_are_input_errors():
  with pytest.raises(InputError, match="not valid msgpack"):
    wire.unpackb(b"\xc1 definitely not msgpack")
  with pytest.raises(InputError, match="not valid UTF-8"):
    wire.unpackb(b"\xa2\xff\xfe")  # a 2-byte msgpack str holding invalid UTF-8


def test_object_arrays_are_never_sent():
  with pytest.raises(TypeError, match="only numeric arrays"):
    wire.packb(np.array(["a"], object))
