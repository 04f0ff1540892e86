"""The policy server: one port, openpi's websocket protocol and OpenVLA's REST endpoint.

`python -m vla_jax.main --mode=serve --workdir=DIR [--port=8000] [--host=127.0.0.1]`
loads DIR (a run, its latest step, or an export) as the `VLAPolicy` the evaluator uses
(same preprocessing, same jitted KV-cache decoder) and answers:

  ws://HOST:PORT/   openpi: on connect a msgpack metadata dict; then per message an
                    observation dict (`ObservationKeys`) -> {"actions": float32 [H, 7] (H =
                    the run's data.action_horizon, 1 for OpenVLA),
                    "policy_timing", "server_timing"}. On an error the server sends the
                    message (the traceback if unexpected) as a text frame and closes with
                    1011; a message over the size limit is closed with 1009.
  POST /act         OpenVLA's deploy.py: a json-numpy body {"image": uint8 [H, W, 3],
                    "instruction", "unnorm_key"?} -> the json-numpy float32 [7] action (the
                    first of the chunk)
                    ({"encoded": ...} double-encoded bodies too); errors are JSON
                    {"error": message} with status 400 (bad request), 401, 413 or 500.
  GET /healthz      "OK".

With an API key, requests other than /healthz need `Authorization: Api-Key KEY` (what
`openpi_client.WebsocketClientPolicy(api_key=...)` sends). Requests from all clients go
through one `DynamicBatcher`, so the model runs off the event loop in batches padded to
a few compiled sizes (`batch_sizes`); the policy holds every normalisation statistics of
the checkpoint, chosen per request by `unnorm_key`.
"""

import asyncio
import copy
import dataclasses
import hmac
import json
import logging
import os
import signal
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import aiohttp
from aiohttp import web
import json_numpy
import numpy as np
import orbax.checkpoint as ocp

from vla_jax.actions import NormStats
from vla_jax.errors import CheckpointError, ConfigError, InputError
from vla_jax.eval import policy as policy_lib
from vla_jax.serve import batcher as batcher_lib
from vla_jax.serve import inputs
from vla_jax.serve import wire

WARMUP_PROMPT = "put the carrot on the plate"  # a typical tabletop instruction


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """How the server listens, batches and checks requests (`--mode=serve` flags)."""
  host: str = "127.0.0.1"
  port: int = 8000  # 0 picks a free port (tests)
  max_batch: int = 8
  max_wait_ms: float = 5.0
  obs_keys: inputs.ObservationKeys = inputs.ObservationKeys()
  api_key: str = ""  # empty: no authentication
  max_request_bytes: int = 16 * 2**20
  unnorm_key: str = ""  # default statistics; empty: the run's first data source
  warmup: bool = True  # compile every batch size before accepting clients
  limits: inputs.Limits = inputs.Limits()


def batch_sizes(max_batch: int) -> Tuple[int, ...]:
  """The padded batch sizes the policy is compiled for: powers of two, then max_batch."""
  sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
  return tuple(sizes + [max_batch])


def read_assets(path: str, step: Optional[int] = None) -> Dict[str, Any]:
  """The JSON assets (config, norm_stats, ...) of an export or of a run's step."""
  path = os.path.abspath(os.fspath(path))
  directory = os.path.join(path, "assets")
  if not os.path.isdir(os.path.join(path, "params")):
    for run_dir in (os.path.join(path, "checkpoints"), path):
      steps = sorted(int(n) for n in os.listdir(run_dir) if n.isdigit()) if os.path.isdir(
          run_dir) else []
      if steps:
        directory = os.path.join(run_dir, str(steps[-1] if step is None else step), "assets")
        break
  if not os.path.isdir(directory):
    raise CheckpointError(f"{path} holds neither a run's checkpoints nor an export (no "
                          f"{directory}); train (--mode=train) or export (--mode=export) first.")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return checkpointer.restore(directory)


class ServedPolicy:
  """A `VLAPolicy` with all the statistics of its checkpoint, batched for serving.

  Attributes:
    policy: the evaluator's policy (its own statistics are `default_key`'s).
    unnorm_keys: names of the statistics requests may choose with `unnorm_key`.
    state_dim: robot-state size the policy reads (`proprio_dims`), None if none.
    sizes: compiled batch sizes; a batch is padded to the next one.
  """

  def __init__(self, policy: policy_lib.VLAPolicy, norm_stats: Dict[str, NormStats],
               default_key: str, *, max_batch: int = 8, info: Optional[Dict[str, Any]] = None):
    self.policy, self.default_key = policy, default_key
    self.unnorm_keys = sorted(norm_stats)
    self._views = {default_key: policy}
    for key, stats in norm_stats.items():
      if key != default_key:  # the same jitted model, un-normalised with other statistics
        self._views[key] = copy.copy(policy)
        self._views[key].norm_stats = stats
    proprio_dims = tuple(getattr(policy, "proprio_dims", ()))
    self.state_dim = policy.state_stats.dim if proprio_dims else None
    self.sizes = batch_sizes(max_batch)
    self.info = {"model": policy.model.config.arch, "action_dim": policy.action_dim,
                 "action_horizon": policy.action_horizon,
                 "image_size": policy.model.config.image_size,
                 "unnorm_key": default_key, "unnorm_keys": self.unnorm_keys,
                 "proprio_dims": list(proprio_dims), "state_dim": self.state_dim,
                 "max_batch": max_batch, **(info or {})}

  def group_key(self, query: inputs.Query) -> Tuple[str, Tuple[int, ...]]:
    """Queries with equal keys are stacked into one call."""
    return query.unnorm_key or self.default_key, query.image.shape

  def _check_prompt(self, query: inputs.Query) -> None:
    if self.state_dim is None:
      self.policy.prompt_batch([query.prompt])
    else:
      self.policy.prompt_batch([query.prompt], query.state[None])

  def infer(self, queries: List[inputs.Query]) -> List[Any]:
    """An action chunk float32 [H, 7] per query (one padded policy call; H is the run's
    `data.action_horizon`, 1 for OpenVLA), or the query's InputError."""
    results: List[Any] = [None] * len(queries)
    valid = []
    for i, query in enumerate(queries):
      try:  # a prompt the tokenizer refuses fails only its own request
        self._check_prompt(query)
        valid.append(i)
      except InputError as e:
        results[i] = e
    if valid:
      rows = [queries[i] for i in valid]
      size = next(s for s in self.sizes if s >= len(rows))
      rows += [rows[0]] * (size - len(rows))  # padding rows, dropped below
      states = None if self.state_dim is None else np.stack([q.state for q in rows])
      view = self._views[queries[valid[0]].unnorm_key or self.default_key]
      actions = view.predict_chunk(np.stack([q.image for q in rows]), [q.prompt for q in rows],
                                   states)
      for row, i in enumerate(valid):
        results[i] = np.asarray(actions[row], np.float32)
    return results

  def warmup(self) -> None:
    """Compiles every batch size once (a typical prompt length), so clients never wait."""
    size = self.policy.model.config.image_size
    for batch in self.sizes:
      start = time.perf_counter()
      queries = [inputs.Query(np.zeros((size, size, 3), np.uint8), WARMUP_PROMPT,
                              None if self.state_dim is None else np.zeros(self.state_dim),
                              "")] * batch
      self.infer(queries)
      logging.info("compiled batch size %d in %.1f s", batch, time.perf_counter() - start)


def load_served_policy(path: str, *, step: Optional[int] = None, unnorm_key: str = "",
                       max_batch: int = 8) -> ServedPolicy:
  """`ServedPolicy` of a run (WORKDIR, its latest or chosen step) or an export."""
  assets = read_assets(path, step)
  norm_stats = {k: NormStats.from_dict(v) for k, v in assets.get("norm_stats", {}).items()}
  default_key, _ = policy_lib.choose_norm_stats(norm_stats, assets, unnorm_key)
  policy = policy_lib.load_policy(path, step=step, dataset=default_key)
  return ServedPolicy(policy, norm_stats, default_key, max_batch=max_batch,
                      info={"checkpoint": os.path.abspath(path)})


def _json_error(status: int, message: str) -> web.Response:
  return web.json_response({"error": message}, status=status)


class PolicyServer:
  """aiohttp application + dynamic batcher around a `ServedPolicy`.

  `start()` serves from a background thread and returns the port (tests, benchmarks);
  `serve_forever()` blocks until SIGINT/SIGTERM (the command line).
  """

  def __init__(self, served: ServedPolicy, config: ServeConfig = ServeConfig()):
    self.served, self.config = served, config
    self.metadata = {**served.info, "observation_keys": dataclasses.asdict(config.obs_keys)}
    self._batcher: Optional[batcher_lib.DynamicBatcher] = None
    self._loop: Optional[asyncio.AbstractEventLoop] = None
    self._runner: Optional[web.AppRunner] = None
    self._thread: Optional[threading.Thread] = None
    self.port: Optional[int] = None
    self._clients = 0  # open websockets + REST requests in progress (event loop only)

  # ----- requests ---------------------------------------------------------------------
  def _authorized(self, request: web.Request) -> bool:
    if not self.config.api_key:
      return True
    sent = request.headers.get("Authorization", "")
    return hmac.compare_digest(sent.encode(), f"Api-Key {self.config.api_key}".encode())

  async def _infer(self, query: inputs.Query) -> Tuple[np.ndarray, batcher_lib.Timing]:
    return await asyncio.wrap_future(self._batcher.submit(query))

  async def _healthz(self, request: web.Request) -> web.Response:
    del request
    return web.Response(text="OK\n")

  async def _openpi(self, request: web.Request) -> web.StreamResponse:
    if not self._authorized(request):
      return web.Response(status=401, text="missing or wrong API key: send the header "
                                           "'Authorization: Api-Key KEY'.\n")
    ws = web.WebSocketResponse(max_msg_size=self.config.max_request_bytes, compress=False)
    if not ws.can_prepare(request).ok:
      return web.Response(status=400, text="this is the openpi websocket endpoint; connect "
                          "with openpi_client.websocket_client_policy.WebsocketClientPolicy, or "
                          "POST /act (OpenVLA REST), GET /healthz.\n")
    await ws.prepare(request)
    self._clients += 1
    try:
      await self._openpi_session(request, ws)
    finally:
      self._clients -= 1
    return ws

  async def _openpi_session(self, request: web.Request, ws: web.WebSocketResponse) -> None:
    await ws.send_bytes(wire.packb(self.metadata))
    prev_total_ms = None
    async for message in ws:
      received = time.perf_counter()
      if message.type == aiohttp.WSMsgType.ERROR:
        logging.warning("openpi client %s: %s", request.remote, ws.exception())
        break
      try:
        if message.type != aiohttp.WSMsgType.BINARY:
          raise InputError(f"expected a binary msgpack frame, got {message.type.name}; send "
                           "observations with openpi_client.msgpack_numpy.")
        query = inputs.parse_observation(wire.unpackb(message.data), self.config.obs_keys,
                                         self.served.state_dim, self.config.limits)
        chunk, timing = await self._infer(query)
      except Exception as e:  # pylint: disable=broad-except
        bad = isinstance(e, InputError)
        text = f"bad request: {e}" if bad else traceback.format_exc()
        (logging.info if bad else logging.error)("openpi client %s: %s", request.remote, text)
        if not ws.closed:
          await ws.send_str(text)
          await ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=(
              b"Bad request." if bad else b"Internal server error.") +
              b" The error is in the previous frame.")
        break
      server_timing = {"infer_ms": 1e3 * (time.perf_counter() - received),
                       "queue_ms": timing.queue_ms}
      if prev_total_ms is not None:
        server_timing["prev_total_ms"] = prev_total_ms
      if ws.closed:  # the client left while its request was in the batch
        break
      await ws.send_bytes(wire.packb({
          "actions": chunk,
          "policy_timing": {"infer_ms": timing.infer_ms, "batch_size": timing.batch_size},
          "server_timing": server_timing}))
      prev_total_ms = 1e3 * (time.perf_counter() - received)

  async def _act(self, request: web.Request) -> web.Response:
    self._clients += 1
    try:
      return await self._act_request(request)
    finally:
      self._clients -= 1

  async def _act_request(self, request: web.Request) -> web.Response:
    if not self._authorized(request):
      return _json_error(401, "missing or wrong API key: send the header "
                              "'Authorization: Api-Key KEY'.")
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return _json_error(413, f"the request body is over {self.config.max_request_bytes} "
                              "bytes (the server's limit, --serve_max_request_mb); send a "
                              "smaller image.")
    try:
      try:
        payload = json_numpy.loads(body.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise InputError(f"the body is not UTF-8 ({e}); send JSON.") from None
      except Exception as e:  # pylint: disable=broad-except
        raise InputError(f"the body is not JSON with json-numpy arrays ({type(e).__name__}: "
                         f"{e}); encode it with json_numpy (json_numpy.patch()).") from None
      double = isinstance(payload, dict) and "encoded" in payload
      if double:  # deploy.py's fallback: the whole payload json-numpy encoded in a string
        if set(payload) != {"encoded"} or not isinstance(payload["encoded"], str):
          raise InputError("a double-encoded body is exactly {'encoded': json_numpy string}.")
        try:
          payload = json_numpy.loads(payload["encoded"])
        except Exception as e:  # pylint: disable=broad-except
          raise InputError(f"'encoded' is not json-numpy JSON ({e}).") from None
      query = inputs.parse_act_payload(payload, self.served.unnorm_keys,
                                       self.served.state_dim, self.config.limits)
      chunk, _ = await self._infer(query)
    except InputError as e:
      logging.info("/act from %s: bad request: %s", request.remote, e)
      return _json_error(400, str(e))
    except Exception:  # pylint: disable=broad-except
      logging.error("/act from %s: %s", request.remote, traceback.format_exc())
      return _json_error(500, traceback.format_exc())
    text = json_numpy.dumps(chunk[0])
    return web.Response(text=json.dumps(text) if double else text,
                        content_type="application/json")

  # ----- lifecycle --------------------------------------------------------------------
  def make_app(self) -> web.Application:
    app = web.Application(client_max_size=self.config.max_request_bytes)
    app.router.add_get("/healthz", self._healthz)
    app.router.add_get("/", self._openpi)
    app.router.add_post("/act", self._act)
    return app

  async def _start_site(self) -> int:
    self._runner = web.AppRunner(self.make_app(), access_log=None)
    await self._runner.setup()
    site = web.TCPSite(self._runner, self.config.host, self.config.port)
    await site.start()
    return self._runner.addresses[0][1]

  def start(self) -> int:
    """Warms up, starts the batcher and the server thread; returns the bound port."""
    if self.config.warmup:
      self.served.warmup()
    self._batcher = batcher_lib.DynamicBatcher(
        self.served.infer, max_batch=self.config.max_batch,
        max_wait_s=self.config.max_wait_ms / 1e3, group_key=self.served.group_key,
        clients=lambda: self._clients)
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="policy-server",
                                    daemon=True)
    self._thread.start()
    self.port = asyncio.run_coroutine_threadsafe(self._start_site(), self._loop).result()
    return self.port

  def stop(self) -> None:
    """Closes connections, then the event loop and the batcher."""
    if self._loop is None:
      return
    asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._loop.close()
    self._batcher.close()
    self._loop = None

  def serve_forever(self) -> None:
    """`start`, log where, block until SIGINT or SIGTERM, `stop`."""
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, lambda *_: done.set())
    port = self.start()
    where = f"{self.config.host}:{port}"
    logging.info("serving %s on ws://%s (openpi), http://%s/act (OpenVLA REST), "
                 "http://%s/healthz", self.metadata.get("checkpoint", "a policy"), where,
                 where, where)
    print(f"serving on {where}: ws://{where} (openpi), POST http://{where}/act (OpenVLA), "
          f"GET http://{where}/healthz", flush=True)
    while not done.wait(0.5):
      pass
    self.stop()


def serve(path: str, config: ServeConfig = ServeConfig(), step: Optional[int] = None) -> None:
  """`--mode=serve`: load `path` (run or export) and serve it until interrupted."""
  if config.max_batch < 1 or config.max_wait_ms < 0 or config.max_request_bytes < 1:
    raise ConfigError(f"serve needs max_batch >= 1, max_wait_ms >= 0 and a positive request "
                     f"limit, got {config.max_batch}, {config.max_wait_ms}, "
                     f"{config.max_request_bytes}.")
  served = load_served_policy(path, step=step, unnorm_key=config.unnorm_key,
                              max_batch=config.max_batch)
  PolicyServer(served, config).serve_forever()
