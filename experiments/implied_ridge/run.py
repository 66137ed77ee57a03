"""The implied ridge penalty λ̂ of trained in-context learners (Akyürek et al. 2022).

  python experiments/implied_ridge/run.py --workdir runs/implied_ridge [--quick]

Noisy regression, x ~ N(0, I), w ~ N(0, I), d = 8, N = 12 (``configs/implied_ridge.py``).
Runs: a mesa-layer trained at σ = 0.5 (λ* = 0.25) and at σ = 1 (λ* = 1), 5 seeds each, and a
three-layer two-head LSA at σ = 0.5 (3 seeds). For every run, λ̂ = argmin_λ SPD(model, ridge_λ)
on the training distribution and when only the test noise changes (σ_test ∈ {0, 0.25, 1, 2}).
Claims checked from the rows: λ̂ is within one grid step (a factor 10^0.1) of the training λ*;
and whether λ̂ follows the test λ* when only the test noise moves.

Writes ``DIR/results.jsonl``, ``DIR/times.json``, ``DIR/README.md`` and ``DIR/figures/``. Runtime:
the Timing table of experiments/implied_ridge/README.md (measured, with the machine's load);
``--quick`` (CI): one mesa run, 2 seeds, 500 steps, two shifts.
"""
from __future__ import annotations

import copy
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ml_collections  # noqa: E402

from configs.implied_ridge import get_config  # noqa: E402
from mesajax.icl import report  # noqa: E402
from mesajax.icl.experiment import main, timing_table, write_markdown  # noqa: E402


def configs(quick: bool) -> dict:
  base = get_config()
  if quick:
    base.icl.num_steps = base.icl.decay_steps = 500
    base.icl.num_seeds = 2
    base.icl.eval.num_tasks = 256
    base.icl.eval.n_boot = 200
    base.shifts = ml_collections.ConfigDict({k: v for k, v in base.shifts.to_dict().items()
                                             if k in ("test_sigma_0", "test_sigma_2")})
    return {"mesa_sigma0p5": base}
  hi = copy.deepcopy(base)
  hi.name = "implied_ridge_sigma1"
  hi.icl.task.sigma = 1.0
  lsa = copy.deepcopy(base)
  lsa.name = "implied_ridge_lsa3"
  lsa.icl.model = "lsa"
  lsa.icl.model_kwargs = ml_collections.ConfigDict({"num_layers": 3, "num_heads": 2,
                                                    "init_scale": 0.1})
  lsa.icl.lr = 1e-3
  lsa.icl.num_seeds = 3
  lsa.icl.eval.gd_steps = 3
  lsa.icl.eval.gdpp_iters = 0
  return {"mesa_sigma0p5": base, "mesa_sigma1": hi, "lsa3_sigma0p5": lsa}


def claims(rows) -> list[str]:
  out = []
  lam = [r for r in rows if r["metric"] == "lambda_hat" and r.get("seed") is None
         and r["optimizer"] not in ("untrained", "shuffled_context")]
  for r in lam:
    if r["split"] != "train":
      continue
    star = r["lambda_star"]
    ok = r["value"] is not None and star and abs(math.log10(r["value"] / star)) <= 0.1 + 1e-9
    out.append(f"- `{r['run']}`: λ̂ = {report.fmt_ci(r)} vs training λ* = {star:g}: "
               f"{'within one grid step (×10^±0.1)' if ok else 'NOT within one grid step'}.")
    moved = [x for x in lam if x["run"] == r["run"] and x["split"] != "train"]
    for x in moved:
      follows = x["lambda_star"] > 0 and x["value"] and \
          abs(math.log10(x["value"] / x["lambda_star"])) <= 0.1 + 1e-9
      stays = abs(math.log10(x["value"] / r["value"])) <= 0.1 + 1e-9 \
          if x["value"] and r["value"] else False
      verdict = "follows the new λ*" if follows else ("stays at the training λ̂" if stays
                                                       else "moves, but not to the new λ*")
      out.append(f"  - `{x['split']}` (λ* = {x['lambda_star']:g}): λ̂ = {report.fmt_ci(x)} — {verdict}.")
  return out


def write_readme(workdir, rows, times, quick):
  figs = report.make_figures(rows, os.path.join(workdir, "figures"))
  parts = [f"# implied_ridge results{' (--quick)' if quick else ''}", "",
           "λ̂ = argmin over the grid {0} ∪ logspace(1e-3, 1e3, 61) of the mean SPD(model, ridge_λ) "
           "(16 probe queries per task); CI: percentile bootstrap over (seed, task) pairs.", "",
           *claims(rows), "", report.lambda_table(rows), "", "## Query loss", "",
           report.loss_table(rows), ""]
  for run in sorted({r["run"] for r in rows}):
    parts += [f"## Agreement on the training distribution: {run}", "",
              report.comparison_table([r for r in rows if r["run"] == run], "train"), ""]
  parts += ["## Timing", "", timing_table(times), "",
            "Figures: " + ", ".join(os.path.relpath(f, workdir) for f in figs), ""]
  write_markdown(workdir, parts)


if __name__ == "__main__":
  main(__doc__, configs, write_readme)
