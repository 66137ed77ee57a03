"""Figures generated from rows only (matplotlib, Agg backend): PNGs under ``DIR/figures/``.

* ``meta_training_curve``: meta-loss against outer step from ``metrics.jsonl`` rows (log y when the
  meta-loss is positive; logged steps where skipped (non-finite) outer updates occurred are marked).
* ``eval_curves``: per split, the held-out outer loss against inner step, mean over tasks with its
  95% bootstrap band (``eval_curve`` rows), learned optimizer against the tuned baselines.

Non-finite values (stored as ``None``, ``mesajax.report.rows``) are not drawn.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BASELINE_COLORS = {"sgd": "tab:gray", "sgdm": "tab:blue", "adam": "tab:orange",
                   "rmsprop": "tab:purple"}
OTHER_BASELINE_COLORS = ("tab:olive", "tab:cyan", "tab:brown")
LEARNED_COLORS = ("tab:red", "tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
ROLE_LABELS = {"learned": "learned", "baseline": "tuned lr", "oracle": "oracle"}


def _num(v) -> float:
  if v is None:
    return np.nan
  v = float(v)
  return v if np.isfinite(v) else np.nan


def meta_training_curve(metrics: Sequence[dict], path: str) -> str | None:
  """Meta-loss vs outer step; returns ``path``, or ``None`` when there is nothing to plot."""
  pts = [(r["outer_step"], _num(r.get("meta_loss"))) for r in metrics
         if r.get("outer_step") is not None and "meta_loss" in r]
  if not pts:
    return None
  pts.sort()
  step = np.array([p[0] for p in pts], np.float64)
  loss = np.array([p[1] for p in pts], np.float64)
  fig, ax = plt.subplots(figsize=(6, 3.8))
  ax.plot(step, loss, color="tab:red", lw=1.5, label="meta-loss")
  skipped, total, prev = [], 0, 0
  for r in sorted(metrics, key=lambda r: r.get("outer_step") or 0):
    if r.get("num_skipped") is not None:  # running count: mark where it grows
      if r["num_skipped"] > prev:
        skipped.append(r["outer_step"])
      prev = total = r["num_skipped"]
  if skipped:
    ax.plot([], [], "k|", label=f"outer updates skipped ({total})")
    for s in skipped:
      ax.axvline(s, color="k", lw=0.5, alpha=0.3)
  finite = loss[np.isfinite(loss)]
  if finite.size and np.all(finite > 0):
    ax.set_yscale("log")
  ax.set_xlabel("outer step")
  ax.set_ylabel("meta-loss")
  ax.set_title("Meta-training")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  return _save(fig, path)


def eval_curves(rows: Iterable[dict], split: str, path: str) -> str | None:
  """Held-out outer-loss curves of every optimizer on ``split`` (learned first, then the tuned
  baselines; styled by each row's ``role``); ``None`` if no curve rows."""
  curves: dict[str, list] = {}
  n_tasks, role = {}, {}
  for r in rows:
    if r.get("analysis") == "eval_curve" and r.get("split") == split and r.get("metric") == "outer_loss":
      curves.setdefault(r["optimizer"], []).append(
          (r["step"], _num(r["value"]), _num(r["ci_low"]), _num(r["ci_high"])))
      n_tasks[r["optimizer"]] = r.get("n")
      role[r["optimizer"]] = r.get("role", "learned")
  if not curves:
    return None
  order = sorted(curves, key=lambda o: (role[o] != "learned", list(curves).index(o)))
  fig, ax = plt.subplots(figsize=(6, 3.8))
  positive = True
  learned_i = other_i = 0
  for name in order:
    pts = np.array(sorted(curves[name]), np.float64)
    step, mean, lo, hi = pts.T
    if role[name] == "learned":
      color, ls = LEARNED_COLORS[learned_i % len(LEARNED_COLORS)], "-"
      learned_i += 1
    else:
      color = BASELINE_COLORS.get(name)
      if color is None:
        color = OTHER_BASELINE_COLORS[other_i % len(OTHER_BASELINE_COLORS)]
        other_i += 1
      ls = "--"
    label = f"{name} ({ROLE_LABELS.get(role[name], role[name])})"
    ax.plot(step, mean, color=color, ls=ls, lw=1.8 if ls == "-" else 1.3, label=label)
    ax.fill_between(step, lo, hi, color=color, alpha=0.18, lw=0)
    vals = np.concatenate([mean, lo, hi])
    vals = vals[np.isfinite(vals)]
    positive &= bool(vals.size == 0 or np.all(vals > 0))
  if positive:
    ax.set_yscale("log")
  n = next(iter(n_tasks.values()))
  ax.set_xlabel("inner step")
  ax.set_ylabel("outer loss (mean over tasks)")
  ax.set_title(f"Held-out tasks, split {split!r} (n={n}; bands: 95% bootstrap CI)", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def split_names(rows: Iterable[dict], analysis: str = "eval_curve") -> list[str]:
  """Splits present in ``rows`` for ``analysis``, ``heldout`` first, then in order of appearance."""
  seen = []
  for r in rows:
    if r.get("analysis") == analysis and r.get("split") is not None and r["split"] not in seen:
      seen.append(r["split"])
  return sorted(seen, key=lambda s: (s != "heldout", seen.index(s)))


def make_figures(rows: Sequence[dict], metrics: Sequence[dict], outdir: str) -> dict:
  """All report figures. Returns ``{"meta_training": path|None, "eval_curves": {split: path}}``."""
  out = {"meta_training": meta_training_curve(metrics, os.path.join(outdir, "meta_training.png")),
         "eval_curves": {}}
  for split in split_names(rows):
    p = eval_curves(rows, split, os.path.join(outdir, f"eval_curves_{split}.png"))
    if p:
      out["eval_curves"][split] = p
  return out
