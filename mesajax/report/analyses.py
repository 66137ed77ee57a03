"""Report section and figures for the mesa-objective analyses, generated from result rows only.

``report_section(rows)`` renders, per analysis, one markdown table (metrics × splits, one block per
optimizer) with the value, its 95% bootstrap interval and ``n``, the p-value against the row's null
where it has one (``†`` marks a row that clears its null), and ``undefined: <reason>`` for rows
without a value; then a "Findings" list that states a claim only for rows whose ``clears_null`` is
true and says so for the tested rows that do not clear. ``make_figures(rows, outdir)`` draws the
summary figures (matplotlib, Agg backend). Nothing here recomputes a number.
"""
from __future__ import annotations

import math
import os

import numpy as np

from mesajax.analysis.suite import ROW_ANALYSES
from mesajax.report.rows import ordered_unique

HOW_TO_READ = {
    "nci": "share of the update Jacobian that is antisymmetric (0: locally a gradient field, "
           "1: a pure rotation); `qs:` rows are for the quasi-static effective update ū.",
    "transverse": "NCI with probes orthogonal to u: 0 when u is parallel to some gradient "
                  "(step-size schedules, norm clipping), > 0 for a genuine rotation.",
    "nci_metric": "NCI of MJ for restricted diagonal metrics M; any descent direction is "
                  "−M∇L for *some* SPD M, so only small NCI with a well-conditioned restricted "
                  "M is evidence of a scalar objective.",
    "quasi_static": "memory of the state map at a fixed gradient: eigenvalue magnitudes "
                    "(timescale 1/(1−|λ|) steps) and the effective step −⟨ū,∇L⟩/‖∇L‖².",
    "objective_fit": "weights of u ≈ −η_t M ∇Σ w_k φ_k along trajectories (w:train_loss = 1); "
                     "compare r2 with r2_train_only; large gram_cond means weak "
                     "identifiability; share: is each term's share of the fitted gradient.",
    "endpoint_fit": "weights that make Σ w_k ∇φ_k vanish at the end points (preconditioner-free); "
                    "only meaningful when update_norm_end_rel is small.",
    "alignment": "does the update also descend the outer loss? descent_ratio < 0 means it climbs "
                 "it; divergence_step: outer-loss minimum after which the fitted objective still "
                 "falls.",
    "probes": "held-out R² of ridge probes from the hidden state; selectivity subtracts a "
              "shuffled-target control (Hewitt & Liang 2019).",
    "paired": "per-task differences (this optimizer − `baseline`) on the same tasks: the untrained "
              "optimizer (`@init`), the no-objective controls and any reference; p from sign "
              "flips.",
    "split_diff": "shift split − heldout (different tasks; independent bootstrap, label-permutation "
                  "p).",
}


def _fmt(x) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  if abs(x) >= 1e307:
    return "inf" if x > 0 else "-inf"
  ax = abs(x)
  if ax != 0 and (ax >= 1e4 or ax < 1e-3):
    return f"{x:.2e}"
  return f"{x:.3f}" if ax < 100 else f"{x:.1f}"


def _cell(r: dict) -> str:
  if r.get("value") is None:
    return f"undefined: {r.get('undefined') or r.get('excluded') or 'no reason given'}"
  s = _fmt(r["value"])
  if r.get("ci_low") is not None and r.get("ci_high") is not None and r["ci_low"] != r["ci_high"]:
    s += f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
  if r.get("n") is not None:
    s += f" n={r['n']}"
  if r.get("p_value") is not None:
    s += f" p={r['p_value']:.3g}"
  if r.get("clears_null"):
    s += " †"
  return s


def _label(r: dict) -> str:
  extra = f" vs `{r['baseline']}`" if r.get("baseline") else ""
  extra += f" vs `{r['baseline_split']}`" if r.get("baseline_split") else ""
  return f"`{r['optimizer']}` {r['split']} {r['analysis']} `{r['metric']}`{extra}"


def findings(rows: list[dict]) -> list[str]:
  """One sentence per tested row (a row with ``null``): a finding when it clears its null, an
  explicit non-finding otherwise; rows without a value are listed with their reason."""
  out = []
  for r in rows:
    if r.get("value") is None or "null" not in r:
      continue
    cell = _cell(r)
    if r.get("clears_null"):
      out.append(f"- {_label(r)} = {cell}: clears its null ({r['null']}).")
    else:
      out.append(f"- {_label(r)} = {cell}: does **not** clear its null ({r['null']}); "
                 "no finding.")
  return out


def report_section(rows: list[dict]) -> str:
  """Markdown: one ``###`` subsection per analysis with a table per optimizer (metrics × splits);
  the caller supplies the section heading."""
  rows = [r for r in rows if r.get("analysis") in ROW_ANALYSES]
  out = ["Value [95% bootstrap CI over tasks] n=tasks, p=p-value against the row's null († clears "
         "it); `undefined: reason` where no value exists. Definitions, nulls and what each "
         "analysis can and cannot conclude: `docs/analyses.md`.", ""]
  if not rows:
    return "\n".join(out + ["(no analysis rows)", ""])
  for analysis in ROW_ANALYSES:
    sub = [r for r in rows if r["analysis"] == analysis]
    if not sub:
      continue
    out += [f"### {analysis}", "", HOW_TO_READ[analysis], ""]
    for opt in ordered_unique(r["optimizer"] for r in sub):
      rs = [r for r in sub if r["optimizer"] == opt]
      splits = ordered_unique(r["split"] for r in rs)
      key = lambda r: r["metric"] + (f" − {r['baseline']}" if r.get("baseline") else "")
      metrics = ordered_unique(key(r) for r in rs)
      table = {(key(r), r["split"]): r for r in rs}
      out += [f"optimizer `{opt}`", "", "| metric | " + " | ".join(splits) + " |",
              "|---" * (len(splits) + 1) + "|"]
      for m in metrics:
        cells = [_cell(table[(m, s)]) if (m, s) in table else "–" for s in splits]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
      out.append("")
  found = findings(rows)
  if found:
    out += ["### Findings (only rows that clear their null are findings)", ""] + found + [""]
  return "\n".join(out)


def _values(rows, analysis, metric, opt, splits):
  table = {r["split"]: r for r in rows if r["analysis"] == analysis and r["metric"] == metric
           and r["optimizer"] == opt}
  v, lo, hi = [], [], []
  for s in splits:
    r = table.get(s)
    val = r["value"] if r is not None and r["value"] is not None else np.nan
    v.append(val)
    lo.append(r["ci_low"] if r is not None and r["ci_low"] is not None else val)
    hi.append(r["ci_high"] if r is not None and r["ci_high"] is not None else val)
  v, lo, hi = (np.asarray(x, np.float64) for x in (v, lo, hi))
  return v, np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)


def _bars(ax, rows, metrics, opt, splits, title):
  width = 0.8 / max(len(metrics), 1)
  x = np.arange(len(splits))
  for i, (a, m) in enumerate(metrics):
    v, el, eh = _values(rows, a, m, opt, splits)
    ax.bar(x + i * width, v, width, yerr=np.stack([el, eh]), label=m, capsize=2)
  ax.set_xticks(x + width * (len(metrics) - 1) / 2)
  ax.set_xticklabels(splits, rotation=30, ha="right", fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)


def make_figures(rows: list[dict], outdir: str) -> list[str]:
  """Summary figures (one file per kind, one panel per optimizer); returns the written paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in rows if r.get("analysis") in ROW_ANALYSES]
  os.makedirs(outdir, exist_ok=True)
  opts = ordered_unique(r["optimizer"] for r in rows)
  splits = ordered_unique(r["split"] for r in rows)
  have = {(r["analysis"], r["metric"]) for r in rows}
  paths = []

  def figure(name, metrics, title):
    metrics = [m for m in metrics if m in have]
    if not metrics:
      return
    fig, axes = plt.subplots(1, len(opts), figsize=(4.5 * len(opts), 3.4), squeeze=False)
    for ax, opt in zip(axes[0], opts):
      _bars(ax, rows, metrics, opt, splits, f"{title}: {opt}")
    fig.tight_layout()
    path = os.path.join(outdir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  figure("analysis_nci.png", [("nci", "nci"), ("transverse", "transverse"),
                              ("nci_metric", "nci:fitted_diag"), ("nci_metric", "nci:own_diag")],
         "non-conservativeness")
  figure("analysis_alignment.png", [("alignment", "cos_u_neg_outer_grad"),
                                    ("alignment", "descent_ratio"),
                                    ("alignment", "descent_ratio_late"),
                                    ("alignment", "frac_outer_descent")], "alignment")
  terms = ordered_unique(r["metric"][len("share:"):] for r in rows
                   if r["analysis"] == "objective_fit" and r["metric"].startswith("share:"))
  figure("analysis_objective_fit.png", [("objective_fit", f"share:{t}") for t in terms],
         "share of fitted gradient")
  decays = ordered_unique(r["metric"].split("@")[1] for r in rows
                    if r["analysis"] == "probes" and r["metric"].startswith("r2:ema_g@"))
  probe_opts = ordered_unique(r["optimizer"] for r in rows if r["analysis"] == "probes")
  if decays:
    fig, axes = plt.subplots(1, len(probe_opts), figsize=(4.5 * len(probe_opts), 3.4),
                             squeeze=False)
    for ax, opt in zip(axes[0], probe_opts):
      for s in splits:
        for kind, style in (("ema_g", "-o"), ("ema_g2", "--s")):
          v = [_values(rows, "probes", f"r2:{kind}@{d}", opt, [s])[0][0] for d in decays]
          if np.any(np.isfinite(v)):
            ax.plot([float(d) for d in decays], v, style, label=f"{s} {kind}", ms=3)
      ax.set_xscale("logit")
      ax.set_xlabel("EMA decay", fontsize=8)
      ax.set_ylabel("held-out R²", fontsize=8)
      ax.set_title(f"hidden-state probes: {opt}", fontsize=9)
      if ax.get_lines():
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(outdir, "analysis_probes.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
