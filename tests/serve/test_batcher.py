"""Dynamic batching on a worker thread, with a fake policy (no model)."""

import threading
import time

import pytest

from vla_jax.serve.batcher import DynamicBatcher


class _Recorder:
  """infer() that records its batches; items "bad" fail alone, "boom" break the batch."""

  def __init__(self, delay=0.0):
    self.batches, self.delay, self.gate = [], delay, threading.Event()
    self.gate.set()

  def __call__(self, items):
    self.gate.wait()
    self.batches.append(list(items))
    time.sleep(self.delay)
    if "boom" in items:
      raise RuntimeError("the whole batch failed")
    return [ValueError(f"bad {i}") if i == "bad" else f"done {i}" for i in items]


def test_queued_items_share_calls_of_at_most_max_batch():
  infer = _Recorder()
  infer.gate.clear()  # hold the worker so that everything queues up
  batcher = DynamicBatcher(infer, max_batch=3, max_wait_s=0.0)
  futures = [batcher.submit(i) for i in range(7)]
  time.sleep(0.05)
  infer.gate.set()
  assert [f.result(5)[0] for f in futures] == [f"done {i}" for i in range(7)]
  batcher.close()
  # The first item was taken alone before the others queued; then batches of 3 at most.
  assert all(len(b) <= 3 for b in infer.batches) and sum(map(len, infer.batches)) == 7
  assert max(len(b) for b in infer.batches) == 3
  sizes = {f.result()[1].batch_size for f in futures}
  assert 3 in sizes


def test_first_item_waits_for_others_up_to_max_wait():
  infer = _Recorder()
  batcher = DynamicBatcher(infer, max_batch=4, max_wait_s=0.3)
  first = batcher.submit("a")
  time.sleep(0.05)
  second = batcher.submit("b")
  assert first.result(5)[1].batch_size == 2 and second.result(5)[0] == "done b"
  start = time.perf_counter()
  assert batcher.submit("alone").result(5)[1].batch_size == 1
  assert 0.25 < time.perf_counter() - start < 2.0  # waited max_wait_s, then went alone
  batcher.close()


def test_groups_never_mix():
  infer = _Recorder()
  infer.gate.clear()
  batcher = DynamicBatcher(infer, max_batch=8, max_wait_s=0.0, group_key=lambda s: s[0])
  futures = [batcher.submit(s) for s in ("x0", "y0", "x1", "y1", "x2")]
  time.sleep(0.05)
  infer.gate.set()
  for f in futures:
    f.result(5)
  batcher.close()
  assert all(len({item[0] for item in b}) == 1 for b in infer.batches)


def test_a_bad_item_fails_alone_and_a_failing_batch_is_retried_item_by_item():
  infer = _Recorder()
  infer.gate.clear()
  batcher = DynamicBatcher(infer, max_batch=8, max_wait_s=0.0)
  futures = {k: batcher.submit(k) for k in ("ok1", "bad", "boom", "ok2")}
  time.sleep(0.05)
  infer.gate.set()
  with pytest.raises(ValueError, match="bad bad"):
    futures["bad"].result(5)
  with pytest.raises(RuntimeError, match="whole batch failed"):
    futures["boom"].result(5)
  assert futures["ok1"].result(5)[0] == "done ok1" and futures["ok2"].result(5)[0] == "done ok2"
  batcher.close()


def test_cancelled_requests_are_skipped():
  infer = _Recorder()
  infer.gate.clear()
  batcher = DynamicBatcher(infer, max_batch=8, max_wait_s=0.0)
  batcher.submit("first")
  time.sleep(0.05)  # the worker holds "first"
  gone, kept = batcher.submit("gone"), batcher.submit("kept")
  assert gone.cancel()
  infer.gate.set()
  assert kept.result(5)[0] == "done kept"
  batcher.close()
  assert "gone" not in sum(infer.batches, [])


def test_a_batch_stops_waiting_once_every_connected_client_is_in_it():
  infer, connected = _Recorder(), [1]
  batcher = DynamicBatcher(infer, max_batch=8, max_wait_s=5.0, clients=lambda: connected[0])
  start = time.perf_counter()
  assert batcher.submit("alone").result(5)[1].batch_size == 1
  assert time.perf_counter() - start < 2.0  # no 5 s wait with one client connected
  connected[0] = 2
  first = batcher.submit("a")
  time.sleep(0.05)
  assert batcher.submit("b").result(5)[1].batch_size == 2 and first.result(5)[0] == "done a"
  assert time.perf_counter() - start < 4.0
  batcher.close()
