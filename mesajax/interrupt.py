"""SIGINT and SIGTERM, handled the same way: a flag while work must finish, an exception otherwise.

``install()`` (run.py calls it first thing) makes both signals call ``_handler``:

* inside ``deferred()`` (meta-training, every checkpoint save and restore) the handler only records
  the signal; the training loop polls ``pending()`` after every outer step, finishes cleanly
  (waits for the save in flight, writes one checkpoint for the latest finished step if it is not
  saved yet, flushes the metrics row) and raises ``Interrupted``. Nothing ever raises inside orbax.
* outside, it raises ``Interrupted`` at once (evaluation and analyses write their rows atomically at
  the end, so an interrupted stage leaves the previous rows intact).

``Interrupted.exit_code`` is 128 + the signal number: 130 for SIGINT, 143 for SIGTERM.
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "pending": None, "installed": False}


class Interrupted(Exception):
  def __init__(self, signum: int, message: str = ""):
    self.signum = int(signum)
    self.exit_code = 128 + self.signum
    name = signal.Signals(self.signum).name
    super().__init__(message or f"interrupted by {name}")


def _handler(signum, frame):
  if _state["depth"] > 0:
    if _state["pending"] is None:
      _state["pending"] = signum
    return
  raise Interrupted(signum)


def install() -> None:
  """Routes SIGINT and SIGTERM to the handler (main thread only; a no-op elsewhere)."""
  if threading.current_thread() is not threading.main_thread():
    return
  for s in SIGNALS:
    signal.signal(s, _handler)
  _state["installed"] = True


def pending() -> int | None:
  """The signal received inside ``deferred()`` and not yet acted on, if any."""
  return _state["pending"]


def clear() -> None:
  _state["pending"] = None


@contextlib.contextmanager
def deferred():
  """Signals received inside are recorded, not raised; on leaving the outermost ``deferred`` a
  recorded signal is raised as ``Interrupted`` (unless the caller already acted on it)."""
  _state["depth"] += 1
  try:
    yield
  finally:
    _state["depth"] -= 1
  if _state["depth"] == 0 and _state["pending"] is not None:
    signum = _state["pending"]
    _state["pending"] = None
    raise Interrupted(signum)
