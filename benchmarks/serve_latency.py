"""Round-trip latency and throughput of the policy server, batched vs unbatched.

  python benchmarks/serve_latency.py [--workdir DIR] [--clients 1 8] [--requests 16]
      [--repeats 3] [--max_batch 8] [--max_wait_ms 5] [--image_size 224]

Two servers run in this process on the same policy (DIR's checkpoint, or by default the
random `tiny` student: speed does not depend on the weights): one batching up to
`--max_batch` requests, one with batch 1 (every request its own policy call, as a
server without dynamic batching). The real openpi client (`openpi-client` 0.1.2, in its
own virtual environment, see tests/serve/conftest.py) runs in a subprocess: for each
number of concurrent clients C, C connections start together and each sends
`--requests` observations (a uint8 LIBERO-sized frame and a prompt) one after the other.
After a warm-up pass that compiles every shape, the repeats interleave the two servers,
so a busy machine slows both alike; the script prints, per server and C, the median over
repeats of the p50 and p99 round-trip latency and of requests/s, and the batched /
unbatched throughput ratio.
"""

import argparse
import pathlib
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.serve import conftest as serve_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position
from vla_jax.serve import server as server_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _policy(workdir):
  if workdir:
    return server_lib.load_served_policy(workdir).policy
  from vla_jax.eval.policy import VLAPolicy  # pylint: disable=g-import-not-at-top
  from vla_jax.models.vla import VLA, vla_config  # pylint: disable=g-import-not-at-top
  from vla_jax.sim import bundled  # pylint: disable=g-import-not-at-top
  from vla_jax.text import Tokenizer  # pylint: disable=g-import-not-at-top
  model = VLA(vla_config("tiny"))
  return VLAPolicy(model, serve_fixtures.random_params(model),
                   Tokenizer.from_path(bundled.bundled_tokenizer_path()),
                   serve_fixtures.action_stats(-0.2, 0.2))


def _run(python, tmp, port, data, clients, requests):
  out = serve_fixtures.run_openpi_client(python, tmp, port, "concurrent", data,
                                         timeout=1800, clients=clients, repeats=requests)
  latencies = [call["latency_ms"] for calls in out["clients"] for call in calls]
  sizes = [call["policy_timing"]["batch_size"] for calls in out["clients"] for call in calls]
  return {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
          "rps": len(latencies) / out["wall_s"], "batch": statistics.mean(sizes)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="", help="run or export (default: random tiny)")
  parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--requests", type=int, default=16, help="per client and repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_batch", type=int, default=8)
  parser.add_argument("--max_wait_ms", type=float, default=5.0)
  parser.add_argument("--image_size", type=int, default=224)
  args = parser.parse_args()

  python = serve_fixtures.openpi_client_python()
  policy = _policy(args.workdir)
  servers = {}
  for name, batch, wait in (("batched", args.max_batch, args.max_wait_ms),
                            ("unbatched", 1, 0.0)):
    served = server_lib.ServedPolicy(policy, {"default": policy.norm_stats}, "default",
                                     max_batch=batch)
    servers[name] = server_lib.PolicyServer(served, server_lib.ServeConfig(
        port=0, max_batch=batch, max_wait_ms=wait))
    servers[name].start()
  data = serve_fixtures.observations(max(args.clients), size=args.image_size)
  results = {(name, c): [] for name in servers for c in args.clients}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for server in servers.values():  # compile every batch size and prompt length
      _run(python, tmp, server.port, data, max(args.clients), 2)
    for repeat in range(args.repeats):
      for c in args.clients:
        for name, server in servers.items():
          results[name, c].append(_run(python, tmp, server.port, data, c, args.requests))
          print(f"repeat {repeat} clients {c} {name}: {results[name, c][-1]}", flush=True)
  for server in servers.values():
    server.stop()

  print("\n| clients | server | p50 ms | p99 ms | requests/s | mean batch |\n"
        "|---|---|---|---|---|---|")
  median = lambda rows, key: statistics.median(r[key] for r in rows)
  for c in args.clients:
    for name in servers:
      rows = results[name, c]
      print(f"| {c} | {name} | {median(rows, 'p50'):.1f} | {median(rows, 'p99'):.1f} | "
            f"{median(rows, 'rps'):.1f} | {median(rows, 'batch'):.2f} |")
  for c in args.clients:
    ratio = median(results["batched", c], "rps") / median(results["unbatched", c], "rps")
    print(f"clients {c}: batched / unbatched requests/s = {ratio:.2f}x")


if __name__ == "__main__":
  main()
