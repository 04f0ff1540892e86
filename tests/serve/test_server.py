"""The server on localhost, driven by the real clients: openpi-client and json-numpy.

The policy is the random `tiny` student (see conftest.py). Every served action is
compared with the in-process policy called on that request alone (batch of one).
"""

import concurrent.futures

import json_numpy
import numpy as np
import pytest
import requests

from tests.serve.conftest import (action_stats, observations, run_openpi_client, served)
from vla_jax.errors import InputError
from vla_jax.eval.policy import VLAPolicy
from vla_jax.serve import inputs
from vla_jax.serve import server as server_lib

JSON = {"Content-Type": "application/json"}


def _url(server, path=""):
  return f"http://127.0.0.1:{server.port}{path}"


def _alone(policy, image, prompt):
  """The in-process policy's action for one request, unbatched: float32 [7]."""
  return policy(image[None], [str(prompt)])[0]


def _post(server, payload, **kwargs):
  """OpenVLA's client: a json-numpy body POSTed to /act (deploy.py's usage).

  deploy.py's snippet relies on json_numpy.patch() and requests' json=; requests uses
  simplejson when it is installed, which the patch does not reach, so the body is
  encoded with json_numpy.dumps explicitly: the same bytes.
  """
  return requests.post(_url(server, "/act"), data=json_numpy.dumps(payload), headers=JSON,
                       timeout=60, **kwargs)


def test_healthz_and_a_plain_get_of_the_websocket_endpoint(server):
  assert requests.get(_url(server, "/healthz"), timeout=10).text == "OK\n"
  plain = requests.get(_url(server, "/"), timeout=10)
  assert plain.status_code == 400 and "openpi websocket endpoint" in plain.text


def test_openpi_client_metadata_and_actions_equal_the_in_process_policy(
    server, tiny_policy, openpi_python, tmp_path):
  data = observations(3)
  out = run_openpi_client(openpi_python, tmp_path, server.port, "infer", data)
  meta = out["metadata"]
  assert meta["action_dim"] == 7 and meta["action_horizon"] == 1 and meta["image_size"] == 64
  assert meta["unnorm_key"] == "tabletop" and meta["unnorm_keys"] == ["tabletop", "wide"]
  assert meta["observation_keys"]["image"] == "observation/image" and meta["max_batch"] == 4
  for i, result in enumerate(out["results"]):
    # ActionChunkBroker hands out one [7] step of the served [1, 7] chunk.
    np.testing.assert_array_equal(np.float32(result["actions"]),
                                  _alone(tiny_policy, data["images"][i], data["prompts"][i]))
    assert result["policy_timing"]["batch_size"] == 1
    assert {"infer_ms", "queue_ms"} <= set(result["server_timing"])
  assert "prev_total_ms" in out["results"][-1]["server_timing"]


def test_concurrent_openpi_clients_are_batched_and_each_gets_its_own_actions(
    server, tiny_policy, openpi_python, tmp_path):
  data = observations(6, seed=1)
  out = run_openpi_client(openpi_python, tmp_path, server.port, "concurrent", data,
                          clients=6, repeats=3)
  sizes = []
  for c, calls in enumerate(out["clients"]):
    expected = _alone(tiny_policy, data["images"][c], data["prompts"][c])
    for call in calls:
      assert np.shape(call["actions"]) == (1, 7)
      np.testing.assert_array_equal(np.float32(call["actions"][0]), expected)
      sizes.append(call["policy_timing"]["batch_size"])
  assert max(sizes) > 1, f"no request was batched with another: batch sizes {sizes}"
  assert max(sizes) <= 4


def test_openpi_bad_requests_get_their_error_and_the_server_keeps_serving(
    server, tiny_policy, openpi_python, tmp_path):
  data = observations(1)
  data["float_image"] = data["images"][0].astype(np.float32)
  data["chw_image"] = data["images"][0].transpose(2, 0, 1).copy()
  data["nan_state"] = np.array([0.1, np.nan, 0, 0, 0, 0, 1], np.float32)
  data["huge_image"] = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB > the 1 MiB limit
  cases = [({"observation/image": "npz:float_image"}, "must be uint8"),
           ({"observation/image": "npz:chw_image"}, "channels first"),
           ({"prompt": None}, "no prompt under 'prompt'"),
           ({"observation/state": "npz:nan_state"}, "NaN or inf"),
           ({"prompt": "hex:fffe"}, "not valid UTF-8"),
           ({"observation/image": "npz:huge_image"}, None)]
  out = run_openpi_client(openpi_python, tmp_path, server.port, "error", data,
                          observations=[c for c, _ in cases])
  for (case, match), outcome in zip(cases, out["outcomes"]):
    if match is None:  # over the size limit: closed by the websocket layer, 1009
      assert outcome["raised"] == "ConnectionClosedError" and outcome["close_code"] == 1009, (
          outcome)
      assert "message too big" in outcome["message"]
      continue
    assert outcome["raised"] == "RuntimeError", (case, outcome)
    assert "bad request: " in outcome["message"] and match in outcome["message"], outcome
    assert outcome["close_code"] == 1011
  np.testing.assert_array_equal(np.float32(out["after"]["actions"][0]),
                                _alone(tiny_policy, data["images"][0], data["prompts"][0]))


def test_openvla_rest_actions_equal_the_in_process_policy_with_each_unnorm_key(
    server, tiny_policy):
  data = observations(2, size=96, seed=2)
  wide = VLAPolicy(tiny_policy.model, tiny_policy.params, tiny_policy.tokenizer,
                   action_stats(-2.0, 2.0))
  for i in range(2):
    payload = {"image": data["images"][i], "instruction": str(data["prompts"][i])}
    reply = _post(server, payload)
    assert reply.status_code == 200, reply.text
    action = json_numpy.loads(reply.text)
    assert action.dtype == np.float32 and action.shape == (7,)
    np.testing.assert_array_equal(action, _alone(tiny_policy, data["images"][i],
                                                 data["prompts"][i]))
    reply = _post(server, {**payload, "unnorm_key": "wide"})
    np.testing.assert_array_equal(json_numpy.loads(reply.text),
                                  _alone(wide, data["images"][i], data["prompts"][i]))
  # deploy.py's fallback for clients without json-numpy on the wire: double encoding.
  reply = requests.post(_url(server, "/act"), json={"encoded": json_numpy.dumps(payload)},
                        timeout=60)
  np.testing.assert_array_equal(json_numpy.loads(reply.json()),
                                _alone(tiny_policy, data["images"][1], data["prompts"][1]))


def test_openvla_rest_bad_requests_are_clear_errors(server):
  image = observations(1)["images"][0]
  good = {"image": image, "instruction": "put the carrot on the plate"}
  cases = [({**good, "unnorm_key": "bridge_orig"}, 400,
            "unnorm_key 'bridge_orig' is not in this checkpoint; it has statistics for "
            "['tabletop', 'wide']"),
           ({"image": image}, 400, "no instruction"),
           ({**good, "image": image.astype(np.float64)}, 400, "must be uint8"),
           ({**good, "instruction": "x" * 1000}, 400, "at most 512"),
           ({**good, "image": np.zeros((1024, 1024, 3), np.uint8)}, 413, "over 1048576 bytes")]
  for payload, status, message in cases:
    reply = _post(server, payload)
    assert reply.status_code == status and message in reply.json()["error"], reply.text
  not_utf8 = requests.post(_url(server, "/act"), data=b'{"image": 1, "instruction": "\xff"}',
                           headers=JSON, timeout=30)
  assert not_utf8.status_code == 400 and "not UTF-8" in not_utf8.json()["error"]
  not_json = requests.post(_url(server, "/act"), data=b"image=1", headers=JSON, timeout=30)
  assert not_json.status_code == 400 and "json_numpy" in not_json.json()["error"]
  assert _post(server, good).status_code == 200  # still serving


def test_concurrent_rest_and_openpi_clients_share_batches(
    server, tiny_policy, openpi_python, tmp_path):
  data = observations(4, seed=3)
  with concurrent.futures.ThreadPoolExecutor(5) as pool:
    rest = [pool.submit(_post, server, {"image": data["images"][i],
                                        "instruction": str(data["prompts"][i])})
            for i in range(4)]
    openpi = pool.submit(run_openpi_client, openpi_python, tmp_path, server.port,
                         "concurrent", data, clients=2, repeats=2)
    for i, reply in enumerate(rest):
      np.testing.assert_array_equal(json_numpy.loads(reply.result().text),
                                    _alone(tiny_policy, data["images"][i], data["prompts"][i]))
    for c, calls in enumerate(openpi.result()["clients"]):
      for call in calls:
        np.testing.assert_array_equal(
            np.float32(call["actions"][0]),
            _alone(tiny_policy, data["images"][c], data["prompts"][c]))


def test_api_key_is_required_when_configured(tiny_policy, openpi_python, tmp_path):
  locked = server_lib.PolicyServer(served(tiny_policy), server_lib.ServeConfig(
      port=0, max_batch=4, api_key="s3cret", warmup=False))
  port = locked.start()
  try:
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    for key, ok in ((None, False), ("wrong", False), ("s3cret", True)):
      out = run_openpi_client(openpi_python, tmp_path, port, "connect", {}, api_key=key)
      if ok:
        assert out["metadata"]["action_dim"] == 7
      else:
        assert out["raised"] == "InvalidStatus" and "401" in out["message"], out
    payload = json_numpy.dumps({"image": observations(1)["images"][0],
                                "instruction": "put the carrot on the plate"})
    denied = requests.post(f"http://127.0.0.1:{port}/act", data=payload, headers=JSON,
                           timeout=30)
    assert denied.status_code == 401 and "Api-Key" in denied.json()["error"]
    allowed = requests.post(f"http://127.0.0.1:{port}/act", data=payload, timeout=60,
                            headers={**JSON, "Authorization": "Api-Key s3cret"})
    assert allowed.status_code == 200
  finally:
    locked.stop()


def test_batch_sizes_are_powers_of_two_then_max_batch():
  assert server_lib.batch_sizes(1) == (1,)
  assert server_lib.batch_sizes(8) == (1, 2, 4, 8)
  assert server_lib.batch_sizes(6) == (1, 2, 4, 6)


def test_a_policy_that_reads_state_gets_it_per_request(tiny_policy):
  stats = action_stats(-0.2, 0.2)
  policy = VLAPolicy(tiny_policy.model, tiny_policy.params, tiny_policy.tokenizer, stats,
                     proprio_dims=(2, 6), state_stats=stats)
  serving = served(policy)
  assert serving.state_dim == 7 and serving.info["proprio_dims"] == [2, 6]
  data = observations(2, size=64)
  states = np.array([[0, 0, 0.1, 0, 0, 0, 1.0], [0, 0, -0.1, 0, 0, 0, 0.0]])
  queries = [inputs.Query(data["images"][i], str(data["prompts"][i]), states[i], "")
             for i in range(2)]
  actions = serving.infer(queries)
  for i in range(2):
    alone = policy(data["images"][i:i + 1], [str(data["prompts"][i])], states[i:i + 1])
    np.testing.assert_array_equal(actions[i][0], alone[0])
  with pytest.raises(InputError, match="reads a robot state of 7"):
    inputs.parse_observation({"observation/image": data["images"][0], "prompt": "x",
                              "observation/state": np.zeros(8)}, inputs.ObservationKeys(),
                             serving.state_dim)


def test_a_chunked_policy_serves_its_whole_chunk(tiny_policy):
  # openpi clients read metadata["action_horizon"] and step through the [H, 7] chunk
  # (ActionChunkBroker); OpenVLA's /act gets the chunk's first action.
  policy = VLAPolicy(tiny_policy.model, tiny_policy.params, tiny_policy.tokenizer,
                     action_stats(-0.2, 0.2), action_horizon=3)
  serving = served(policy)
  assert serving.info["action_horizon"] == 3
  data = observations(2, size=64)
  queries = [inputs.Query(data["images"][i], str(data["prompts"][i]), None, "")
             for i in range(2)]
  chunks = serving.infer(queries)
  expected = policy.predict_chunk(data["images"], [str(p) for p in data["prompts"]])
  assert expected.shape == (2, 3, 7)
  for i in range(2):
    np.testing.assert_array_equal(chunks[i], expected[i])
