"""One-line validation helpers shared by every layer (task knobs, optimizer options, configs).

A user mistake must become one ``ValueError`` line before anything compiles; these are the only
raise-if-false helpers in the library.
"""
from __future__ import annotations

import dataclasses
import math


def check(cond: bool, msg: str) -> None:
  """Raise a one-line ``ValueError(msg)`` unless ``cond``."""
  if not cond:
    raise ValueError(msg)


def is_int(v) -> bool:
  """An integer value (bools are ints in Python, but not valid sizes)."""
  return isinstance(v, int) and not isinstance(v, bool)


def check_finite_fields(obj, prefix: str) -> None:
  """Rejects NaN or infinite float fields of a dataclass (and floats inside tuple fields).

  NaN passes every range check written as ``not (x < low)`` and fails every one written as
  ``x >= low`` only by accident; infinity passes most of them. So finiteness is checked first,
  for every field, in one place.
  """
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    values = v if isinstance(v, (tuple, list)) else (v,)
    for x in values:
      if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"{prefix}: {f.name} must be finite, got {v!r}")
