"""The ICL report section and figures, generated from result rows only (``pipeline.evaluate`` /
``analyze``). ``report_section(rows) -> str`` (markdown), ``make_figures(rows, outdir) -> paths``.
"""
from __future__ import annotations

import math
import os

from mesajax.report.rows import ordered_unique

PAIR_METRICS = ("loss_ratio", "pred_diff", "sens_cos", "sens_diff", "spd", "ilwd")


def fmt(v) -> str:
  if v is None:
    return "–"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, (int, float)) and not math.isfinite(v) or v == 1e308:
    return "inf"
  a = abs(v)
  return f"{v:.2e}" if a != 0 and (a < 1e-3 or a >= 1e4) else f"{v:.4f}"


def fmt_ci(r) -> str:
  if r is None:
    return "–"
  if r["value"] is None:
    return f"undefined ({r.get('undefined', 'no reason given')})"
  s = fmt(r["value"])
  if r.get("ci_low") is not None and r["ci_low"] != r["ci_high"]:
    s += f" [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
  return s


def _icl(rows):
  return [r for r in rows if r.get("analysis") == "icl"]


def _find(rows, split, who, metric, reference=None, seed=None, run=None):
  for r in rows:
    if (r["split"] == split and r["optimizer"] == who and r["metric"] == metric
        and r.get("reference") == reference and r.get("seed") == seed
        and (run is None or r.get("run") == run)):
      return r
  return None


def _label(run, who):
  """Rows collected from several runs (extra key ``run``) are told apart by it."""
  return who if run is None else f"{who} ({run})"


def comparison_table(rows, split: str, whos=None, refs=None) -> str:
  """One line per (model or null, reference): loss ratio and agreement metrics (pooled)."""
  rows = _icl(rows)
  pair = [r for r in rows if r["split"] == split and r["metric"] in PAIR_METRICS and r.get("seed") is None]
  whos = whos or ordered_unique(r["optimizer"] for r in pair)
  refs = refs or ordered_unique(r["reference"] for r in pair)
  out = [f"| model | reference | {' | '.join(PAIR_METRICS)} |", "|---|---|" + "---|" * len(PAIR_METRICS)]
  for who in whos:
    for ref in refs:
      cells = [fmt_ci(_find(rows, split, who, m, ref)) for m in PAIR_METRICS]
      if all(c == "–" for c in cells):
        continue
      out.append(f"| {who} | {ref} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def loss_table(rows, splits=None) -> str:
  """Query loss ½(ŷ − y)² of every model, null and reference, one column per split."""
  rows = [r for r in _icl(rows) if r["metric"] == "loss" and r.get("seed") is None]
  splits = splits or ordered_unique(r["split"] for r in rows)
  whos = ordered_unique((r.get("run"), r["optimizer"]) for r in rows)
  out = ["| model / reference | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
  for run, who in whos:
    out.append(f"| {_label(run, who)} | " + " | ".join(
        fmt_ci(_find(rows, s, who, "loss", run=run)) for s in splits) + " |")
  return "\n".join(out)


def lambda_table(rows) -> str:
  """Implied ridge λ̂ (argmin SPD to ridge_λ) beside λ* of each split and of training."""
  rows = _icl(rows)
  lam = [r for r in rows if r["metric"] == "lambda_hat" and r.get("seed") is None]
  out = ["| split | model | λ̂ [95% CI] | λ̂ per seed | λ* of the split | λ* of training |",
         "|---|---|---|---|---|---|"]
  for r in lam:
    run = r.get("run")
    per = [x["value"] for x in rows if x["metric"] == "lambda_hat" and x["split"] == r["split"]
           and x["optimizer"] == r["optimizer"] and x.get("seed") is not None
           and x.get("run") == run]
    star = _find(rows, r["split"], "bayes", "lambda_star", run=run)
    edge = " (grid edge)" if r.get("at_grid_edge") else ""
    out.append(f"| {r['split']} | {_label(run, r['optimizer'])} | {fmt_ci(r)}{edge} | "
               f"{', '.join(fmt(p) for p in per) or '–'} | {fmt(r.get('lambda_star'))} | "
               f"{fmt(star.get('lambda_star_train')) if star else '–'} |")
  return "\n".join(out)


def seed_table(rows, split: str, who: str, ref: str) -> str:
  """Per-seed loss ratio and sensitivity cosine of ``who`` against ``ref``."""
  rows = _icl(rows)
  seeds = sorted({r["seed"] for r in rows if r["split"] == split and r["optimizer"] == who
                  and r.get("seed") is not None and r["metric"] == "loss_ratio"})
  out = [f"| seed | loss / loss({ref}) | sens_cos vs {ref} | pred_diff vs {ref} |", "|---|---|---|---|"]
  for s in seeds:
    out.append(f"| {s} | " + " | ".join(fmt_ci(_find(rows, split, who, m, ref, s))
                                        for m in ("loss_ratio", "sens_cos", "pred_diff")) + " |")
  return "\n".join(out)


def probe_table(rows) -> str:
  pr = [r for r in rows if r.get("analysis") == "icl_probe"]
  if not pr:
    return ""
  out = ["| split | model | target | layer | R² held-out [95% CI] | R² shuffled control |",
         "|---|---|---|---|---|---|"]
  for r in pr:
    if r["metric"] != "r2":
      continue
    ctrl = next((x for x in pr if x["metric"] == "r2_shuffled" and x["split"] == r["split"]
                 and x["optimizer"] == r["optimizer"] and x.get("target") == r.get("target")
                 and x.get("layer") == r.get("layer")), None)
    out.append(f"| {r['split']} | {r['optimizer']} | {r.get('target')} | {r.get('layer')} | "
               f"{fmt_ci(r)} | {fmt_ci(ctrl)} |")
  return "\n".join(out)


def report_section(rows) -> str:
  """The markdown section of the ICL analyses."""
  rows = list(rows)
  icl = _icl(rows)
  if not icl and not any(r.get("analysis") == "icl_probe" for r in rows):
    return "## In-context learners\n\nNo ICL rows.\n"
  splits = ordered_unique(r["split"] for r in icl if r["metric"] == "loss")
  parts = ["## In-context learners as mesa-optimizers", "",
           "Query loss ½(ŷ − y)², mean over tasks and seeds [95% bootstrap CI]:", "",
           loss_table(rows, splits), "",
           "Implied inner objective: λ̂ = argmin_λ SPD(model, ridge_λ), beside λ* = σ²/τ²:", "",
           lambda_table(rows), ""]
  for s in splits:
    parts += [f"### Agreement with the references: split `{s}`", "", comparison_table(rows, s), ""]
  pt = probe_table(rows)
  if pt:
    parts += ["### Linear probes (held-out tasks; shuffled-target control)", "", pt, ""]
  return "\n".join(parts)


def make_figures(rows, outdir: str) -> list[str]:
  """``icl_loss.png`` (query loss per split) and ``icl_lambda.png`` (λ̂ against λ*)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(outdir, exist_ok=True)
  icl = _icl(rows)
  paths = []
  loss = [r for r in icl if r["metric"] == "loss" and r.get("seed") is None and r["value"] is not None]
  if loss:
    splits = ordered_unique(r["split"] for r in loss)
    whos = ordered_unique(r["optimizer"] for r in loss)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(splits) * max(1, len(whos) / 4)), 4))
    width = 0.8 / len(whos)
    for j, who in enumerate(whos):
      xs, ys, err = [], [], [[], []]
      for i, s in enumerate(splits):
        r = _find(icl, s, who, "loss")
        if r and r["value"] is not None:
          xs.append(i + j * width)
          ys.append(max(r["value"], 1e-12))
          err[0].append(max(r["value"] - (r["ci_low"] or r["value"]), 0))
          err[1].append(max((r["ci_high"] or r["value"]) - r["value"], 0))
      ax.bar(xs, ys, width, yerr=err, label=who)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], splits, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("query loss ½(ŷ − y)²")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(outdir, "icl_loss.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  lam = [r for r in icl if r["metric"] == "lambda_hat" and r.get("seed") is None
         and r["value"] is not None]  # undefined λ̂ (flat SPD curve) is not drawn
  if lam:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in lam:
      star = max(r.get("lambda_star") or 0.0, 1e-4)
      v = max(r["value"] or 0.0, 1e-4)
      lo, hi = max(r["ci_low"] or v, 1e-4), max(r["ci_high"] or v, 1e-4)
      ax.errorbar([star], [v], yerr=[[v - lo], [hi - v]], fmt="o", capsize=3,
                  label=f"{r['optimizer']} @ {r['split']}")
    lim = [1e-4, 1e3]
    ax.plot(lim, lim, "k--", lw=1, label="λ̂ = λ*")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("λ* = σ²/τ² of the split (0 drawn at 1e-4)")
    ax.set_ylabel("λ̂ = argmin SPD(model, ridge_λ)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(outdir, "icl_lambda.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths
