"""A training run's working directory: one run at a time, and a metrics log that survives crashes.

`workdir_lock(workdir)` holds an exclusive `flock` on `WORKDIR/.lock` for the life of a
training run: a second run on the same directory stops at once with an error naming the
process that holds it (two runs used to interleave `metrics.jsonl` and crash at their
first save inside Orbax). The kernel drops the lock when its process dies, even by
`kill -9`, so a lock file left behind by a dead run is stale by construction and is
simply taken over. Only process 0 of a multi-host run takes it.

`repair_metrics(path, resumed_from)` makes `metrics.jsonl` safe to append to: a torn last
line (a crash or a full disk mid-write) is cut off, and lines of steps after the
checkpoint being resumed are dropped (the resumed run writes them again, so the loss
curve does not double back). `read_metrics(path)` reads what is there, skipping lines
that are not JSON.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from vla_jax.errors import ConfigError

LOCK_NAME = ".lock"


def check_workdir(workdir: str) -> None:
  """A workdir must be a directory or not exist yet (checked before anything is built)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                      "(it is created if missing).")


@contextlib.contextmanager
def workdir_lock(workdir: str, *, active: bool = True) -> Iterator[None]:
  """Holds WORKDIR/.lock exclusively; ConfigError if another live process holds it.

  Args:
    active: False (processes other than 0) takes no lock.
  """
  check_workdir(workdir)
  if not active:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  handle = open(path, "a+")
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      handle.seek(0)
      owner = handle.read().strip() or "an unknown process"
      raise ConfigError(f"{os.path.abspath(workdir)} is in use by another training run "
                        f"({owner}). Wait for it to finish, stop it, or pass another "
                        "--workdir.") from None
    # The lock is ours; whatever the file said belonged to a process that has died.
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the flock


def _lines_and_rows(path: str) -> List[Tuple[str, Optional[Dict[str, Any]]]]:
  """(line, its JSON object or None if it is not one) for each line of `path`."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # torn or garbled (a crash mid-write)
        row = None
      out.append((line, row if isinstance(row, dict) else None))
  return out


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """The rows of a metrics.jsonl file; lines that are not JSON objects are skipped."""
  return [row for _, row in _lines_and_rows(path) if row is not None]


def repair_metrics(path: str, resumed_from: int) -> int:
  """Cuts a torn last line and rows after step `resumed_from` from `path`; returns how many
  lines were dropped. The file is rewritten through a temporary file and a rename."""
  lines = _lines_and_rows(path)
  # A row written after the checkpoint being resumed is written again by the resumed run;
  # a last line without its newline would swallow the next row appended to it.
  kept = [line for line, row in lines if row is not None and line.endswith("\n")
          and int(row.get("step", 0)) <= resumed_from]
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    logging.info("metrics.jsonl: dropped %d line(s) (torn, or after resumed step %d).",
                 dropped, resumed_from)
  return dropped
