"""``DIR/report.md`` generated from a run directory's rows: no number is typed by hand.

Inputs: ``DIR/results.jsonl`` (tidy rows, ``mesajax.report.rows``), ``DIR/metrics.jsonl``
(meta-training log rows: ``outer_step``, ``meta_loss``, ``skipped``, ``time_s``, ...),
``DIR/config.json`` (resolved config) and ``DIR/meta.json`` (versions), the last two optional.
When a row is written twice (an evaluation re-run after a resume appends again), the last one wins.

Sections: a header (config, task family, optimizer, seed, versions), meta-training summary and
curve, one held-out evaluation table per split (optimizers by role — learned, tuned baselines,
oracle — x metrics, 95% bootstrap CIs over tasks) with a sentence, computed from the rows, on
whether the learned optimizer beats lr-tuned Adam on mean final outer loss, the baselines' tuning,
and the mesa-objective analyses (``report_section`` and ``make_figures`` of the analysis report).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from mesajax.report import analyses as analysis_report
from mesajax.report import figures
from mesajax.report.rows import ordered_unique, read_rows, row_key

METRIC_TITLES = {"final_outer_loss": "final outer loss", "mean_outer_loss": "mean outer loss",
                 "diverged_frac": "diverged fraction", "overfit_frac": "overfit fraction"}
ROLE_TAGS = {"learned": "(learned)", "baseline": "(tuned lr)", "oracle": "(oracle)"}


# --- formatting ----------------------------------------------------------------------------------
def fmt(v: Any) -> str:
  """A number as the report prints it: 4 significant digits."""
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, (int, float)):
    return f"{v:.4g}"
  return str(v)


def field(row: dict, key: str) -> str:
  """A row's number as printed: a non-finite value (stored as null and named in the row's
  ``nonfinite`` map, ``mesajax.report.rows``) prints as inf / -inf / nan."""
  flag = (row.get("nonfinite") or {}).get(key)
  return flag if flag is not None and row.get(key) is None else fmt(row.get(key))


def fmt_ci(row: dict | None) -> str:
  if row is None:
    return "n/a"
  if all(row.get(k) is None and k not in (row.get("nonfinite") or {}) for k in ("ci_low", "ci_high")):
    return field(row, "value")
  return f"{field(row, 'value')} [{field(row, 'ci_low')}, {field(row, 'ci_high')}]"


# --- reading -------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def dedupe(rows: Sequence[dict]) -> list[dict]:
  """Keeps the last row for each key (``mesajax.report.rows.row_key``)."""
  return list({row_key(r): r for r in rows}.values())


def _find(rows, analysis, split, optimizer, metric, **extra):
  for r in rows:
    if (r.get("analysis") == analysis and r.get("split") == split and r.get("optimizer") == optimizer
        and r.get("metric") == metric and all(r.get(k) == v for k, v in extra.items())):
      return r
  return None


def roles(rows: Sequence[dict]) -> dict[str, list[str]]:
  """Optimizer names in the eval rows by their ``role`` (``learned``, ``baseline``, ``oracle``), in
  order of appearance. The role is written by evaluation from the optimizer class."""
  out = {"learned": [], "baseline": [], "oracle": []}
  for r in rows:
    if r.get("analysis") == "eval" and r.get("role") in out and r["optimizer"] not in out[r["role"]]:
      out[r["role"]].append(r["optimizer"])
  return out


# --- sections ------------------------------------------------------------------------------------
def _header(workdir, config, meta, rows, metrics, learned) -> list[str]:
  name = config.get("name") or os.path.basename(os.path.abspath(workdir))
  out = [f"# mesajax report: {name}", ""]
  task, opt = config.get("task") or {}, config.get("optimizer") or {}
  if task:
    kw = ", ".join(f"{k}={v}" for k, v in sorted((task.get("kwargs") or {}).items()))
    out.append(f"- task family: `{task.get('name')}`" + (f" ({kw})" if kw else ""))
  if opt:
    kw = ", ".join(f"{k}={v}" for k, v in sorted((opt.get("kwargs") or {}).items()))
    out.append(f"- optimizer: `{opt.get('name')}`" + (f" ({kw})" if kw else "")
               + (f", reported as `{learned[0]}`" if learned else ""))
  elif learned:
    out.append(f"- learned optimizer: `{learned[0]}`")
  meta_cfg = config.get("meta") or {}
  if meta_cfg:
    keys = ("estimator", "num_tasks", "horizon", "unroll_length", "outer_objective", "num_outer_steps")
    out.append("- meta-training: " + ", ".join(f"{k}={meta_cfg[k]}" for k in keys if k in meta_cfg))
  if "seed" in config:
    out.append(f"- seed: {config['seed']}")
  env = [f"{k}={v}" for k, v in meta.items() if v is not None]  # meta.json: {package: version, ...}
  if env:
    out.append("- environment: " + ", ".join(env))
  out.append(f"- rows: {len(rows)} in `results.jsonl`, {len(metrics)} in `metrics.jsonl`")
  return out + [""]


def _meta_training(metrics, fig_path) -> list[str]:
  out = ["## Meta-training", ""]
  selection = [m for m in metrics if m.get("select_score") is not None]
  logged = [m for m in metrics if m.get("outer_step") is not None and "select_score" not in m]
  if not logged:
    return out + ["No meta-training log (`metrics.jsonl`) in this directory.", ""]
  logged.sort(key=lambda m: m["outer_step"])
  first, last = logged[0], logged[-1]
  parts = [f"{len(logged)} logged outer steps up to step {last['outer_step']}"]
  if "meta_loss" in last:
    parts.append(f"meta-loss {fmt(first.get('meta_loss'))} at step {first['outer_step']} -> "
                 f"{fmt(last.get('meta_loss'))} at step {last['outer_step']}")
  if last.get("num_skipped") is not None:  # running count kept by the meta-training loop
    parts.append(f"{fmt(last['num_skipped'])} outer updates skipped (non-finite meta-loss, "
                 "gradient or update)")
  if last.get("time_s") is not None:
    parts.append(f"{fmt(last['time_s'])} s of wall time since meta-training last (re)started")
  if selection:
    best = min(selection, key=lambda m: m["select_score"])
    parts.append(f"phi selected by full-horizon validation every "
                 f"{selection[1]['outer_step'] - selection[0]['outer_step'] if len(selection) > 1 else '-'}"
                 f" steps: best score {fmt(best['select_score'])} (mean final/initial outer loss on "
                 f"validation tasks) at step {best['outer_step']}, last {fmt(selection[-1]['select_score'])}")
  out.append("; ".join(parts) + ".")
  if fig_path:
    out += ["", f"![meta-training curve]({fig_path})"]
  return out + [""]


def comparison_sentence(rows, split, learned, reference="adam") -> str:
  """Whether ``learned`` beats tuned ``reference`` on mean final outer loss on ``split`` (rows only)."""
  a = _find(rows, "eval", split, learned, "final_outer_loss")
  b = _find(rows, "eval", split, reference, "final_outer_loss")
  if a is None or b is None:
    return f"No `{learned}` and lr-tuned `{reference}` final-outer-loss rows to compare on split `{split}`."
  beats = a["value"] < b["value"]
  s = (f"On split `{split}`, `{learned}` {'beats' if beats else 'does not beat'} lr-tuned `{reference}` "
       f"on mean final outer loss: {fmt_ci(a)} vs {fmt_ci(b)} (mean [95% bootstrap CI] over "
       f"{a.get('n')} held-out tasks)")
  if None not in (a.get("ci_high"), b.get("ci_low"), a.get("ci_low"), b.get("ci_high")):
    overlap = not (a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"])
    s += "; the intervals overlap" if overlap else "; the intervals do not overlap"
  d = _find(rows, "eval_paired", split, learned, "final_outer_loss_diff", baseline=reference)
  if d is not None and d.get("value") is not None:
    excl = d["ci_high"] < 0 or d["ci_low"] > 0
    s += (f". Paired over the same tasks, {learned} - {reference} = {fmt_ci(d)}, a 95% CI that "
          f"{'excludes' if excl else 'includes'} 0")
  w = _find(rows, "eval_paired", split, learned, "win_frac", baseline=reference)
  if w is not None:
    s += f"; `{learned}` ends lower on a fraction {fmt_ci(w)} of the tasks"
  div = _find(rows, "eval", split, learned, "diverged_frac")
  if div is not None and div.get("n"):
    k = round(div["value"] * div["n"])
    s += f"; {k} of {div['n']} held-out tasks diverge under `{learned}`"
  return s + "."


def _eval_section(rows, by_role, curve_figs) -> list[str]:
  out = ["## Held-out evaluation", "",
         "Each optimizer runs for the split's full inner horizon on held-out tasks (never seen in "
         "meta-training or tuning); baselines use the learning rate tuned on separate tuning tasks "
         "of the same split. Cells: mean over tasks [95% percentile-bootstrap CI over tasks]; "
         "a task diverges when its final outer loss is not finite or exceeds 100 times its "
         "initial one, and overfits when it ends above its initial loss without diverging; "
         "`inf` marks non-finite losses. The oracle row, where the task family has one, is the "
         "best achievable outer loss on the same tasks (e.g. the Bayes posterior mean).", ""]
  learned = by_role["learned"]
  optimizers = learned + by_role["baseline"] + by_role["oracle"]
  tag = {o: ROLE_TAGS[r] for r, names in by_role.items() for o in names}
  splits = figures.split_names(rows, "eval")
  if not splits:
    return out + ["No evaluation rows.", ""]
  for split in splits:
    any_row = next(r for r in rows if r.get("analysis") == "eval" and r.get("split") == split)
    horizon = any_row.get("horizon")
    out += [f"### Split `{split}`" + (f" (horizon {horizon}, {any_row.get('n')} tasks)" if horizon else ""),
            "", "| optimizer | " + " | ".join(METRIC_TITLES.values()) + " |",
            "|---|" + "---|" * len(METRIC_TITLES)]
    for o in optimizers:
      cells = [fmt_ci(_find(rows, "eval", split, o, m)) for m in METRIC_TITLES]
      if any(c != "n/a" for c in cells):
        out.append(f"| `{o}` {tag[o]} | " + " | ".join(cells) + " |")
    out.append("")
    for o in learned:
      gap = _find(rows, "eval_paired", split, o, "gap_to_oracle", baseline="oracle")
      if gap is not None:
        out += [f"Gap of `{o}` to the oracle (paired over the same tasks): {fmt_ci(gap)}"
                + (f" ({gap['undefined']})" if gap.get("undefined") else "") + ".", ""]
    for l in learned:
      out += [comparison_sentence(rows, split, l), ""]
    if split in curve_figs:
      out += [f"![held-out outer-loss curves, split {split}]({curve_figs[split]})", ""]
  return out


def _tuning_section(rows) -> list[str]:
  best = [r for r in rows if r.get("analysis") == "tuning" and r.get("metric") == "best_lr"]
  if not best:
    return []
  out = ["## Baseline tuning", "",
         "Learning rate chosen per split by grid search on separate tuning tasks, minimising the mean "
         "final outer loss (a run that diverges on any tuning task scores +inf).", "",
         "| split | baseline | best lr | grid | tuning tasks | at grid edge |", "|---|---|---|---|---|---|"]
  for r in best:
    edge = _find(rows, "tuning", r["split"], r["optimizer"], "at_grid_edge")
    failed = _find(rows, "tuning", r["split"], r["optimizer"], "all_failed")
    grid = (f"{fmt(r.get('lr_grid_min'))} .. {fmt(r.get('lr_grid_max'))} ({r.get('lr_grid_size')} pts)"
            if r.get("lr_grid_size") else "n/a")
    flag = "n/a" if edge is None else ("yes" if edge["value"] else "no")
    if failed is not None and failed["value"]:
      flag += " (every rate failed on some task)"
    out.append(f"| `{r['split']}` | `{r['optimizer']}` | {fmt(r['value'])} | {grid} | {r.get('n')} | {flag} |")
  return out + [""]


def _analysis_section(rows, workdir, figdir) -> list[str]:
  text = analysis_report.report_section(rows)
  out = ["## Mesa-objective analyses", "", text.rstrip(), ""]
  for p in analysis_report.make_figures(rows, figdir):
    rel = os.path.relpath(os.fspath(p), workdir)
    out += [f"![{os.path.splitext(os.path.basename(rel))[0]}]({rel})", ""]
  return out


def _icl_section(rows, workdir, figdir) -> list[str]:
  """An in-context learner's section (``mesajax.icl.report``): its loss beside every reference and
  null, the agreement metrics, the implied ridge λ̂ and the layer probes."""
  from mesajax.icl import report as icl_report
  out = ["## In-context learner", "", icl_report.report_section(rows).rstrip(), ""]
  for p in icl_report.make_figures(rows, figdir):
    rel = os.path.relpath(os.fspath(p), workdir)
    out += [f"![{os.path.splitext(os.path.basename(rel))[0]}]({rel})", ""]
  return out


def write_report(workdir: str) -> str:
  """Writes ``workdir/report.md`` (and figures under ``workdir/figures/``); returns its path."""
  rows = dedupe(read_rows(os.path.join(workdir, "results.jsonl")))
  metrics = read_rows(os.path.join(workdir, "metrics.jsonl"))
  config = _read_json(os.path.join(workdir, "config.json"))
  meta = _read_json(os.path.join(workdir, "meta.json"))
  figdir = os.path.join(workdir, "figures")
  by_role = roles(rows)
  learned = by_role["learned"]
  figs = figures.make_figures(rows, metrics, figdir)
  rel = lambda p: os.path.relpath(p, workdir) if p else None  # noqa: E731
  lines = _header(workdir, config, meta, rows, metrics, learned)
  if config.get("kind") == "icl":  # an in-context learner: its own section
    lines += _icl_section(rows, workdir, figdir)
  else:
    lines += _meta_training(metrics, rel(figs["meta_training"]))
    lines += _eval_section(rows, by_role, {s: rel(p) for s, p in figs["eval_curves"].items()})
    lines += _tuning_section(rows)
    lines += _analysis_section(rows, workdir, figdir)
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  return path
