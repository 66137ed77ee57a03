"""An exclusive lock on a run directory: ``fcntl.flock`` on ``DIR/.lock``.

The kernel drops a flock when its process dies (even by kill -9), so a dead run never leaves a
stale lock. The file records the holder's pid, host and start time so a refused process can say
who holds the directory. ``hold(workdir)`` is re-entrant within a process (``run_all`` holds it
across its stages).

In a multi-process run (``mesajax.distributed``) only process 0 takes the lock (the processes of
one job share the directory; processes on other hosts could not share a flock anyway); the others
wait for its outcome and raise the same ``Locked`` when it is refused.
"""
from __future__ import annotations

from mesajax import distributed

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

_held: dict[str, list] = {}  # realpath -> [fd, depth]


class Locked(ValueError):
  """Another process holds the run directory."""


def _holder(fd) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or "{}")
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"(since {info.get('since', '?')})")
  except (OSError, ValueError):
    return "another process"


def _acquire(workdir: str):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    who = _holder(fd)
    os.close(fd)
    raise Locked(f"{workdir} is in use by {who}; wait for it to finish or use another "
                 f"--workdir") from None
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "command": " ".join(sys.argv)[:500]}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(info).encode())
  return fd


@contextlib.contextmanager
def hold(workdir: str):
  """Creates ``workdir`` if needed and holds its lock for the duration (``Locked`` if taken)."""
  key = os.path.realpath(workdir)
  if key in _held:
    _held[key][1] += 1
    try:
      yield
    finally:
      _held[key][1] -= 1
    return
  fd = distributed.on_primary(lambda: _acquire(workdir), error=Locked)
  fd = fd if distributed.is_primary() else None  # only process 0 holds a file descriptor
  _held[key] = [fd, 1]
  try:
    yield
  finally:
    _held[key][1] -= 1
    if _held[key][1] == 0:
      del _held[key]
      if fd is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
          os.close(fd)
