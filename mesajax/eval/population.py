"""Evaluation of a seed population: every member on the same held-out tasks, and the population's
summary with seeds as the outer resampling level.

A population (``meta.num_seeds`` = S > 1, ``mesajax.meta.outer``) is S independent meta-training
runs. Member s is evaluated exactly like a single run (``evaluate.evaluate_all``; the tuned
baselines and the oracle are evaluated once, they do not depend on the member) and its learned
rows carry ``seed`` = the member's meta-training seed (``config.seed + s``). The summary rows
(analysis ``eval_seeds``) answer the question a paper needs — how does *the method* do, over
meta-training seeds and tasks — with a two-level (hierarchical) percentile bootstrap: resample the
S seeds with replacement, then within each resampled seed the M tasks with replacement, and take
the mean (Davison & Hinkley 1997, §3.8):

  value = mean_s mean_m L[s, m],   CI = 2.5 / 97.5 percentiles of that mean over B resamples,

plus the across-seed spread (``seed_sd``: the standard deviation of the S per-seed means) and
paired differences to each baseline over the same tasks (``final_outer_loss_diff``, per seed then
pooled the same way).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mesajax.eval import evaluate as ev
from mesajax.eval import stats
from mesajax.report.rows import make_row

PyTree = Any


def hierarchical_ci(x_SxM: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05):
  """(mean, lo, hi) of mean_s mean_m x[s, m] under a seeds-then-tasks bootstrap
  (``stats.hierarchical_bootstrap_ci`` with the seeds as groups); non-finite entries count as +inf
  (a failed run), as in ``stats.bootstrap_ci``."""
  x = np.asarray(x_SxM, np.float64)
  groups = np.repeat(np.arange(x.shape[0]), x.shape[1])
  return stats.hierarchical_bootstrap_ci(x.reshape(-1), groups, n_boot=n_boot, seed=seed,
                                         alpha=alpha)


def member(phis_S: PyTree, s: int) -> PyTree:
  return jax.tree.map(lambda x: x[s], phis_S)


def evaluate_population(opt, phis_S: PyTree, name: str, splits, cfg_eval, seed: int) -> list[dict]:
  """Rows for every member (``seed`` key) and the population summary (``eval_seeds``)."""
  num_seeds = int(jax.tree.leaves(phis_S)[0].shape[0])
  rows, curves = ev.evaluate_all(opt, member(phis_S, 0), name, splits, cfg_eval, seed,
                                 return_curves=True)
  for r in rows:
    if r["optimizer"] == name:
      r["seed"] = seed
  n_boot = int(cfg_eval.n_boot)
  for split in ev._as_split_list(splits):
    tasks = ev.split_tasks(split, cfg_eval, seed)["heldout"]
    per_seed = [curves[(split.name, name)]]
    for s in range(1, num_seeds):
      (r_s, c_s), = ev.evaluate_many([(opt, member(phis_S, s), name, "learned")], split, cfg_eval,
                                     seed, tasks)
      rows += [dict(r, seed=seed + s) for r in r_s]
      per_seed.append(c_s)
    for metric in ("final_outer_loss", "mean_outer_loss"):
      x = np.stack([c[metric] for c in per_seed])
      v, lo, hi = hierarchical_ci(x, n_boot, seed)
      with np.errstate(invalid="ignore"):
        sd = float(np.std(x.mean(axis=1), ddof=1)) if num_seeds > 1 else 0.0
      rows.append(make_row("eval_seeds", split.name, name, metric, v, lo, hi, n=x.shape[1],
                           seeds=num_seeds, horizon=split.horizon, role="learned"))
      rows.append(make_row("eval_seeds", split.name, name, f"{metric}:seed_sd", sd, n=num_seeds,
                           seeds=num_seeds, horizon=split.horizon, role="learned"))
    for baseline in cfg_eval.baselines:
      b = curves[(split.name, baseline)]["final_outer_loss"]
      d = np.stack([c["final_outer_loss"] - b for c in per_seed])
      if np.all(np.isfinite(d)):
        v, lo, hi = hierarchical_ci(d, n_boot, seed)
        extra = {}
      else:
        v = lo = hi = None
        extra = {"undefined": "non-finite final loss in some member or in the baseline"}
      rows.append(make_row("eval_seeds", split.name, name, "final_outer_loss_diff", v, lo, hi,
                           n=d.shape[1], seeds=num_seeds, baseline=baseline, **extra))
  return rows
