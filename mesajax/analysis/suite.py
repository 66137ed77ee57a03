"""The analysis driver: every mesa-objective analysis on every split, with its nulls, as tidy rows.

``run_analyses(opt, phi, opt_name, splits, acfg, seed, null_phi=None, references=None)`` runs, for
each split (a task family and a horizon), on ``acfg.num_tasks`` tasks drawn from the split's
``analysis`` key stream (``mesajax.splits.purpose_key(seed, "analysis", split.name)``), the stages
of ``mesajax.registry.ANALYSES`` in order over one shared ``SplitContext``
(``mesajax.analysis.context``): NCI / transverse / diagonal-metric NCI (exact from the dense
Jacobian in float64 up to ``dense_max`` parameters), the dense SPD metric test, the quasi-static
reduction (float64), the objective fit (float64; out of sample, sign-stable, identifiability
acting), the endpoint fit (stationarity-gated), alignment and hidden-state probes.

Nulls in the same run (rows carry ``null``, ``p_value``, ``clears_null``; ``docs/analyses.md``):

* permutation nulls inside the fits and alignment (``num_perms`` task derangements; the fits'
  draws stop once the gain's test is decided, ``null_stop_early``);
* ``null_phi``: the untrained learned optimizer (initial φ), analysed on the same tasks under
  ``<opt_name>@init`` (``role="null:init"``), with paired-difference rows (analysis ``paired``,
  ``baseline=<opt_name>@init``);
* ``acfg.controls`` (registry names, default ``noise_update`` and ``random_field``): no-objective
  control rules analysed on ``acfg.control_splits`` (``role="control"``), with paired rows;
* ``references``: ``{name: (opt, phi)}``, e.g. a tuned baseline, analysed on the same tasks
  (``role="reference"``), with paired rows;
* ``split_diff`` rows: each shift split minus ``heldout`` (different tasks: unpaired bootstrap).

Rows whose value is None always carry ``undefined=<reason>``. Knobs: ``DEFAULTS`` (all of them;
``acfg`` may omit any, and then the default applies).
"""
from __future__ import annotations

import importlib

import numpy as np

from mesajax.analysis.context import Rows, SplitContext, knob
from mesajax.eval.stats import finite_bootstrap_ci, sign_flip_pvalue, stream_seed
from mesajax.report.rows import make_row

# Every analysis knob with its default (bounds for validation in docs/analyses.md, "Configuration").
DEFAULTS = {
    "num_tasks": 32,            # tasks per split (>= 2)
    "num_steps": 100,           # trajectory length (>= 4)
    "num_points": 4,            # points per trajectory for the Jacobian analyses (1..num_steps)
    "num_probes": 64,           # probe pairs per point when n > dense_max (>= 2)
    "n_boot": 1000,             # bootstrap resamples (>= 1)
    "endpoint_steps": None,     # length of the end-point runs (None: the split's horizon; >= 1)
    "dense_max": 2048,          # largest n for the exact dense-Jacobian NCIs (>= 1)
    "spd_max": 32,              # largest n for the dense SPD metric test (>= 1; cost O(n^5))
    "spd_on_qs": False,         # also run the dense SPD test on ū (doubles its host cost)
    "spd_null_tol": 1e-4,       # NCI_M below which M counts as symmetrising (0 < x < 1)
    "nci_floor": 1e-6,          # float64 numerical floor of an exactly symmetric J (0 < x < 1)
    "qs_max_state": 1024,       # largest float-state size for the quasi-static reduction (>= 0)
    "qs_fit_steps": 25,         # steps per task at which ū is solved for the qs: fit (>= 4)
    "qs_fit_max_state": 256,    # largest float-state size for the qs: fit (>= 0)
    "num_sens_probes": 8,       # Rademacher probes of diag(∂u/∂g) when n > dense_max (>= 1)
    "num_fit_probes": 8,        # Gaussian probes of the block metric fit when n > dense_max (>= 1)
    "qs_matfree": True,         # above qs_max_state: Krylov quasi-static reduction (else undefined)
    "krylov_dim": 20,           # Arnoldi / GMRES subspace size of the matrix-free reduction (>= 2)
    "point_batch_mb": 256,      # above this many MiB of probe products, points run one at a time
    "fit_iters": 10,            # ALS iterations of the objective fit (>= 1)
    "fit_polish_steps": 30,     # then Levenberg-Marquardt steps to the optimum (>= 0)
    "fit_max_coords": 2048,     # above this many parameters the fit uses a random coordinate subset
    "heldout_frac": 0.25,       # share of the last steps held out of the objective fit (0 < x < 1)
    "vif_max": 100.0,           # largest variance inflation factor of an identifiable term (> 1)
    "vif_profiled_max": 1e4,    # the same with the metric and step scales profiled out (> 1)
    "num_perms": 20,            # permutation-null draws (>= 0; 0 disables)
    "null_stop_early": True,    # the fits' draws stop once the gain's test is decided (bool)
    "alpha": 0.05,              # level of every null test (0 < x < 1)
    "stationary_tol": 1e-3,     # endpoint gate: ‖u_end‖ / max_t‖u_t‖ at most this (> 0)
    "tie_rtol": 1e-6,           # relative tolerance of loss ties in frac_outer_descent (>= 0)
    "unit_eig_tol": 1e-6,       # |λ| within this of 1: a conserved state component (>= 0)
    "num_eigs": 4,              # distinct eigenvalue magnitudes reported (>= 1)
    "probe_max_rows": 50000,    # row subsample of the hidden-state probes (>= 100)
    "controls": ("noise_update", "random_field"),  # no-objective controls (registry names)
    "control_splits": ("heldout",),                # splits the controls run on
}

# Row ``analysis`` values this module emits.
ROW_ANALYSES = ("nci", "transverse", "nci_metric", "quasi_static", "objective_fit",
                "endpoint_fit", "alignment", "probes", "paired", "split_diff")

# (analysis, metric) pairs compared in paired-difference and split-difference rows.
PAIRED_METRICS = (
    ("nci", "nci"), ("transverse", "transverse"), ("nci_metric", "nci:fitted_diag"),
    ("nci_metric", "nci:own_diag"), ("nci_metric", "nci:fitted_block"),
    ("nci_metric", "nci:dense_spd"),
    ("quasi_static", "effective_step"),
    ("objective_fit", "r2_heldout_steps"), ("objective_fit", "r2_gain_heldout_steps"),
    ("objective_fit", "r2_heldout_tasks"), ("objective_fit", "frac_eta_positive"),
    ("alignment", "cos_u_neg_outer_grad"), ("alignment", "cos_u_neg_train_grad"),
    ("alignment", "descent_ratio"), ("alignment", "frac_outer_descent"),
    ("endpoint_fit", "update_norm_end_rel"),
)


def stage_functions(names=None) -> dict:
  """``{name: stage}`` from ``mesajax.registry.ANALYSES`` (all, or ``names``), in table order."""
  from mesajax.registry import ANALYSES
  out = {}
  for name, target in ANALYSES.items():
    if names is not None and name not in names:
      continue
    module, fn = target.split(":")
    out[name] = getattr(importlib.import_module(module), fn)
  return out


def analyse_split(opt, phi, opt_name, split, acfg, seed: int, timings: dict | None = None,
                  stages=None, row_keys: dict | None = None) -> Rows:
  """Every stage on one split; returns its ``Rows`` (``.rows`` and the per-task vectors).
  ``row_keys`` (e.g. ``role``, ``seed``) are added to every row."""
  ctx = SplitContext(opt, phi, opt_name, split, acfg, seed, DEFAULTS, timings, row_keys)
  for stage in stage_functions(stages).values():
    stage(ctx)
  return ctx.rows


def paired_rows(a: Rows, b: Rows, baseline: str, n_boot: int, seed: int, alpha: float,
                metrics=PAIRED_METRICS) -> list[dict]:
  """Rows of a − b per task (same tasks), mean with a bootstrap CI and a sign-flip p-value."""
  out = []
  for key in metrics:
    if key not in a.per_task or key not in b.per_task:
      continue
    xa, xb = a.per_task[key], b.per_task[key]
    metric = f"{key[0]}/{key[1]}"
    if xa.shape != xb.shape:
      out.append(make_row("paired", a.split, a.opt, metric, None, n=0, baseline=baseline,
                          undefined="different task sets"))
      continue
    d = xa - xb
    s = stream_seed(seed, a.opt, baseline, a.split, "paired", metric)
    res = finite_bootstrap_ci(d, n_boot=n_boot, seed=s)
    if res is None:
      why = ("undefined for " + (a.opt if not np.any(np.isfinite(xa)) else baseline) +
             " in every task")
      out.append(make_row("paired", a.split, a.opt, metric, None, n=0, baseline=baseline,
                          undefined=why))
      continue
    v, lo, hi, n = res
    p = sign_flip_pvalue(d, seed=s)
    out.append(make_row("paired", a.split, a.opt, metric, v, lo, hi, n, baseline=baseline,
                        null="paired sign flip over tasks", p_value=p,
                        clears_null=bool(p < alpha and (lo > 0 or hi < 0))))
  return out


def split_diff_rows(by_split: dict, ref_split: str, n_boot: int, seed: int, alpha: float,
                    metrics=PAIRED_METRICS) -> list[dict]:
  """Rows of mean(shift) − mean(``ref_split``) (different tasks: independent resampling), with a
  label-permutation p-value."""
  out = []
  if ref_split not in by_split:
    return out
  ref = by_split[ref_split]
  for name, rows in by_split.items():
    if name == ref_split:
      continue
    for key in metrics:
      if key not in rows.per_task or key not in ref.per_task:
        continue
      xa = rows.per_task[key][np.isfinite(rows.per_task[key])]
      xb = ref.per_task[key][np.isfinite(ref.per_task[key])]
      metric = f"{key[0]}/{key[1]}"
      if xa.size < 2 or xb.size < 2:
        out.append(make_row("split_diff", name, rows.opt, metric, None, n=0,
                            baseline_split=ref_split,
                            undefined=f"fewer than 2 finite tasks ({xa.size}, {xb.size})"))
        continue
      s = stream_seed(seed, rows.opt, name, ref_split, "split_diff", metric)
      rng = np.random.default_rng(s)
      ia = rng.integers(0, xa.size, (n_boot, xa.size))
      ib = rng.integers(0, xb.size, (n_boot, xb.size))
      boots = xa[ia].mean(1) - xb[ib].mean(1)
      v = xa.mean() - xb.mean()
      lo, hi = np.quantile(boots, [0.025, 0.975])
      pooled = np.broadcast_to(np.concatenate([xa, xb]), (1000, xa.size + xb.size))
      perm = rng.permuted(pooled, axis=1)   # 1000 independent label permutations
      null = perm[:, :xa.size].mean(1) - perm[:, xa.size:].mean(1)
      p = float((1 + np.sum(np.abs(null) >= abs(v) * (1 - 1e-12))) / 1001)
      out.append(make_row("split_diff", name, rows.opt, metric, v, lo, hi, xa.size + xb.size,
                          baseline_split=ref_split, null="label permutation", p_value=p,
                          clears_null=bool(p < alpha and (lo > 0 or hi < 0))))
  return out


def _controls(acfg):
  from mesajax.registry import make_optimizer
  names = knob(acfg, "controls", DEFAULTS) or ()
  out = {}
  for name in names:
    opt = make_optimizer(name)
    out[name] = (opt, opt.init_phi(None))
  return out


def run_analyses(opt, phi, opt_name: str, splits: dict, acfg, seed: int,
                 timings: dict | None = None, null_phi=None, references: dict | None = None,
                 stages=None, control_cache: dict | None = None) -> list[dict]:
  """Every analysis on every split, with its nulls; returns tidy rows (module docstring).

  ``null_phi``: the optimizer's meta-parameters at initialisation (the pipeline passes the φ the
  meta-training started from, e.g. ``opt.init_phi(key)`` with the meta-training key), analysed as
  ``<opt_name>@init`` on the same tasks. ``references``: ``{name: (opt, phi)}`` analysed on the
  same tasks for paired rows. ``stages``: restrict to these names of
  ``mesajax.registry.ANALYSES`` (default all). ``timings`` receives the wall time of each stage.
  ``control_cache``: a dict shared by calls on the same splits, seed and analysis config (the
  members of a seed population): a no-objective control does not depend on ``phi``, so its
  analysis runs once and its own rows are returned by the first call only; every call still gets
  its paired rows against the cached control.
  """
  n_boot, alpha = int(knob(acfg, "n_boot", DEFAULTS)), float(knob(acfg, "alpha", DEFAULTS))
  rows: list[dict] = []
  main: dict = {}
  for split in splits.values():
    res = analyse_split(opt, phi, opt_name, split, acfg, seed, timings, stages,
                        row_keys={"role": "analysed", "seed": int(seed)})
    main[split.name] = res
    rows.extend(res.rows)
  others = []
  if null_phi is not None:
    others.append((f"{opt_name}@init", opt, null_phi, "null:init", None))
  for name, (r_opt, r_phi) in (references or {}).items():
    others.append((name, r_opt, r_phi, "reference", None))
  ctrl_splits = tuple(knob(acfg, "control_splits", DEFAULTS) or ())
  if not any(s in splits for s in ctrl_splits) and splits:
    ctrl_splits = (next(iter(splits)),)
  for name, (c_opt, c_phi) in _controls(acfg).items():
    others.append((name, c_opt, c_phi, "control", ctrl_splits))
  for name, o_opt, o_phi, role, only in others:
    for split in splits.values():
      if only is not None and split.name not in only:
        continue
      key = (name, split.name)
      if role == "control" and control_cache is not None and key in control_cache:
        res = control_cache[key]  # analysed by an earlier call; its rows are already out
      else:
        res = analyse_split(o_opt, o_phi, name, split, acfg, seed, timings, stages,
                            row_keys={"role": role, "seed": int(seed)})
        if role == "control" and control_cache is not None:
          control_cache[key] = res
        rows.extend(res.rows)
      rows.extend(paired_rows(main[split.name], res, name, n_boot, seed, alpha))
  ref_split = "heldout" if "heldout" in main else next(iter(main), None)
  rows.extend(split_diff_rows(main, ref_split, n_boot, seed, alpha))
  return rows
