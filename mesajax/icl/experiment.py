"""Shared driver of the ICL experiments (``experiments/icl_*/run.py``, ``experiments/implied_ridge``):
parse ``--workdir DIR [--quick]``, train and evaluate several configs into ``DIR/<tag>`` (resuming
from their checkpoints), collect their rows (extra key ``run``) into ``DIR/results.jsonl`` and hand
them to the experiment's README writer. The library never imports ``experiments/``: each script
passes its own ``configs(quick)`` and ``write_readme(workdir, rows, times, quick)``.

Timing: per run the wall-clock seconds of training and of evaluation, and the 1-minute load
average of the machine at the start and the end of the run (``os.getloadavg``), so a README says
under what contention it was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

from mesajax.icl import pipeline as P
from mesajax.report.rows import append_rows, read_rows


def _load() -> float | None:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def run_all(configs: dict, workdir: str, probes=()) -> tuple[list[dict], dict]:
  """Trains (resuming) and evaluates every ``{tag: config}``; runs the layer probes
  (``pipeline.analyze``) for the tags in ``probes``. Returns ``(rows, times)`` with
  ``times[tag] = {"train_s", "evaluate_s", "load_start", "load_end"}``."""
  os.makedirs(workdir, exist_ok=True)
  rows, times = [], {}
  for tag, c in configs.items():
    wd = os.path.join(workdir, tag)
    load0, t0 = _load(), time.perf_counter()
    P.train(c, wd, progress=False)
    t1 = time.perf_counter()
    if os.path.exists(os.path.join(wd, P.RESULTS)):
      os.remove(os.path.join(wd, P.RESULTS))  # rows of an earlier evaluation of this run
    rr = P.evaluate(wd)
    if tag in probes:
      rr += P.analyze(wd)
    rows += [dict(r, run=tag) for r in rr]
    times[tag] = {"train_s": t1 - t0, "evaluate_s": time.perf_counter() - t1,
                  "load_start": load0, "load_end": _load()}
    print(f"{tag}: train {times[tag]['train_s']:.0f} s, evaluate {times[tag]['evaluate_s']:.0f} s "
          f"(load {load0} -> {times[tag]['load_end']})", flush=True)
  path = os.path.join(workdir, "results.jsonl")
  if os.path.exists(path):
    os.remove(path)
  append_rows(path, rows)
  with open(os.path.join(workdir, "times.json"), "w") as f:
    json.dump(times, f, indent=1)
  return read_rows(path), times


def timing_table(times: dict) -> str:
  """Markdown: train and evaluate seconds per run with the load average around it."""
  fmt = lambda v: "–" if v is None else f"{v:.1f}"
  out = ["| run | train s | evaluate s | load avg (1 min) at start → end |", "|---|---|---|---|"]
  sec = lambda v: "– (not in this run)" if v is None else f"{v:.0f}"
  out += [f"| {k} | {sec(t['train_s'])} | {sec(t['evaluate_s'])} | "
          f"{fmt(t['load_start'])} → {fmt(t['load_end'])} |" for k, t in times.items()]
  total = sum((t["train_s"] or 0) + (t["evaluate_s"] or 0) for t in times.values())
  out.append(f"| total | {total:.0f} s (train + evaluate) | | |")
  return "\n".join(out)


def write_markdown(workdir: str, parts: list[str]) -> str:
  """Writes ``DIR/README.md`` from ``parts`` (lines) and prints it; returns the text."""
  text = "\n".join(parts)
  with open(os.path.join(workdir, "README.md"), "w") as f:
    f.write(text)
  print(text)
  return text


def main(doc: str, configs: Callable, write_readme: Callable, probes: Callable | None = None,
         argv=None) -> None:
  """The ``run.py`` entry point of an ICL experiment: ``configs(quick) -> {tag: config}``,
  ``write_readme(workdir, rows, times, quick)``, ``probes(quick) -> tags`` to probe."""
  ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--quick", action="store_true", help="the small CI size")
  args = ap.parse_args(argv)
  cfgs = configs(args.quick)
  from mesajax.icl import config as cfg
  for tag, c in cfgs.items():  # every config checked before anything compiles
    try:
      cfg.validate(c)
    except ValueError as e:
      ap.exit(2, f"error: run {tag}: {e}\n")
  t0 = time.perf_counter()
  rows, times = run_all(cfgs, args.workdir, probes=tuple(probes(args.quick)) if probes else ())
  write_readme(args.workdir, rows, times, args.quick)
  print(f"total wall time {time.perf_counter() - t0:.0f} s")
