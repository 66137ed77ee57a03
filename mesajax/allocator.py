"""Host allocator settings for command-line runs: keep freed memory instead of returning it.

XLA:CPU allocates each program's large buffers with ``malloc``. glibc serves every request above
its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` on free,
so the next call of the same program touches every page again: one page fault per 4 KB, taken
in the kernel and serialised across threads. The analyses at 10⁵ parameters call programs with
100 MB+ buffers thousands of times. Measured (2-core AMD EPYC, jax 0.10.2): one call of the
objective fit's vmapped program on 8 tasks × 40 steps × 2048 coordinates took 3.8 s wall, 1.7 s of
it system time and 0.93 million page faults; with freed memory kept, 2.3 s, 0.03 s system time
and ~10⁵ faults. Allocation does not change arithmetic: the known-answer table and every
behavioural row of the regenerated proxy experiments came out equal to the last digit.

``keep_freed_memory()`` sets, through ``mallopt``:

  M_MMAP_MAX = 0                 large blocks come from the heap, so a freed one is reused
  M_TRIM_THRESHOLD = 2³¹ − 1     free memory at the top of the heap is kept, not given back

The cost is resident memory: the process keeps its high-water mark rather than returning freed
blocks to the system. Only glibc (Linux) has ``mallopt``; elsewhere, or with
``MESAJAX_MALLOC=default``, nothing changes. ``run.py``, the benchmark, the experiments' runner and
the test suite call it at start-up, before any large allocation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "MESAJAX_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Applies the settings above once per process; True when they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV, "").strip().lower() in ("default", "off", "0", "no", "false"):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
  return _applied
