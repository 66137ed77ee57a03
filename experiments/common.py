"""The shared harness of the proxy-objective experiments (``experiments/<name>/run.py``).

An experiment is a family of *variants* (configs that differ in one or two knobs, e.g. the
fraction of training tasks with distant optima), each run through the mesajax pipeline
(meta-train a seed population -> evaluate on every split -> analyse every member -> rows) in its own
directory ``DIR/<variant>``; the harness gathers every variant's rows into ``DIR/results.jsonl``
(each row with a ``variant`` column and the variant's sweep parameters as columns) and renders
markdown tables with confidence intervals, figures and ``DIR/README.md`` from those rows only.

API (everything takes and returns plain rows, ``mesajax.report.rows``)::

  from experiments import common
  variants = {"far0": common.Variant(config, params={"far_frac": 0.0}), ...}
  rows = common.run_variants(variants, DIR, controls=("adam", "sgd"))   # resumes; skips done stages
  rows = common.load_results(DIR)                                        # --regenerate: rows only
  common.loss_table(rows)                      # variants x splits: learned (seeds-then-tasks CI)
                                               # beside each tuned baseline, oracle, paired Δ
  common.analysis_table(rows, [("objective_fit", "w:l2_init"), ...])   # metric, CI, null, p
  common.sweep_figure(rows, "far_frac", path)  # final outer loss against a sweep parameter
  common.metric_figure(rows, "objective_fit", "w:l2_init", "far_frac", path)
  common.write_readme(DIR, title, [(heading, markdown), ...], conclusion)
  common.main(__doc__, build_variants, write_report)                     # the run.py CLI

Stages and what "done" means (a rerun regenerates tables and figures from existing rows cheaply):

* train: skipped when the latest checkpoint is at ``meta.num_outer_steps`` (the pipeline's
  ``train`` also resumes an interrupted run; a different config in the directory is an error).
* evaluate / analyse: skipped when ``DIR/<variant>/results.jsonl`` holds rows of that stage
  computed from the latest checkpoint.
* controls: each hand-designed optimizer in ``controls`` (e.g. ``adam``, ``sgd``) runs through the
  same analysis suite with its learning rate tuned on the variant's held-out split (the
  ``tuning`` rows of the evaluation: the rate a practitioner would pick on the training
  distribution), written as stage ``analyze_control`` with ``role = "control:tuned"``. Skipped when
  its rows exist.

Every analysis row of a population carries ``seed`` (the member's meta-training seed); tables
summarise a metric over members as the mean of the member values, its range and how many members
clear the metric's null (``clears_null``), and show a single row (a hand-designed optimizer) with
its own bootstrap CI, null and p-value.

``--regenerate`` reads ``DIR/results.jsonl`` only (no checkpoints needed), so a directory holding
just the gathered rows -- such as ``experiments/<name>/`` after ``--publish`` -- regenerates its
README and figures with one command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Callable, Iterable, Sequence

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from mesajax import allocator, checkpoint, lock  # noqa: E402
from mesajax import pipeline  # noqa: E402
from mesajax.config import resolve  # noqa: E402
from mesajax.report.rows import make_row, ordered_unique, read_rows, replace_rows, write_rows  # noqa: E402

RESULTS = "results.jsonl"
PUBLISHED = "results.jsonl.gz"  # the committed copy of the rows (``publish``), about 10x smaller
TIMING = "timing.json"
CONTROL_STAGE = "analyze_control"


@dataclasses.dataclass
class Variant:
  """One config of an experiment; ``params`` are the sweep values copied onto its rows."""
  config: ml_collections.ConfigDict
  params: dict = dataclasses.field(default_factory=dict)
  stages: tuple | None = None     # analyses of this variant (None: run_variants' ``stages``; (): none)
  controls: tuple | None = None   # tuned hand-designed controls (None: run_variants' ``controls``)


# --- running -------------------------------------------------------------------------------------

def check_variants(variants: dict) -> dict:
  """Resolves every variant's config (one-line ``ValueError`` before anything compiles)."""
  if not variants:
    raise ValueError("an experiment needs at least one variant")
  out = {}
  for name, v in variants.items():
    if not name or any(c in name for c in "/\\ \n"):
      raise ValueError(f"variant name {name!r} must be a non-empty name without '/', spaces")
    try:
      out[name] = Variant(resolve(v.config), dict(v.params), v.stages, v.controls)
    except ValueError as e:
      raise ValueError(f"variant {name!r}: {e}") from None
  return out


def _stage_done(path: str, stage: str, at, optimizer: str | None = None) -> bool:
  return any(r.get("stage") == stage and r.get("checkpoint") == at
             and (optimizer is None or r.get("optimizer") == optimizer) for r in read_rows(path))


def _timing(wd: str, key: str, seconds: float) -> None:
  path = os.path.join(wd, TIMING)
  t = json.load(open(path)) if os.path.exists(path) else {}
  t[key] = seconds
  with open(path, "w") as f:
    json.dump(t, f)


def _timed(wd, key, fn, *a, **k):
  t0 = time.perf_counter()
  out = fn(*a, **k)
  _timing(wd, key, time.perf_counter() - t0)
  return out


def tuned_lr(rows: Sequence[dict], optimizer: str, split: str = "heldout") -> float | None:
  """The learning rate the evaluation's grid search picked for ``optimizer`` on ``split``."""
  for r in rows:
    if (r.get("analysis"), r.get("split"), r.get("optimizer"), r.get("metric")) == (
        "tuning", split, optimizer, "best_lr"):
      return r["value"]
  return None


def analyze_learned(wd: str, stages=None) -> list[dict]:
  """``pipeline.analyze`` restricted to ``stages`` (None: every analysis; the same rows, nulls
  and per-member seeds as the pipeline)."""
  return pipeline.analyze(wd, stages=stages)


def analyze_control(wd: str, config, name: str, lr: float, stages=None) -> list[dict]:
  """A hand-designed optimizer at learning rate ``lr`` through the analysis suite on the run's
  splits (no-objective controls off: the learned run already analysed them on the same tasks)."""
  from mesajax.analysis.suite import run_analyses
  from mesajax.splits import make_splits
  opt, phi = pipeline.hand_designed(config, name)
  phi = opt.with_learning_rate(phi, lr)
  acfg = ml_collections.ConfigDict(config.analysis.to_dict())
  acfg.controls = ()
  rows = run_analyses(opt, phi, name, make_splits(config), acfg, int(config.seed),
                      stages=None if stages is None else tuple(stages))
  rows = [dict(r, role="control:tuned", lr=float(lr)) if r.get("role") == "analysed" else r
          for r in rows]
  with lock.hold(wd):
    return replace_rows(os.path.join(wd, RESULTS), rows, stage=CONTROL_STAGE, checkpoint=None)


def run_variant(name: str, variant: Variant, workdir: str, controls: Sequence[str] = (),
                stages=None, progress: bool = False) -> list[dict]:
  """Runs one variant into ``workdir/name`` (skipping completed stages); returns its rows."""
  wd = os.path.join(workdir, name)
  config = variant.config
  stages = stages if variant.stages is None else variant.stages
  controls = controls if variant.controls is None else variant.controls
  os.makedirs(wd, exist_ok=True)
  path = os.path.join(wd, RESULTS)
  steps = checkpoint.all_steps(wd) if os.path.isdir(checkpoint.checkpoint_dir(wd)) else []
  if not steps or max(steps) < int(config.meta.num_outer_steps):
    print(f"[{name}] meta-train", flush=True)
    _timed(wd, "train_s", pipeline.train, config, wd, progress)
  at = max(checkpoint.all_steps(wd))
  if not _stage_done(path, "evaluate", at):
    print(f"[{name}] evaluate", flush=True)
    _timed(wd, "evaluate_s", pipeline.evaluate, wd)
  if (stages is None or len(stages)) and not _stage_done(path, "analyze", at):
    print(f"[{name}] analyse", flush=True)
    _timed(wd, "analyze_s", analyze_learned, wd, stages)
  for c in controls:
    if not _stage_done(path, CONTROL_STAGE, None, optimizer=c):
      lr = tuned_lr(read_rows(path), c)
      if lr is None:
        raise ValueError(f"variant {name}: control {c!r} has no tuned learning rate; add it to "
                         f"config.eval.baselines")
      print(f"[{name}] analyse control {c} (lr {lr:.3g})", flush=True)
      _timed(wd, f"control_{c}_s", analyze_control, wd, config, c, lr, stages)
  return variant_rows(name, variant.params, workdir)


def variant_rows(name: str, params: dict, workdir: str) -> list[dict]:
  """``DIR/<name>``'s rows with the ``variant`` and sweep-parameter columns, plus timing rows."""
  wd = os.path.join(workdir, name)
  rows = [dict(r, variant=name, **params) for r in read_rows(os.path.join(wd, RESULTS))]
  tpath = os.path.join(wd, TIMING)
  if os.path.exists(tpath):
    for k, v in json.load(open(tpath)).items():
      rows.append(dict(make_row("timing", None, None, k, v), variant=name, **params))
  return rows


def run_variants(variants: dict, workdir: str, controls: Sequence[str] = (), stages=None,
                 progress: bool = False) -> list[dict]:
  """Runs every variant (configs checked first) and writes ``DIR/results.jsonl``; returns rows."""
  variants = check_variants(variants)
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for name, v in variants.items():
    rows += run_variant(name, v, workdir, controls, stages, progress)
  write_rows(os.path.join(workdir, RESULTS), rows)
  return rows


def load_results(workdir: str) -> list[dict]:
  """The gathered rows of ``DIR/results.jsonl`` (or of its published copy ``results.jsonl.gz``
  where only that exists, as in ``experiments/<name>/``); one-line ``ValueError`` when there are
  none."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path) and os.path.exists(os.path.join(workdir, PUBLISHED)):
    path = os.path.join(workdir, PUBLISHED)
  rows = read_rows(path)
  if not rows:
    raise ValueError(f"{path} holds no rows; run the experiment first (without --regenerate)")
  return rows


# --- formatting and selection --------------------------------------------------------------------

def fmt(v, digits: int = 4) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, (int, float)):
    return f"{v:.{digits}g}"
  return str(v)


def fmt_ci(r: dict | None) -> str:
  """``value [lo, hi]``, ``inf`` for a non-finite value, ``n/a (reason)`` for an undefined one."""
  if r is None:
    return "–"
  bad = r.get("nonfinite") or {}
  val = lambda k: bad.get(k) if r.get(k) is None and k in bad else fmt(r.get(k))  # noqa: E731
  if r.get("value") is None and "value" not in bad:
    return f"n/a ({r['undefined']})" if r.get("undefined") else "n/a"
  if r.get("ci_low") is None and r.get("ci_high") is None and not bad.keys() & {"ci_low", "ci_high"}:
    return val("value")
  return f"{val('value')} [{val('ci_low')}, {val('ci_high')}]"


def select(rows: Iterable[dict], **match) -> list[dict]:
  """The rows whose keys equal every ``match`` value (``key=None`` matches a missing key)."""
  return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def find(rows, **match) -> dict | None:
  out = select(rows, **match)
  return out[0] if out else None


def learned_name(rows) -> str:
  return next(r["optimizer"] for r in rows if r.get("analysis") == "eval"
              and r.get("role") == "learned")


def table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])


# --- tables --------------------------------------------------------------------------------------

def loss_table(rows: Sequence[dict], metric: str = "final_outer_loss", variants=None, splits=None,
               baselines=None, show_params: Sequence[str] = ()) -> str:
  """Variants x splits: the learned population's ``metric`` (mean over seeds and tasks, 95% CI
  from the seeds-then-tasks bootstrap of the ``eval_seeds`` rows; a single run: its ``eval`` row),
  its across-seed sd, each tuned baseline (95% CI over tasks), the oracle, and for the final loss
  the paired difference learned − baseline (seeds-then-tasks CI; < 0: the learned one is better)."""
  ev = [r for r in rows if r.get("analysis") in ("eval", "eval_seeds")]
  variants = variants or ordered_unique(r["variant"] for r in ev)
  splits = splits or ordered_unique(r["split"] for r in ev)
  name = learned_name(rows)
  baselines = baselines or ordered_unique(r["optimizer"] for r in ev if r.get("role") == "baseline")
  has_oracle = any(r["optimizer"] == "oracle" for r in ev)
  diff = metric == "final_outer_loss"
  head = ["variant", *show_params, "split", f"{name} (seeds)", "seed sd", *baselines,
          *(["oracle"] if has_oracle else []), *([f"Δ vs {b}" for b in baselines] if diff else [])]
  lines = []
  for v in variants:
    for s in splits:
      rv = select(ev, variant=v, split=s)
      if not rv:
        continue
      pop = find(rv, analysis="eval_seeds", optimizer=name, metric=metric)
      single = find(rv, analysis="eval", optimizer=name, metric=metric)
      sd = find(rv, analysis="eval_seeds", optimizer=name, metric=f"{metric}:seed_sd")
      line = [v, *[fmt(rv[0].get(p)) for p in show_params], s,
              fmt_ci(pop or single) + (f" (S={pop['seeds']})" if pop else ""),
              fmt(sd["value"]) if sd else "–"]
      line += [fmt_ci(find(rv, analysis="eval", optimizer=b, metric=metric)) for b in baselines]
      if has_oracle:
        line.append(fmt_ci(find(rv, analysis="eval", optimizer="oracle", metric=metric)))
      if diff:
        line += [fmt_ci(find(rv, analysis="eval_seeds", metric="final_outer_loss_diff",
                             baseline=b)) for b in baselines]
      lines.append(line)
  return table(head, lines)


def summarise(group: Sequence[dict]) -> dict:
  """One table cell from the rows of one (variant, split, optimizer, analysis, metric[, baseline]):
  a single row as is; several (a seed population) as the mean of the member values, their range
  and the number of members clearing the null."""
  if len(group) == 1:
    r = group[0]
    return {"value": fmt_ci(r), "null": r.get("null") or "–", "p": fmt(r.get("p_value"), 2),
            "clears": fmt(r.get("clears_null")) if "clears_null" in r else "–", "n": fmt(r.get("n"))}
  vals = [r["value"] for r in group if r.get("value") is not None]
  clears = [r.get("clears_null") for r in group if "clears_null" in r]
  ps = [r["p_value"] for r in group if r.get("p_value") is not None]
  value = (f"{fmt(sum(vals) / len(vals))} (range {fmt(min(vals))}..{fmt(max(vals))}, "
           f"{len(vals)}/{len(group)} seeds)") if vals else (
      f"n/a ({group[0].get('undefined')})" if group[0].get("undefined") else "n/a")
  return {"value": value, "null": group[0].get("null") or "–",
          "p": f"max {fmt(max(ps), 2)}" if ps else "–",
          "clears": f"{sum(bool(c) for c in clears)}/{len(group)} seeds" if clears else "–",
          "n": fmt(group[0].get("n"))}


def analysis_table(rows: Sequence[dict], items: Sequence[tuple[str, str]], variants=None,
                   splits=None, optimizers=None, show_params: Sequence[str] = ()) -> str:
  """Analysis metrics ``items`` = [(analysis, metric), ...] per variant, split and optimizer
  (learned members, their untrained null ``<name>@init``, no-objective controls, tuned
  hand-designed controls): value (or member summary), the null it is tested against, its p-value
  and whether it clears the null (``summarise``). Paired rows show ``optimizer − baseline``."""
  an = [r for r in rows if (r.get("analysis"), r.get("metric")) in set(items)]
  variants = variants or ordered_unique(r["variant"] for r in an)
  splits = splits or ordered_unique(r["split"] for r in an)
  head = ["variant", *show_params, "split", "optimizer", "role", "analysis / metric", "value", "n",
          "null", "p", "clears null"]
  lines = []
  for v in variants:
    for s in splits:
      for a, m in items:
        rv = select(an, variant=v, split=s, analysis=a, metric=m)
        keys = ordered_unique((r["optimizer"], r.get("baseline")) for r in rv)
        for opt, base in keys:
          if optimizers is not None and opt not in optimizers:
            continue
          g = [r for r in rv if r["optimizer"] == opt and r.get("baseline") == base]
          c = summarise(g)
          who = opt if base is None else f"{opt} − {base}"
          lines.append([v, *[fmt(g[0].get(p)) for p in show_params], s, who,
                        g[0].get("role") or "–", f"{a} / {m}", c["value"], c["n"], c["null"],
                        c["p"], c["clears"]])
  return table(head, lines)


def timing_table(rows: Sequence[dict]) -> str:
  t = [r for r in rows if r.get("analysis") == "timing"]
  keys = ordered_unique(r["metric"] for r in t)
  lines = [[v, *[fmt(getattr_or(find(t, variant=v, metric=k), "value"), 3) for k in keys]]
           for v in ordered_unique(r["variant"] for r in t)]
  return table(["variant", *[k[:-2].replace("_", " ") + " s" if k.endswith("_s") else k
                             for k in keys]], lines)


def getattr_or(r, key):
  return None if r is None else r.get(key)


# --- figures -------------------------------------------------------------------------------------

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _xs(rows, x_param, variants):
  return [find(rows, variant=v)[x_param] if x_param else i for i, v in enumerate(variants)]


def sweep_figure(rows: Sequence[dict], x_param: str | None, path: str,
                 metric: str = "final_outer_loss", splits=None, logy: bool = True) -> str:
  """One panel per split: ``metric`` against the sweep parameter ``x_param`` (None: the variant
  index) -- the learned population's mean with its seeds-then-tasks 95% CI and each member's mean
  (dots), and each tuned baseline with its 95% CI over tasks."""
  plt = _plt()
  ev = [r for r in rows if r.get("analysis") in ("eval", "eval_seeds") and r.get("metric") == metric]
  name = learned_name(rows)
  variants = ordered_unique(r["variant"] for r in ev)
  splits = splits or ordered_unique(r["split"] for r in ev)
  xs = _xs(rows, x_param, variants)
  fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
  for ax, s in zip(axes[0], splits):
    def band(opt, analysis, **kw):
      pts = [find(ev, variant=v, split=s, optimizer=opt, analysis=analysis) for v in variants]
      y = [_num(p, "value") for p in pts]
      lo = [_num(p, "ci_low") for p in pts]
      hi = [_num(p, "ci_high") for p in pts]
      ax.errorbar(xs, y, yerr=[[max(a - b, 0) if a == a and b == b else 0 for a, b in zip(y, lo)],
                               [max(b - a, 0) if a == a and b == b else 0 for a, b in zip(y, hi)]],
                  capsize=3, marker="o", **kw)
    band(name, "eval_seeds", color="tab:red", label=f"{name} (seeds)", lw=2)
    for v, x in zip(variants, xs):
      m = [r["value"] for r in select(ev, variant=v, split=s, optimizer=name, analysis="eval")
           if r.get("value") is not None]
      ax.plot([x] * len(m), m, ".", color="tab:red", alpha=0.35)
    for b, col in zip(ordered_unique(r["optimizer"] for r in ev if r.get("role") == "baseline"),
                      ("tab:orange", "tab:gray", "tab:blue", "tab:purple")):
      band(b, "eval", color=col, label=f"{b} (tuned lr)", ls="--")
    if logy:
      ax.set_yscale("log")
    ax.set_title(s)
    ax.set_xlabel(x_param or "variant")
    ax.set_ylabel(metric.replace("_", " "))
  axes[0][0].legend(fontsize=7)
  return _save(fig, path)


def metric_figure(rows: Sequence[dict], analysis: str, metric: str, x_param: str | None,
                  path: str, splits=None) -> str:
  """An analysis metric against the sweep parameter, one panel per split: each learned member
  (dots) and their mean, the untrained null and each control (lines)."""
  plt = _plt()
  an = select(rows, analysis=analysis, metric=metric)
  variants = ordered_unique(r["variant"] for r in an)
  splits = splits or ordered_unique(r["split"] for r in an)
  xs = _xs(rows, x_param, variants)
  fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
  for ax, s in zip(axes[0], splits):
    # Values spanning many decades (e.g. a weight in raw units where a term's gradient is tiny,
    # as for the untrained null near θ₀) would flatten every other line onto 0: symmetric log
    # scale, linear within the median magnitude.
    mags = sorted(abs(r["value"]) for r in an if r["split"] == s and r.get("value") is not None
                  and r["value"] != 0 and math.isfinite(r["value"]))
    if mags and mags[-1] > 1e3 * mags[len(mags) // 2]:
      ax.set_yscale("symlog", linthresh=mags[len(mags) // 2])
    for opt in ordered_unique(r["optimizer"] for r in an if r["split"] == s):
      per = [[r["value"] for r in select(an, variant=v, split=s, optimizer=opt)
              if r.get("value") is not None] for v in variants]
      mean = [sum(p) / len(p) if p else float("nan") for p in per]
      style = "-o" if "@" not in opt else ":"
      line, = ax.plot(xs, mean, style, label=opt)
      for x, p in zip(xs, per):
        if len(p) > 1:
          ax.plot([x] * len(p), p, ".", color=line.get_color(), alpha=0.4)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(s)
    ax.set_xlabel(x_param or "variant")
    ax.set_ylabel(f"{analysis}: {metric}")
  axes[0][0].legend(fontsize=7)
  return _save(fig, path)


def _num(r, key):
  v = None if r is None else r.get(key)
  return float("nan") if v is None else float(v)


def _save(fig, path):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _plt().close(fig)
  return path


# --- README and CLI ------------------------------------------------------------------------------

def figures_section(paths: Sequence[str | None]) -> str:
  """Markdown image links to ``figures/<name>`` for the figures written (``None``: skipped)."""
  return "\n".join(f"![{os.path.basename(f)}](figures/{os.path.basename(f)})" for f in paths if f)


def write_readme(workdir: str, title: str, sections: Sequence[tuple[str, str]],
                 conclusion: str) -> str:
  """``DIR/README.md``: the title, each ``(heading, markdown)`` section, then "What the numbers
  show" with ``conclusion`` (computed from rows by the experiment)."""
  parts = [f"# {title}", ""]
  for heading, body in sections:
    parts += ([f"## {heading}", ""] if heading else []) + [body.rstrip(), ""]
  parts += ["## What the numbers show", "", conclusion.rstrip(), ""]
  path = os.path.join(workdir, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path


def publish(workdir: str, dest: str) -> None:
  """Copies ``DIR``'s README.md and figures/ to ``dest`` (e.g. the experiment's folder) and its rows
  as ``results.jsonl.gz``, so ``--regenerate --workdir dest`` rebuilds them from the committed
  rows (``pandas.read_json(dest + "/results.jsonl.gz", lines=True)`` reads them too)."""
  os.makedirs(dest, exist_ok=True)
  rows = load_results(workdir)
  same = os.path.realpath(workdir) == os.path.realpath(dest)
  if not same:
    shutil.copyfile(os.path.join(workdir, "README.md"), os.path.join(dest, "README.md"))
  write_rows(os.path.join(dest, PUBLISHED), rows)
  if os.path.exists(os.path.join(dest, RESULTS)):
    os.remove(os.path.join(dest, RESULTS))  # the uncompressed copy (rows kept in the .gz)
  src = os.path.join(workdir, "figures")
  if os.path.isdir(src) and not same:
    shutil.copytree(src, os.path.join(dest, "figures"), dirs_exist_ok=True)


def main(doc: str, build: Callable[[bool], dict], report: Callable[[str, list, bool], str],
         controls: Sequence[str] = (), stages=None, argv=None,
         runner: Callable[[dict, str], list] | None = None,
         quick_controls: Sequence[str] | None = None, quick_stages=None) -> int:
  """The ``run.py`` command line: ``--workdir DIR [--quick] [--regenerate] [--publish DEST]``.

  ``build(quick) -> {variant: Variant}``; ``report(workdir, rows, quick) -> README path``;
  ``runner(variants, workdir) -> rows`` replaces ``run_variants`` (e.g. to add known-answer rows).
  ``quick_controls`` / ``quick_stages``: what ``--quick`` runs instead of ``controls`` /
  ``stages`` (None: the same).
  Bad input is a one-line error and exit status 2 before anything compiles."""
  allocator.keep_freed_memory()  # as run.py (mesajax/allocator.py)
  ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
  ap.add_argument("--workdir", required=True, help="output directory (created)")
  ap.add_argument("--quick", action="store_true", help="the CI size (seconds to minutes)")
  ap.add_argument("--regenerate", action="store_true",
                  help="only rebuild README.md and figures from DIR/results.jsonl")
  ap.add_argument("--publish", default=None,
                  help="copy README.md, figures/ and the rows (results.jsonl.gz) to this folder "
                       "afterwards")
  args = ap.parse_args(argv)
  try:
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
      raise ValueError(f"--workdir {args.workdir} is not a directory")
    if args.regenerate:
      rows = load_results(args.workdir)
      quick = any(r.get("quick") for r in rows)
    else:
      variants = build(args.quick)
      for v in variants.values():
        v.params = dict(v.params, quick=bool(args.quick))
      if args.quick:
        controls = controls if quick_controls is None else quick_controls
        stages = stages if quick_stages is None else quick_stages
      rows = (runner(variants, args.workdir) if runner is not None else
              run_variants(variants, args.workdir, controls=controls, stages=stages))
      quick = args.quick
    path = report(args.workdir, rows, quick)
    if args.publish:
      publish(args.workdir, args.publish)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0
