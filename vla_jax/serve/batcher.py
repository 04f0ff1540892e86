"""Dynamic batching: requests of concurrent clients share one policy call on one thread.

Handlers on the event loop `submit` items and await the returned future; a worker thread
takes the first waiting item, then gathers more until `max_batch` items or until
`max_wait_s` has passed since the first (or until every connected client has an item in
the batch: nobody else can send, so waiting longer only adds latency), groups them by `group_key` (items of one group
can be stacked: same image size, same statistics) and calls `infer` once per group. The
event loop therefore never runs the model, and a client alone waits at most `max_wait_s`
longer than an unbatched call. If a group's call raises, each of its items is retried
alone, so one bad request fails only its own future.
"""

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Hashable, List, Optional, Sequence

_STOP = object()


@dataclasses.dataclass(frozen=True)
class Timing:
  """How one item was served: its batch's size, the policy call, time spent queued."""
  batch_size: int
  infer_ms: float
  queue_ms: float


@dataclasses.dataclass
class _Pending:
  item: Any
  future: concurrent.futures.Future
  submitted: float


class DynamicBatcher:
  """Runs `infer(items) -> [result or Exception per item]` on batches of submitted items.

  Args:
    infer: called on the worker thread with a list of items that share a group key;
      returns one result per item, or an Exception instance for an item that failed alone.
    max_batch: the most items per call.
    max_wait_s: how long the first item of a batch waits for others (0: take only what
      is already queued).
    group_key: items with equal keys may share a call.
    clients: how many clients are connected now (each has at most one item waiting); a
      batch that holds that many stops waiting. None: always wait up to `max_wait_s`.
  """

  def __init__(self, infer: Callable[[List[Any]], Sequence[Any]], *, max_batch: int = 8,
               max_wait_s: float = 0.005, group_key: Callable[[Any], Hashable] = lambda _: 0,
               clients: Optional[Callable[[], int]] = None):
    if max_batch < 1 or max_wait_s < 0:
      raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, "
                       f"{max_wait_s}.")
    self._infer, self._group_key, self._clients = infer, group_key, clients
    self.max_batch, self.max_wait_s = max_batch, max_wait_s
    self._queue: "queue.Queue[Any]" = queue.Queue()
    self._thread = threading.Thread(target=self._run, name="policy-batcher", daemon=True)
    self._thread.start()

  def submit(self, item: Any) -> concurrent.futures.Future:
    """Queues `item`; the future resolves to (result, Timing) or raises its error."""
    future = concurrent.futures.Future()
    self._queue.put(_Pending(item, future, time.perf_counter()))
    return future

  def close(self) -> None:
    """Stops the worker after the items already queued."""
    self._queue.put(_STOP)
    self._thread.join()

  def _gather(self, first: _Pending) -> List[_Pending]:
    batch, deadline = [first], time.perf_counter() + self.max_wait_s
    while len(batch) < self.max_batch:
      if self._clients is not None and len(batch) >= self._clients() and self._queue.empty():
        break  # every connected client is in this batch
      try:
        pending = self._queue.get(timeout=max(0.0, deadline - time.perf_counter())) if (
            self.max_wait_s) else self._queue.get_nowait()
      except queue.Empty:
        break
      if pending is _STOP:
        self._queue.put(_STOP)  # finish this batch, then stop
        break
      batch.append(pending)
    return batch

  def _run(self) -> None:
    while True:
      first = self._queue.get()
      if first is _STOP:
        return
      groups = {}
      for pending in self._gather(first):
        if not pending.future.set_running_or_notify_cancel():
          continue  # its client went away
        try:
          key = self._group_key(pending.item)
        except Exception as e:  # pylint: disable=broad-except
          pending.future.set_exception(e)
          continue
        groups.setdefault(key, []).append(pending)
      for group in groups.values():
        self._serve(group)

  def _serve(self, group: List[_Pending]) -> None:
    start = time.perf_counter()
    try:
      results = list(self._infer([p.item for p in group]))
      if len(results) != len(group):
        raise RuntimeError(f"infer returned {len(results)} results for {len(group)} items.")
    except Exception as e:  # pylint: disable=broad-except
      if len(group) > 1:  # isolate the item that fails
        logging.warning("a batch of %d failed (%s); serving its items one by one.",
                        len(group), e)
        for pending in group:
          self._serve([pending])
        return
      group[0].future.set_exception(e)
      return
    infer_ms = 1e3 * (time.perf_counter() - start)
    for pending, result in zip(group, results):
      if isinstance(result, Exception):
        pending.future.set_exception(result)
      else:
        pending.future.set_result((result, Timing(len(group), infer_ms,
                                                  1e3 * (start - pending.submitted))))
