"""Tidy result rows: one JSON object per line, read directly by ``pandas.read_json(lines=True)``.

Every row has the keys ``analysis, split, optimizer, metric, value, ci_low, ci_high, n`` (``None``
where a key does not apply). Rows may carry extra keys (e.g. ``step`` for curves, ``seed``); reports
and figures are generated from rows only.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

KEYS = ("analysis", "split", "optimizer", "metric", "value", "ci_low", "ci_high", "n")


def _clean(v: Any):
  if v is None:
    return None
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
  return v


def make_row(analysis: str, split: str | None, optimizer: str | None, metric: str, value,
             ci_low=None, ci_high=None, n=None, **extra) -> dict:
  row = {"analysis": analysis, "split": split, "optimizer": optimizer, "metric": metric,
         "value": _clean(value), "ci_low": _clean(ci_low), "ci_high": _clean(ci_high),
         "n": None if n is None else int(n)}
  row.update({k: _clean(v) for k, v in extra.items()})
  return row


def append_rows(path: str, rows: Iterable[dict]) -> None:
  """Appends rows to a JSONL file (creating it), flushing and fsyncing so nothing is lost."""
  rows = list(rows)
  for r in rows:
    missing = [k for k in KEYS if k not in r]
    if missing:
      raise ValueError(f"row {r} lacks keys {missing}")
  with open(path, "a") as f:
    for r in rows:
      f.write(json.dumps(r, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def ordered_unique(values: Iterable) -> list:
  """Distinct values in order of first appearance (table row/column order)."""
  return list(dict.fromkeys(values))
