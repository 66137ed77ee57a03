"""The shift table: trained in-context learners and every reference under distribution shift.

  python experiments/icl_shift/run.py --workdir runs/icl_shift [--quick]

Trains, on noisy regression (``configs/icl_shift.py``: x ~ N(0, I), w ~ N(0, I), σ = 0.5, d = 8,
N = 12), a two-layer LSA (3 seeds, 3000 steps), a mesa-layer (3 seeds, 3000 steps) and a small
GPT-style causal transformer (2 layers, width 32, 2 seeds, 1500 steps of batch 128) and evaluates
each on every shift of ``mesajax.icl.shifts``: query loss of the model, its nulls (untrained,
shuffled context) and every reference (GD, 2-step GD, 2-step GD++, Bayes ridge, OLS) per shift, and
λ̂ per shift beside the split's λ* ("undefined" where the SPD curve is flat in λ).
Writes ``DIR/results.jsonl``, ``DIR/times.json``, ``DIR/README.md`` and ``DIR/figures/<run>/``.

Runtime: see the Timing table of experiments/icl_shift/README.md (measured, with the load average
of the shared 2-core machine it ran on). ``--quick`` (CI): the LSA only, 2 seeds, 500 steps, four
shifts, 128 evaluation tasks.
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ml_collections  # noqa: E402

from configs.icl_shift import get_config  # noqa: E402
from mesajax.icl import report  # noqa: E402
from mesajax.icl.experiment import main, timing_table, write_markdown  # noqa: E402

QUICK_SHIFTS = ("noise_x2", "input_scale_x3", "query_orthogonal", "query_in_context")
NULLS = ("untrained", "shuffled_context")
GPT_WIDTH, GPT_SEEDS, GPT_BATCH, GPT_STEPS, GPT_EVAL_TASKS = 32, 2, 128, 1500, 256


def configs(quick: bool) -> dict:
  base = get_config()
  if quick:
    base.icl.num_steps = base.icl.decay_steps = 500
    base.icl.num_seeds = 2
    base.icl.eval.num_tasks = 128
    base.icl.eval.n_boot = 200
    base.shifts = ml_collections.ConfigDict({k: v for k, v in base.shifts.to_dict().items()
                                             if k in QUICK_SHIFTS})
    return {"lsa2": base}
  mesa = copy.deepcopy(base)
  mesa.name = "icl_shift_mesa"
  mesa.icl.model = "mesa"
  mesa.icl.model_kwargs = ml_collections.ConfigDict({"init_scale": 1.0, "init_log_lam": 0.0})
  mesa.icl.lr = 3e-3
  return {"lsa2": base, "mesa": mesa, "gpt": gpt_config(base)}


def gpt_config(base):
  """A small causal softmax transformer (Garg et al. 2022's model family, much smaller): trained
  to predict every context label from its prefix and the query label; max_len covers the longest
  shifted context (``context_x2``: N = 24)."""
  gpt = copy.deepcopy(base)
  gpt.name = "icl_shift_gpt"
  gpt.icl.model = "gpt"
  gpt.icl.model_kwargs = ml_collections.ConfigDict(
      {"num_layers": 2, "num_heads": 2, "width": GPT_WIDTH, "max_len": 2 * base.icl.task.N})
  gpt.icl.lr = 1e-3
  gpt.icl.num_seeds = GPT_SEEDS
  gpt.icl.batch_size = GPT_BATCH
  gpt.icl.num_steps = gpt.icl.decay_steps = GPT_STEPS
  gpt.icl.eval.num_tasks = GPT_EVAL_TASKS
  return gpt


def shift_table(rows, run: str) -> str:
  """Per shift: loss of the model and of every reference, and λ̂ beside λ*."""
  rr = [r for r in rows if r["run"] == run]
  name = next(r["optimizer"] for r in rr if r["metric"] == "lambda_hat")
  splits = report.ordered_unique(r["split"] for r in rr if r["metric"] == "loss")
  refs = report.ordered_unique(r["optimizer"] for r in rr if r["metric"] == "loss"
                               and r["optimizer"] not in (name, "untrained", "shuffled_context"))
  head = ["shift", name, *refs, "untrained", "shuffled_context", "λ̂ (model)", "λ* (shift)"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in splits:
    cells = [s]
    for who in [name, *refs, "untrained", "shuffled_context"]:
      r = report._find(rr, s, who, "loss")
      cells.append(report.fmt(r["value"]) if r and r["value"] is not None
                   else (f"undefined ({r['undefined']})" if r else "–"))
    lam = report._find(rr, s, name, "lambda_hat", "ridge")
    star = report._find(rr, s, "bayes", "lambda_star")
    cells += [(report.fmt_ci(lam) if lam is None or lam["value"] is not None else "undefined (flat SPD)")
              + (" (grid edge)" if lam and lam.get("at_grid_edge") else ""),
              report.fmt(star["value"]) if star else "–"]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def write_readme(workdir, rows, times, quick):
  runs = report.ordered_unique(r["run"] for r in rows)
  figs = []
  for run in runs:
    figs += report.make_figures([r for r in rows if r["run"] == run],
                                os.path.join(workdir, "figures", run))
  undefined = report.ordered_unique(
      f"{r['split']} ({r['run']})" for r in rows if r["metric"] == "lambda_hat"
      and r.get("seed") is None and r["value"] is None and r["optimizer"] not in NULLS)
  parts = [f"# icl_shift results{' (--quick)' if quick else ''}", "",
           "Query loss ½(ŷ − y)², mean over tasks and seeds; references fitted on the training "
           "distribution and held fixed under shift, like the models. λ̂ with a 95% bootstrap CI "
           "over (seed, task) pairs; \"undefined (flat SPD)\" where SPD(model, ridge_λ) varies "
           "over the λ grid by at most 10⁻³ of its maximum, so no ridge_λ is measurably closer to "
           "the model (all ridges predict alike, or the model is far from every one): " +
           (", ".join(undefined) if undefined else "none") + ".", ""]
  for run in runs:
    parts += [f"## {run}", "", shift_table(rows, run), ""]
  parts += ["## Timing", "", timing_table(times), "",
            "Figures: " + ", ".join(os.path.relpath(f, workdir) for f in figs), ""]
  write_markdown(workdir, parts)


if __name__ == "__main__":
  main(__doc__, configs, write_readme)
