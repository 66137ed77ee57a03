"""JAX's persistent compilation cache for command-line runs.

An analysis compiles one program per (optimizer, task family, shape); split families that differ
only in a knob the program never sees (e.g. the label noise, used only when tasks are sampled)
lower to the same XLA program, and so do the programs of a rerun. With the persistent cache
(``jax_compilation_cache_dir``) XLA compiles each distinct program once per machine; the cache is
keyed by the program text, the jax/jaxlib versions and the backend, so it never serves a program
for a different computation.

``MESAJAX_COMPILE_CACHE``: unset, the cache lives in ``~/.cache/mesajax/jax``; a path puts it
there; ``off`` (or ``0`` / empty) disables it. ``run.py`` enables it in single-process runs; the
benchmark never does (it measures compilation).
"""
from __future__ import annotations

import os

ENV = "MESAJAX_COMPILE_CACHE"
DEFAULT = os.path.join("~", ".cache", "mesajax", "jax")


def cache_dir() -> str | None:
  """The cache directory ``run.py`` uses (None: disabled)."""
  value = os.environ.get(ENV, DEFAULT)
  if value.strip().lower() in ("", "0", "off", "false", "no"):
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable(path: str | None = None) -> str | None:
  """Turns the persistent cache on (every program, however fast it compiles); returns the
  directory, or None when disabled or when the directory cannot be created (a cache is an
  optimisation: it never stops a run)."""
  import jax
  path = cache_dir() if path is None else path
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  except (OSError, AttributeError, ValueError):
    return None
  return path
