"""Proxy objectives, experiment 1: optimum location ("stay near the initialisation").

  python experiments/optimum_location/run.py --workdir runs/optimum_location [--quick]
  python experiments/optimum_location/run.py --workdir runs/optimum_location --regenerate

Meta-trains a 5-seed population of the per-parameter MLP optimizer on rotated quadratics whose
optimum lies near θ₀ = 0, with a fraction ``far_frac`` ∈ {0, 0.05, 0.2, 0.5} of training tasks whose
optimum is far (``configs/proxy_optimum.py``), evaluates every variant on its training
distribution (``heldout``) and on ``all_far`` (every optimum far) beside lr-tuned SGD and Adam, and
runs the analyses (NCI, implicit-objective fit, alignment) on every member, its untrained null,
the no-objective control and the tuned hand-designed optimizers. Writes ``DIR/results.jsonl``
(rows with ``variant`` and ``far_frac``), ``DIR/README.md`` and ``DIR/figures/``.

``--quick``: two variants (far_frac 0 and 0.5), 2 seeds, the config's smoke sizes (CI).
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs.proxy_optimum import STAGES, get_config  # noqa: E402
from experiments import common  # noqa: E402

FAR_FRACS = (0.0, 0.05, 0.2, 0.5)
QUICK_FAR_FRACS = (0.0, 0.5)
CONTROLS = ("adam", "sgd")
# The "shrink toward θ₀" term: ½‖θ − θ₀‖² (l2_init) equals ½‖θ‖² (l2) when θ₀ = 0, and the
# objective fit then keeps l2 and excludes l2_init as aliased; the table shows whichever is fitted.
PROXY_TERMS = ("w:l2", "w:l2_init")
ITEMS = [("objective_fit", m) for m in (*PROXY_TERMS, "w:dist_opt", "r2_gain_heldout_steps")] + [
    ("nci", "nci"), ("alignment", "cos_u_neg_outer_grad"), ("alignment", "frac_outer_descent")]


def build(quick: bool) -> dict:
  out = {}
  for f in (QUICK_FAR_FRACS if quick else FAR_FRACS):
    c = get_config("smoke" if quick else None)
    if quick:
      c.meta.num_seeds = 2
    c.task.kwargs.far_frac = float(f)
    out[f"far{int(round(100 * f))}"] = common.Variant(copy.deepcopy(c), {"far_frac": float(f)})
  return out


def proxy_weight_rows(rows, split):
  """Learned members' fitted weight on the shrink-toward-θ₀ term (whichever alias is fitted)."""
  for term in PROXY_TERMS:
    got = [r for r in rows if r.get("analysis") == "objective_fit" and r.get("metric") == term
           and r.get("split") == split and r.get("role") == "analysed" and r.get("value") is not None]
    if got:
      return term, got
  return None, []


def mechanism(rv, name) -> str:
  """On ``all_far``: do the learned members' updates point down the outer loss (alignment), and
  does any member carry a shrink-toward-θ₀ weight that clears its null? Together they separate a
  pursued proxy (a pull toward θ₀) from steps too short for a distant optimum."""
  cos = [r["value"] for r in rv if r.get("analysis") == "alignment" and r.get("split") == "all_far"
         and r.get("metric") == "cos_u_neg_outer_grad" and r.get("role") == "analysed"
         and r.get("value") is not None]
  gap = common.find(rv, analysis="eval_seeds", split="all_far", metric="final_outer_loss_diff",
                    baseline="sgd")
  if not cos or gap is None or gap.get("value") is None:
    return ""
  _, w = proxy_weight_rows(rv, "all_far")
  sig = [r["value"] for r in w if r.get("clears_null")]
  pull, push = sum(v > 0 for v in sig), sum(v < 0 for v in sig)
  mean_cos = sum(cos) / len(cos)
  text = (f"on `all_far` the members' updates point down the outer loss (mean cos(u, −∇L_outer) "
          f"{common.fmt(mean_cos)} over {len(cos)} seeds, range {common.fmt(min(cos))}.."
          f"{common.fmt(max(cos))}); of {len(w)} members' weights on ½‖θ − θ₀‖² there, {pull} "
          f"clear their null with a pull toward θ₀ (w > 0) and {push} with a push away (w < 0)")
  if push > len(w) / 2:
    text += ": most members' fitted objective pushes away from θ₀, the opposite of the shrink proxy"
  elif gap["ci_low"] > 0 and mean_cos > 0.5 and pull == 0 and push == 0:
    text += (": the shortfall is not explained by a fitted pull toward θ₀; it is consistent with "
             f"steps scaled for near optima (the loss stays {common.fmt(gap['value'])} above tuned "
             "sgd's)")
  return text


def conclusion(rows) -> str:
  """What the rows show, computed from them (no hand-typed numbers)."""
  name = common.learned_name(rows)
  lines = []
  variants = common.ordered_unique(r["variant"] for r in rows if r.get("analysis") == "eval_seeds")
  for v in variants:
    rv = common.select(rows, variant=v)
    f = rv[0].get("far_frac")
    parts = []
    for split in ("heldout", "all_far"):
      for b in ("adam", "sgd"):
        d = common.find(rv, analysis="eval_seeds", split=split, metric="final_outer_loss_diff",
                        baseline=b)
        if d is None or d.get("value") is None:
          continue
        verdict = ("worse than" if d["ci_low"] > 0 else "better than" if d["ci_high"] < 0
                   else "not distinguishable from")
        parts.append(f"on `{split}` {name} is {verdict} tuned {b} "
                     f"(Δ final loss {common.fmt_ci(d)})")
    term, w = proxy_weight_rows(rv, "heldout")
    if w:
      vals = [r["value"] for r in w]
      clears = sum(bool(r.get("clears_null")) for r in w if "clears_null" in r)
      parts.append(f"fitted weight on the shrink-toward-θ₀ term `{term}` on its training tasks: "
                   f"mean {common.fmt(sum(vals) / len(vals))} over {len(vals)} seeds "
                   f"(range {common.fmt(min(vals))}..{common.fmt(max(vals))}; "
                   f"{clears} clear their null)")
    else:
      parts.append("no member has a fitted (identifiable) weight on the shrink-toward-θ₀ term")
    parts.append(mechanism(rv, name))
    lines.append(f"- far_frac = {common.fmt(f)}: " + "; ".join(p for p in parts if p) + ".")
  gaps = [d for d in (common.find(common.select(rows, variant=v), analysis="eval_seeds",
                                   split="all_far", metric="final_outer_loss_diff",
                                   baseline="sgd") for v in variants)
          if d is not None and d.get("value") is not None]
  if len(gaps) > 1:
    trend = ("smaller than at the smallest (disjoint CIs)"
             if gaps[-1]["ci_high"] < gaps[0]["ci_low"] else
             "larger than at the smallest (disjoint CIs)"
             if gaps[-1]["ci_low"] > gaps[0]["ci_high"] else
             "not distinguishable from the smallest's (overlapping CIs)")
    closed = sum(d["ci_low"] <= 0 for d in gaps)
    lines.insert(0, "- The shortfall under shift against tuned sgd (Δ final loss on `all_far`, by "
                 "far_frac) is " + "; ".join(f"{common.fmt(d.get('far_frac'))}: "
                                             f"{common.fmt_ci(d)}" for d in gaps) +
                 f". At the largest far_frac it is {trend}; in "
                 f"{closed} of {len(gaps)} variants its CI reaches 0.")
  quick = any(r.get("quick") for r in rows)
  if quick:
    lines.append("- These rows come from `--quick` (smoke sizes): they exercise the pipeline and "
                 "say nothing about the science.")
  return "\n".join(lines)


def report(workdir: str, rows: list, quick: bool) -> str:
  figs = os.path.join(workdir, "figures")
  common.sweep_figure(rows, "far_frac", os.path.join(figs, "final_loss_vs_far_frac.png"))
  term, _ = proxy_weight_rows(rows, "heldout")
  if term:
    common.metric_figure(rows, "objective_fit", term, "far_frac",
                         os.path.join(figs, "shrink_weight_vs_far_frac.png"))
  intro = (
      f"{'(--quick: smoke sizes) ' if quick else ''}Goal misgeneralization for optimizers "
      "(Langosco et al. 2022): training tasks are rotated quadratics (d = 8, cond 10) started at "
      "θ₀ = 0 whose optimum is near θ₀ (θ* = 0.1·N(0, I)) except for a fraction `far_frac` with "
      "θ* = 3·N(0, I); the shift `all_far` puts every optimum far. Learned: per-parameter MLP "
      "optimizer, a seed population meta-trained on the mean validation loss. Losses: the final "
      "outer loss, mean over seeds and tasks with a 95% seeds-then-tasks bootstrap CI; baselines "
      "with their learning rate tuned per split, 95% CI over tasks; Δ = learned − baseline, paired "
      "on the same tasks (< 0: learned better).\n\n"
      "Regenerate: `python experiments/optimum_location/run.py --workdir DIR --regenerate`.")
  sections = [
      ("", intro),
      ("Behaviour: final outer loss", common.loss_table(rows, show_params=("far_frac",)) +
       "\n\n![final loss](figures/final_loss_vs_far_frac.png)"),
      ("Analyses (learned members, untrained null, controls)",
       common.analysis_table(rows, ITEMS, show_params=("far_frac",)) +
       ("\n\n![shrink weight](figures/shrink_weight_vs_far_frac.png)" if term else "")),
      ("Wall time (s; measured on the machine and load of the run)", common.timing_table(rows)),
  ]
  return common.write_readme(workdir, "Proxy objectives 1: optimum location", sections,
                             conclusion(rows))


if __name__ == "__main__":
  sys.exit(common.main(__doc__, build, report, controls=CONTROLS, stages=STAGES))
