"""Shared driver of the ICL experiments (``experiments/icl_*/run.py``): train and evaluate several
configs into ``DIR/<tag>``, collect their rows (extra key ``run``) into ``DIR/results.jsonl``."""
from __future__ import annotations

import os
import time

from mesajax.icl import pipeline as P
from mesajax.report.rows import append_rows, read_rows


def run_all(configs: dict, workdir: str, probes: bool = False) -> tuple[list[dict], dict]:
  """Trains (resuming) and evaluates every ``{tag: config}``; returns ``(rows, seconds)`` with
  seconds ``{tag: (train_s, evaluate_s)}``."""
  os.makedirs(workdir, exist_ok=True)
  rows, times = [], {}
  for tag, c in configs.items():
    wd = os.path.join(workdir, tag)
    t0 = time.perf_counter()
    P.train(c, wd, progress=False)
    t1 = time.perf_counter()
    rr = P.evaluate(wd)
    if probes:
      rr += P.analyze(wd)
    rows += [dict(r, run=tag) for r in rr]
    times[tag] = (t1 - t0, time.perf_counter() - t1)
    print(f"{tag}: train {times[tag][0]:.0f} s, evaluate {times[tag][1]:.0f} s", flush=True)
  path = os.path.join(workdir, "results.jsonl")
  if os.path.exists(path):
    os.remove(path)
  append_rows(path, rows)
  return read_rows(path), times


def timing_table(times: dict) -> str:
  out = ["| run | train s | evaluate s |", "|---|---|---|"]
  return "\n".join(out + [f"| {k} | {a:.0f} | {b:.0f} |" for k, (a, b) in times.items()])
