"""Tidy result rows: one JSON object per line, read directly by ``pandas.read_json(lines=True)``.

Every row has the keys ``analysis, split, optimizer, metric, value, ci_low, ci_high, n`` (``None``
where a key does not apply). Rows may carry extra keys (e.g. ``step`` for curves, ``seed``); reports
and figures are generated from rows only.

Strict JSON: a non-finite number is stored as ``null`` and named in the row's ``nonfinite`` map
(``{"value": "inf"}``), never as a stand-in such as 1e308 that a table would average.

Rows are keyed (``row_key``) by ``stage`` and ``checkpoint`` (set by the pipeline: which stage and
which checkpoint step produced them), ``analysis, split, optimizer, metric`` and the id extras
``ID_EXTRAS`` that a row carries. ``replace_rows`` writes a stage's rows by replacing the rows with
the same keys (atomic rewrite: a temporary file, fsync, ``os.replace``), so a rerun, resumed or
interrupted stage never duplicates rows.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from typing import Any, Callable, Iterable

KEYS = ("analysis", "split", "optimizer", "metric", "value", "ci_low", "ci_high", "n")
ID_KEYS = ("stage", "checkpoint", "analysis", "split", "optimizer", "metric")
ID_EXTRAS = ("step", "lr", "baseline", "seed", "point", "probe", "layer", "term",
             "reference", "target", "run")  # the ICL rows: per reference, probe target, run


def _clean(v: Any, name: str, flags: dict):
  if v is None:
    return None
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    flags[name] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return None
  return v


def make_row(analysis: str, split: str | None, optimizer: str | None, metric: str, value,
             ci_low=None, ci_high=None, n=None, **extra) -> dict:
  flags: dict = {}
  row = {"analysis": analysis, "split": split, "optimizer": optimizer, "metric": metric,
         "value": _clean(value, "value", flags), "ci_low": _clean(ci_low, "ci_low", flags),
         "ci_high": _clean(ci_high, "ci_high", flags), "n": None if n is None else int(n)}
  row.update({k: _clean(v, k, flags) for k, v in extra.items()})
  if flags:
    row["nonfinite"] = flags
  return row


def row_key(row: dict) -> str:
  """The identity of a row (see the module docstring)."""
  key = [row.get(k) for k in ID_KEYS]
  key += [(k, row[k]) for k in ID_EXTRAS if k in row]
  return json.dumps(key, sort_keys=True, default=str)


def _check(rows):
  for r in rows:
    missing = [k for k in KEYS if k not in r]
    if missing:
      raise ValueError(f"row {r} lacks keys {missing}")
    json.dumps(r, allow_nan=False)  # strict JSON or ValueError


def write_rows(path: str, rows: Iterable[dict]) -> None:
  """Writes ``rows`` as the whole file, atomically (tmp file, fsync, ``os.replace``); gzip-compressed
  (reproducibly: no timestamp in the header) when ``path`` ends in ``.gz``."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode()
    f.write(gzip.compress(text, mtime=0) if path.endswith(".gz") else text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def replace_rows(path: str, rows: Iterable[dict], **fields) -> list[dict]:
  """Adds ``rows`` (each updated with ``fields``, e.g. ``stage=..., checkpoint=...``) to the
  JSONL file, replacing existing rows with the same ``row_key``. Atomic. Returns the new rows."""
  rows = [dict(r, **fields) for r in rows]
  _check(rows)
  new = {row_key(r): r for r in rows}
  kept = [r for r in read_rows(path) if row_key(r) not in new]
  write_rows(path, kept + list(new.values()))
  return list(new.values())


def append_rows(path: str, rows: Iterable[dict]) -> None:
  """Kept for callers of the old API: now the keyed ``replace_rows`` (no duplicates)."""
  replace_rows(path, rows)


def remove_rows(path: str, predicate: Callable[[dict], bool]) -> list[dict]:
  """Removes the rows for which ``predicate`` holds (atomic rewrite); returns them."""
  rows = read_rows(path)
  gone = [r for r in rows if predicate(r)]
  if gone:
    write_rows(path, [r for r in rows if not predicate(r)])
  return gone


def read_rows(path: str) -> list[dict]:
  """The rows of a JSONL file (``[]`` when it does not exist); a malformed line is a one-line
  ``ValueError`` naming the file and line. A path ending in ``.gz`` is read through gzip (published
  experiment rows are stored compressed; ``pandas.read_json(path, lines=True)`` reads both)."""
  if not os.path.exists(path):
    return []
  out = []
  try:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except ValueError as e:
          raise ValueError(f"{path} line {i} is not valid JSON ({e}); fix or remove that line "
                           f"(a torn last line is left by a killed writer)") from None
        if not isinstance(row, dict):
          raise ValueError(f"{path} line {i} is not a JSON object")
        out.append(row)
  except (OSError, EOFError) as e:  # gzip: BadGzipFile is an OSError, a truncated file EOFError
    raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
  return out


def ordered_unique(values: Iterable) -> list:
  """Distinct values in order of first appearance (table row/column order)."""
  return list(dict.fromkeys(values))
