"""ICL as gradient descent (von Oswald et al. 2023), reproduced.

  python experiments/icl_gd/run.py --workdir runs/icl_gd [--quick]

1. A one-layer, two-head LSA on noiseless regression, d = N = 10, x ~ U(−1, 1), w ~ N(0, I), ½-MSE
   query loss, 5 training seeds as one population (``configs/icl_gd.py``): against one GD step
   from zero with a line-searched learning rate. Claim: loss within 2% of that GD step's loss and
   sensitivity cosine ≥ 0.99, for every seed. Nulls: untrained, shuffled context, trained on a
   single fixed task.
2. Two- and three-layer LSA (3 seeds each) against K-step GD (one line-searched step size) and
   GD++ (per-step η_k, γ_k fitted), K = layers, with linear probes per layer (``mesajax.icl.probes``:
   held-out R² and a shuffled-target control) for Xᵀy, the ridge/OLS weights, the preconditioned
   query and the scalar predictions of GD, ridge and OLS.

Writes ``DIR/results.jsonl`` (tidy rows), ``DIR/times.json``, ``DIR/README.md`` (tables, the claim
checked per seed) and ``DIR/figures/*.png``. Runtime: the Timing table of
experiments/icl_gd/README.md (measured, with the load average of the shared 2-core machine);
``--quick`` (CI): the one-layer model only, 2 seeds, 500 steps, 256 evaluation tasks, its layer
probes (the claim is not expected to hold at that size).
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs.icl_gd import get_config  # noqa: E402
from mesajax.icl import report  # noqa: E402
from mesajax.icl.experiment import main, timing_table, write_markdown  # noqa: E402


def configs(quick: bool):
  base = get_config()
  if quick:
    base.icl.num_steps = base.icl.decay_steps = 500
    base.icl.num_seeds = 2
    base.icl.log_every = 100
    base.icl.eval.num_tasks = 256
    base.icl.eval.n_boot = 200
    base.icl.eval.nulls = ("untrained", "shuffled_context")
    return {"lsa1": base}
  out = {"lsa1": base}
  for layers in (2, 3):
    c = copy.deepcopy(base)
    c.name = f"icl_gd_{layers}layer"
    c.icl.model_kwargs.num_layers = layers
    c.icl.num_seeds = 3
    c.icl.eval.gd_steps = layers
    c.icl.eval.nulls = ("untrained",)
    out[f"lsa{layers}"] = c
  return out


def claim(rows, name: str, ref: str = "gd_1") -> tuple[str, bool]:
  per = {}
  for r in rows:
    if (r["split"] == "train" and r["optimizer"] == name and r.get("reference") == ref
        and r.get("seed") is not None and r["metric"] in ("loss_ratio", "sens_cos")):
      per.setdefault(r["seed"], {})[r["metric"]] = r["value"]
  per = {s: v for s, v in per.items() if v.get("loss_ratio") is not None
         and v.get("sens_cos") is not None}
  if not per:
    return "Claim: NOT checked — no per-seed loss_ratio and sens_cos rows against gd_1.", False
  ok = [abs(v["loss_ratio"] - 1) <= 0.02 and v["sens_cos"] >= 0.99 for v in per.values()]
  worst_ratio = max(abs(v["loss_ratio"] - 1) for v in per.values())
  worst_cos = min(v["sens_cos"] for v in per.values())
  passed = len(ok) >= 5 and all(ok)
  text = (f"Claim (every seed: |loss/loss(GD step) − 1| ≤ 2% and sens_cos ≥ 0.99, ≥ 5 seeds): "
          f"{'REPRODUCED' if passed else 'NOT reproduced'} — {sum(ok)}/{len(ok)} seeds pass; worst "
          f"|ratio − 1| = {100 * worst_ratio:.2f}%, worst cosine = {worst_cos:.4f}.")
  return text, passed


def probe_runs(quick: bool):
  """Layer probes for the deeper LSA (von Oswald et al. 2023b; Akyürek et al. 2022); the quick
  size probes its one-layer model (the GD prediction x_qᵀXᵀy/N should be readable at layer 1)."""
  return ("lsa1",) if quick else ("lsa2", "lsa3")


def write_readme(workdir, rows, times, quick):
  name = get_config().name
  text, _ = claim(rows, name)
  figs = report.make_figures([r for r in rows if r.get("run") == "lsa1"],
                             os.path.join(workdir, "figures"))
  parts = [f"# icl_gd results{' (--quick)' if quick else ''}", "",
           text, "",
           "## One-layer LSA against one line-searched GD step, per seed", "",
           report.seed_table(rows, "train", name, "gd_1"), "",
           "## Query loss (all runs)", "", report.loss_table(rows), "",
           "## Agreement with the references", ""]
  for run in report.ordered_unique(r.get("run") for r in rows):
    rr = [r for r in rows if r.get("run") == run]
    parts += [f"### {run}", "", report.comparison_table(rr, "train"), ""]
  fitted = [r for r in rows if r["metric"] == "fitted_param"]
  parts += ["## Fitted reference parameters", "", "| run | parameter | value |", "|---|---|---|"]
  parts += [f"| {r.get('run')} | {r['optimizer']} | {r['value'] if r['value'] is not None else r.get('values')} |"
            for r in fitted]
  probe_rows = [r for r in rows if r.get("analysis") == "icl_probe"]
  if probe_rows:
    parts += ["", "## Linear probes per layer", "",
              "Ridge probe from the query token after each layer (layer 0 = the input token) to "
              "each target; R² on held-out tasks (half of `probe_tasks`), mean over seeds [95% "
              "bootstrap CI over seeds]; control: the same probe fitted on targets shuffled across "
              "the fitting tasks.", ""]
    for run in report.ordered_unique(r["run"] for r in probe_rows):
      parts += [f"### {run}", "", report.probe_table([r for r in probe_rows if r["run"] == run]), ""]
  parts += ["", "## Timing", "", timing_table(times), "",
            "Figures: " + ", ".join(os.path.relpath(f, workdir) for f in figs), ""]
  write_markdown(workdir, parts)


if __name__ == "__main__":
  main(__doc__, configs, write_readme, probe_runs)
