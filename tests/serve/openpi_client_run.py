"""Drives a policy server with the real `openpi-client` package, in its own environment.

Run by tests/serve (and benchmarks/serve_latency.py) with the python of a virtual
environment that has openpi-client 0.1.2 (it pins numpy<2, so it cannot share ours):

  python openpi_client_run.py SPEC.json

SPEC: {"host", "port", "mode", "inputs": NPZ (images [N, H, W, 3], prompts [N],
optional states [N, D]), "output": JSON path, optional "api_key", "clients",
"repeats"}. Modes:
  infer       one client; metadata, then every observation through ActionChunkBroker.
  concurrent  `clients` threads, each with its own connection, start together; thread c
              sends observation c (mod N) `repeats` times; round-trip latency per call.
  error       one client per observation in "observations" (overrides of the base
              observation, arrays from the NPZ by name); records what the client raised
              and the close code, then checks a fresh client is still served.
  connect     only connects (API key tests) and reports the metadata or the error.
Only this file imports openpi_client; it prints nothing on success.
"""

import json
import sys
import threading
import time

import numpy as np
from openpi_client import action_chunk_broker
from openpi_client import websocket_client_policy


def _observation(data, i):
  obs = {"observation/image": data["images"][i], "prompt": str(data["prompts"][i])}
  if "states" in data:
    obs["observation/state"] = data["states"][i]
  return obs


def _jsonable(result):
  return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}


def infer(spec, data):
  client = websocket_client_policy.WebsocketClientPolicy(spec["host"], spec["port"],
                                                         api_key=spec.get("api_key"))
  metadata = client.get_server_metadata()
  broker = action_chunk_broker.ActionChunkBroker(client, metadata["action_horizon"])
  results = [_jsonable(broker.infer(_observation(data, i))) for i in range(len(data["images"]))]
  return {"metadata": metadata, "results": results}


def concurrent(spec, data):
  n, repeats = spec["clients"], spec.get("repeats", 1)
  clients = [websocket_client_policy.WebsocketClientPolicy(spec["host"], spec["port"])
             for _ in range(n)]
  barrier, out = threading.Barrier(n), [None] * n

  def run(c):
    obs, calls = _observation(data, c % len(data["images"])), []
    barrier.wait()
    for _ in range(repeats):
      start = time.perf_counter()
      result = clients[c].infer(obs)
      calls.append({"latency_ms": 1e3 * (time.perf_counter() - start), **_jsonable(result)})
    out[c] = calls

  threads = [threading.Thread(target=run, args=(c,)) for c in range(n)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return {"clients": out, "wall_s": time.perf_counter() - start}


def error(spec, data):
  outcomes = []
  for overrides in spec["observations"]:
    obs = _observation(data, 0)
    for key, value in overrides.items():
      if value is None:
        obs.pop(key, None)
      elif isinstance(value, str) and value.startswith("npz:"):
        obs[key] = data[value[4:]]
      elif isinstance(value, str) and value.startswith("hex:"):
        obs[key] = bytes.fromhex(value[4:])
      else:
        obs[key] = value
    client = websocket_client_policy.WebsocketClientPolicy(spec["host"], spec["port"])
    try:
      client.infer(obs)
      outcomes.append({"raised": None})
    except Exception as e:  # pylint: disable=broad-except
      time.sleep(0.2)  # let the close handshake finish
      outcomes.append({"raised": type(e).__name__, "message": str(e),
                       "close_code": client._ws.close_code})  # pylint: disable=protected-access
  after = websocket_client_policy.WebsocketClientPolicy(spec["host"], spec["port"])
  return {"outcomes": outcomes, "after": _jsonable(after.infer(_observation(data, 0)))}


def connect(spec, data):
  del data
  try:
    client = websocket_client_policy.WebsocketClientPolicy(spec["host"], spec["port"],
                                                           api_key=spec.get("api_key"))
    return {"metadata": client.get_server_metadata()}
  except Exception as e:  # pylint: disable=broad-except
    return {"raised": type(e).__name__, "message": str(e)}


def main():
  with open(sys.argv[1]) as f:
    spec = json.load(f)
  data = dict(np.load(spec["inputs"])) if spec.get("inputs") else {}
  result = globals()[spec["mode"]](spec, data)
  with open(spec["output"], "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
