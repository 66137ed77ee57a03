"""The analysis stages: each ``(SplitContext) -> list[row]``, registered in
``mesajax.registry.ANALYSES`` and run in that order by ``mesajax.analysis.suite``.

Every row is a mean over tasks with a bootstrap CI and its ``n``, or carries ``undefined=<reason>``.
Rows that test a claim carry ``null`` (which null), ``p_value`` and ``clears_null``; the report
states a finding only from rows whose ``clears_null`` is true. Definitions: ``docs/analyses.md``.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.analysis import alignment as align_mod
from mesajax.analysis import endpoint_fit, matfree, nci, objective_fit, probes
from mesajax.analysis import quasi_static as qs
from mesajax.analysis.context import SplitContext, take
from mesajax.eval.stats import null_pvalue, sign_flip_pvalue


def _new_rows(ctx: SplitContext, start: int) -> list[dict]:
  return ctx.rows.rows[start:]


def _j_reason(jz_BxP) -> str:
  jz = np.asarray(jz_BxP)
  if jz.size and np.all(jz > 0.5):
    return "J = 0 at every point (the update does not depend on θ)"
  return f"J = 0 or non-finite at every point of the task ({int(np.sum(jz > 0.5))} of " \
         f"{jz.size} points have J = 0)"


def _mark(row: dict, null: str, p: float, clears: bool) -> None:
  row["null"] = null
  row["p_value"] = None if not np.isfinite(p) else float(p)
  row["clears_null"] = bool(clears)


def _mark_floor(row: dict, floor: float, what: str) -> None:
  """NCI-type rows: a claim "J is not symmetric" clears the numerical floor only if the CI's lower
  end is above it (round-off of an exactly symmetric J is far below ``floor``)."""
  if row.get("value") is None:
    return
  lo = row.get("ci_low")
  row["null"] = f"{what}: numerical floor {floor:g}"
  row["clears_null"] = bool(lo is not None and lo > floor)


def _is_dense(ctx, prefix: str = "") -> bool:
  """Whether the ``prefix`` field's metrics are exact (dense Jacobian) rather than probe
  estimates: ū (``qs:``) is probed whenever the quasi-static reduction is matrix-free."""
  pts = ctx.points
  return bool(pts["_qs_dense"] if prefix == "qs:" else pts["_dense"])


def _floor(ctx, prefix: str = "") -> tuple[float, str]:
  if _is_dense(ctx, prefix):
    return float(ctx.knob("nci_floor")), "exact dense J, float64"
  return 3.0 / math.sqrt(int(ctx.knob("num_probes"))), "probe estimator (3/√K Monte-Carlo error)"


# --- 1. NCI, transverse index, diagonal metrics ---------------------------------------------------

def nci_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  r, pts = ctx.rows, ctx.points
  for prefix in (("", "qs:") if ctx.use_qs else ("",)):
    floor, floor_what = _floor(ctx, prefix)
    dense = _is_dense(ctx, prefix)
    est = "exact (dense Jacobian, float64)" if dense else \
        f"probes (K={int(ctx.knob('num_probes'))}, float64)"
    jz = pts[prefix + "j_zero"]
    reason = _j_reason(jz)
    pt = ctx.per_task_mean
    for analysis, metric in (("nci", "nci"), ("nci", "ratio"), ("transverse", "transverse"),
                             ("transverse", "transverse_ratio"), ("nci_metric", "nci:identity"),
                             ("nci_metric", "nci:own_diag"), ("nci_metric", "nci:fitted_diag"),
                             ("nci_metric", "nci:fitted_block")):
      key = prefix + ("nci" if metric == "nci:identity" else metric)
      if key not in pts:
        cause = (f"n = {ctx.n_params} > dense_max" if not pts["_dense"] else
                 f"ū is matrix-free (state_dim = {ctx.sm.dim} > qs_max_state)")
        why = (f"needs the dense Jacobian: {cause} (the matrix-free structured fit is "
               f"nci:fitted_block)" if metric == "nci:fitted_diag" else
               f"not computed for n = {ctx.n_params}")
        r.fixed(analysis, prefix + metric, None, n=0, undefined=why)
        continue
      extra = {}
      se_key = prefix + "se:" + ("nci" if metric in ("nci:identity", "ratio") else metric)
      if se_key in pts and "ratio" not in metric:
        se_mean, se_point = matfree.probe_se_of_mean(pts[se_key])
        if np.isfinite(se_mean):
          extra = {"probe_se": se_mean, "probe_se_point": se_point}
      blk = metric == "nci:fitted_block"
      r.add(analysis, prefix + metric, pt(key), undefined=reason,
            estimator=est + (f"; metric fitted on K_f={int(ctx.knob('num_fit_probes'))} separate "
                             "probes" if blk and not dense else ""), **extra)
      if "ratio" not in metric:
        _mark_floor(r.rows[-1], floor, floor_what)
    r.add("nci", prefix + "cos_u_neg_grad", pt(prefix + "cos_u_neg_grad"))
    r.add("nci", prefix + "frac_points_j_zero", np.mean(jz, axis=1))
    for m in ("metric_cond:fitted_diag", "fitted_diag_clip_frac", "metric_cond:own_diag",
              "own_diag_neg_frac", "metric_cond:fitted_block"):
      if prefix + m in pts:
        stat = np.median if m.startswith("metric_cond") else np.mean
        r.add("nci_metric", prefix + m, pt(prefix + m), stat=stat, undefined=reason)
  ctx.lap("nci_rows")
  return _new_rows(ctx, start)


# --- 2. dense SPD metric test ---------------------------------------------------------------------

def dense_metric_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  r, pts = ctx.rows, ctx.points
  spd_max = int(ctx.knob("spd_max"))
  prefixes = ("", "qs:") if (ctx.use_qs and bool(ctx.knob("spd_on_qs"))) else ("",)
  if ctx.n_params > spd_max:
    for prefix in prefixes:
      r.fixed("nci_metric", prefix + "nci:dense_spd", None, n=0,
              undefined=f"dense SPD test skipped: n = {ctx.n_params} > spd_max = {spd_max}")
    return _new_rows(ctx, start)
  tol = float(ctx.knob("spd_null_tol"))
  for prefix in prefixes:
    if prefix + "jac" not in pts:
      r.fixed("nci_metric", prefix + "nci:dense_spd", None, n=0,
              undefined="dense SPD test skipped: ū is matrix-free (state_dim > qs_max_state)")
      continue
    jac = pts[prefix + "jac"]
    res = [nci.dense_spd_metric(jac[i], null_tol=tol) for i in range(ctx.b)]
    reason = _j_reason(pts[prefix + "j_zero"])
    val = np.array([x["nci"] for x in res], np.float64)
    r.add("nci_metric", prefix + "nci:dense_spd", val, undefined=reason,
          estimator="best constant SPD M over the task's points (float64)")
    row = r.rows[-1]
    if row["value"] is not None:
      # Claim tested: "no constant SPD metric makes MJ symmetric at these points".
      row["null"] = f"symmetrisable by a constant SPD M (NCI_M < {tol:g})"
      row["clears_null"] = bool(row["ci_low"] is not None and row["ci_low"] > tol)
    found = np.array([x["spd"] for x in res], np.float64)
    cond = np.array([x["cond"] if x["spd"] is True else np.nan for x in res], np.float64)
    r.add("nci_metric", prefix + "frac_tasks_spd_metric", found, undefined=reason)
    r.add("nci_metric", prefix + "metric_cond:dense_spd", cond, stat=np.median,
          undefined="no constant SPD metric symmetrises J in any task")
    r.add("nci_metric", prefix + "dense_spd_null_dim",
          np.array([x["null_dim"] for x in res], np.float64), undefined=reason)
  ctx.lap("dense_metric")
  return _new_rows(ctx, start)


# --- 3. quasi-static reduction --------------------------------------------------------------------

def quasi_static_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  r = ctx.rows
  r.fixed("quasi_static", "state_dim", ctx.sm.dim, n=1)
  if not ctx.use_qs:
    why = ("stateless optimizer (state_dim = 0)" if ctx.sm.dim == 0 else
           f"state_dim = {ctx.sm.dim} > qs_max_state = {int(ctx.knob('qs_max_state'))}")
    r.fixed("quasi_static", "eig_1", None, n=0, undefined=why)
    return _new_rows(ctx, start)
  pts = ctx.points
  k_eig = int(ctx.knob("num_eigs"))
  unit_tol = float(ctx.knob("unit_eig_tol"))
  krylov = "state_hess" in pts
  mid = ctx.p_num // 2  # middle point of each task, float64
  mats = pts["state_hess" if krylov else "state_jac"][:, mid]
  est = (f"Arnoldi Ritz values (Krylov dimension {int(ctx.knob('krylov_dim'))}, JVPs of the state "
         f"map only; exact when the Krylov space is invariant)" if krylov else
         "eigenvalues of the dense ∂F/∂s (float64)")
  mags = np.full((ctx.b, k_eig), np.nan)
  conserved = np.full(ctx.b, np.nan)
  unstable = np.full(ctx.b, np.nan)
  for i, j in enumerate(mats):
    if not np.all(np.isfinite(j)):
      continue
    ev = np.abs(matfree.ritz_values(j) if krylov else np.linalg.eigvals(j))
    if ev.size == 0 or not np.all(np.isfinite(ev)):
      continue
    cls = qs.classify_magnitudes(ev, unit_tol)
    conserved[i] = np.mean(cls["conserved"])
    unstable[i] = float(np.any(cls["unstable"]))
    mags[i] = qs.distinct_magnitudes(ev[~cls["conserved"]], k_eig)
  for i in range(k_eig):
    r.add("quasi_static", f"eig_{i + 1}", mags[:, i],
          undefined=f"fewer than {i + 1} distinct non-conserved eigenvalue magnitudes",
          estimator=est)
    with np.errstate(divide="ignore", invalid="ignore"):
      r.add("quasi_static", f"timescale_{i + 1}",
            np.where(mags[:, i] < 1.0, 1.0 / (1.0 - mags[:, i]), np.nan),
            undefined=f"no eigenvalue {i + 1} with |λ| < 1")
  if krylov:
    r.fixed("quasi_static", "frac_conserved_dims", None, n=0,
            undefined=f"needs every eigenvalue of ∂F/∂s (state_dim = {ctx.sm.dim} > qs_max_state "
                      f"= {int(ctx.knob('qs_max_state'))}; Arnoldi gives the extreme ones only)")
  else:
    r.add("quasi_static", "frac_conserved_dims", conserved,
          note=f"|λ| = 1 within {unit_tol:g}: stored quantities (e.g. θ₀), not memory or "
               f"instability")
  r.add("quasi_static", "frac_unstable", unstable, note=f"|λ| > 1 + {unit_tol:g}", estimator=est)
  for m in ("effective_step", "cos_ubar_neg_grad", "fp_residual"):
    r.add("quasi_static", m, ctx.per_task_mean(m))
  ctx.lap("quasi_static_rows")
  return _new_rows(ctx, start)


# --- 4. objective fit -----------------------------------------------------------------------------

# Dictionary-gradient floats ([B, T, K, n]) above which the qs: fit compiles its own program.
QS_OWN_PROGRAM = 2 ** 21


@functools.lru_cache(maxsize=16)
def _fit_fn(n_iter, train_index, polish_steps=30, max_fit_rows=None):
  fit = lambda u, g, inc, rows, valid: objective_fit.fit_objective(
      u, g, inc, train_index, n_iter, fit_rows_T=rows, valid_T=valid, polish_steps=polish_steps,
      max_fit_rows=max_fit_rows)
  return jax.jit(jax.vmap(fit, in_axes=(0, 0, None, None, None)))


def _not_identifiable(vif_profiled: float, vif_max: float) -> str:
  """The reason a weight row carries when its median profiled VIF exceeds the limit."""
  return (f"not identifiable with the metric free: profiled VIF={vif_profiled:.3g} > "
          f"{vif_max:g} (median over tasks)")


def _profiled_identifiable(vfit, u, g, include, rows_t, names, train_ix, vif_max):
  """The real fit, with terms whose weight is not identifiable once the metric and the step
  scales are free dropped one at a time (worst median ``vif_profiled`` over tasks first, each
  drop one more call of the same compiled fit) until every kept term has median profiled VIF
  ≤ ``vif_max``. Returns ``(fit, include, {name: reason})``."""
  include = np.array(include, bool)
  ua, ga, rows = jnp.asarray(u), jnp.asarray(g), jnp.asarray(rows_t)
  valid = jnp.ones_like(rows)
  reasons = {}
  while True:
    real = jax.tree.map(np.asarray, vfit(ua, ga, jnp.asarray(include), rows, valid))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      vp = np.nanmedian(real["vif_profiled"], axis=0)
    cand = [k for k in np.flatnonzero(include)
            if k != train_ix and not np.isnan(vp[k]) and vp[k] > vif_max]
    if not cand:
      return real, include, reasons
    worst = max(cand, key=lambda k: vp[k])
    reasons[names[worst]] = _not_identifiable(vp[worst], vif_max)
    include[worst] = False


def stop_hits(n_perm: int, alpha: float) -> int:
  """The fewest draws at least as extreme as the observed statistic that decide a permutation test
  of ``n_perm`` draws at level ``alpha`` against it: p = (1 + G) / (1 + n_perm) ≥ alpha for every
  G ≥ this (1 for 20 draws at 0.05)."""
  return max(1, math.ceil(alpha * (1 + n_perm) - 1 - 1e-9))


def _fit_null(vfit, u, g, include, rows_t, perms, valid_t=None, observed=None, alpha=None):
  """The permutation null (task i's updates, or ū, with task perms[r, i]'s gradients), each draw
  one call of the compiled program of the fit it is the null of. (Stacking the draws on the task
  axis compiled a second, (r + 1)-times larger program per split shape — 3–5 s of XLA:CPU
  compilation each in the quickstart — to save ~0.3 s of run time.)

  Sequential (Besag & Clifford 1991, "Sequential Monte Carlo p-values", Biometrika 78), when
  ``alpha`` is given: the draws stop as soon as h = ``stop_hits(R, alpha)`` of them have a
  task-mean held-out gain at least ``observed`` (the real fit's; a non-finite one counts every
  draw). With h such draws among all R the gain's p-value (1 + G) / (1 + R) could not fall below
  alpha, so the gain cannot clear, nor can any weight test that requires it: every decision is the
  one all R draws would give, and a gain that clears still gets all R. Returns the stacked draws
  plus ``hits`` and ``stopped`` (``_gain_pvalue`` gives the stopped test's p-value)."""
  if not perms.shape[0]:
    return None
  keep = ("w_norm", "r2_heldout", "r2_train_only_heldout", "vif_profiled")
  inc, rows = jnp.asarray(include), jnp.asarray(rows_t)
  valid = jnp.ones_like(rows) if valid_t is None else jnp.asarray(valid_t)
  ua = jnp.asarray(u)
  h = None if alpha is None else stop_hits(perms.shape[0], alpha)
  draws, hits = [], 0
  for p in perms:
    d = jax.tree.map(np.asarray, vfit(ua, jnp.asarray(g[p]), inc, rows, valid))
    draws.append(d)
    if h is not None:
      ng = float(_draw_gains(d))
      hits += int(not np.isfinite(observed) or (np.isfinite(ng) and ng >= observed))
      if hits >= h:
        break
  out = {k: np.stack([d[k] for d in draws]) for k in keep}
  out["hits"], out["stopped"], out["n_perm"] = hits, bool(h is not None and hits >= h), len(perms)
  return out


def _draw_gains(draws):
  """The task-mean held-out gain of each permutation draw (of one draw's [B] rows: a scalar)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no finite gain stays NaN
    return np.nanmean(draws["r2_heldout"] - draws["r2_train_only_heldout"], axis=-1)


def _gain_pvalue(observed: float, ng, null) -> float:
  """The gain's p-value against its draws ``ng``: (1 + G) / (1 + R) over all R draws, or, for
  draws stopped after h at least as large among L (``_fit_null``), max(h / L, (1 + h) / (1 + R)):
  Besag & Clifford's sequential p-value, raised where needed to the least that h such draws
  among all R would give (so it is ≥ alpha exactly when the test with all R fails; both valid)."""
  if not null["stopped"]:
    return null_pvalue(observed, ng, two_sided=False)
  h = null["hits"]
  return max(h / ng.size, (1 + h) / (1 + null["n_perm"]))


def _stop_alpha(ctx):
  """The level the fits' permutation draws stop at (``null_stop_early``), or None (all draws)."""
  return float(ctx.knob("alpha")) if ctx.knob("null_stop_early") else None


def _observed_gain(fit) -> float:
  """The task-mean held-out gain of a fit (the gain row's value; NaN when no task has one)."""
  gain = np.asarray(fit["r2_heldout"] - fit["r2_train_only_heldout"], np.float64)
  gain = gain[np.isfinite(gain)]
  return float(np.mean(gain)) if gain.size else float("nan")


def _perm_name(what: str, null, n_perm: int) -> str:
  """The ``null`` string of a permutation-tested row: how many draws, and why fewer."""
  if null is None or not null["stopped"]:
    return f"permutation: {what} ({n_perm} draws)"
  n = null["r2_heldout"].shape[0]
  return (f"permutation: {what} (stopped after {n} of {n_perm} draws, {null['hits']} with a "
          f"gain at least the observed: the gain cannot clear; sequential p-value)")


def _identifiable_w(w_B, vif_B, vif_max: float):
  """Per-task weights with the tasks where the weight is not identifiable once the metric and
  the step scales are free (profiled VIF > ``vif_max``) set to NaN. A term kept by the median
  criterion (``_profiled_identifiable``) can still be confounded with M in some tasks, and there
  its fitted weight runs off along a flat valley (measured: |w| 10⁴–10¹⁰, dominating the mean
  over tasks) without changing the fit."""
  w = np.asarray(w_B, np.float64)
  with np.errstate(invalid="ignore"):
    return np.where(np.asarray(vif_B, np.float64) > vif_max, np.nan, w)


def _vif_reason(vif_B, vif_max: float) -> str | None:
  """The ``undefined_tasks`` reason of a weight row with tasks left out by ``_identifiable_w``
  (None when none is; tasks left out for a non-finite fit are counted by ``n_undefined`` alone)."""
  with np.errstate(invalid="ignore"):
    bad = int(np.sum(np.asarray(vif_B, np.float64) > vif_max))
  return (f"{bad} of {np.size(vif_B)} tasks not identifiable with the metric free: profiled "
          f"VIF > {vif_max:g}") if bad else None


def _median(x) -> float:
  """Median over the non-NaN entries (∞ counts), NaN when there are none (JSON-safe float)."""
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]
  return float(np.median(x)) if x.size else float("nan")


def _tstat(x_AxB):
  """Per-row t-statistic mean/(sd/√n) over the finite entries of the last axis."""
  x = np.asarray(x_AxB, np.float64)
  out = []
  for row in np.atleast_2d(x):
    f = row[np.isfinite(row)]
    if f.size < 2:
      out.append(np.nan)
      continue
    sd = f.std(ddof=1)
    out.append(f.mean() / (sd / math.sqrt(f.size)) if sd > 0 else
               (0.0 if f.mean() == 0 else math.copysign(np.inf, f.mean())))
  return np.asarray(out)


def fit_results(ctx: SplitContext) -> dict:
  """The objective fit of this context (computed once; shared with ``alignment``)."""
  if "fit" in ctx.cache:
    return ctx.cache["fit"]
  traj, names = ctx.traj, ctx.names
  # Above fit_max_coords parameters the fit uses a uniform random subset of the coordinates (the
  # same for every task, step and permutation): w is K numbers and η_t one per step, estimated
  # from sums over coordinates, and the full [B, T, K, n] float64 dictionary at n = 10⁵ would
  # take gigabytes and minutes per permutation. M is then fitted on the subset only.
  n_max = int(ctx.knob("fit_max_coords"))
  coords = slice(None)
  if ctx.n_params > n_max:
    rng = np.random.default_rng(ctx.rows.seed_for("objective_fit", "coordinates"))
    coords = np.sort(rng.choice(ctx.n_params, n_max, replace=False))
  g = np.asarray(traj["grads"][:, :-1][..., coords], np.float64)        # [B, T, K, n']
  u = ctx.updates[..., coords]
  corr, norms = jax.vmap(objective_fit.gram)(jnp.asarray(g, jnp.float32))
  corr, norms = np.asarray(corr, np.float64), np.asarray(norms, np.float64)
  good = np.all(np.isfinite(corr), axis=(1, 2)) & np.all(np.isfinite(norms), axis=1)
  if not np.any(good):
    good[:] = True
  c_mean = np.nan_to_num(corr[good].mean(0))
  include, excluded = objective_fit.alias_mask(c_mean, norms[good].mean(0), names)
  include, not_ident = objective_fit.identifiable_mask(c_mean, include, names, ctx.train_ix,
                                                      float(ctx.knob("vif_max")))
  excluded.update(not_ident)
  n_fit = int(math.ceil(ctx.t_len * (1.0 - float(ctx.knob("heldout_frac")))))
  rows_t = (np.arange(ctx.t_len) < n_fit).astype(np.float64)
  iters = int(ctx.knob("fit_iters"))
  # Every fit of this context (real, null draws, qs:) fits w and M on at most n_fit rows.
  vfit = _fit_fn(iters, ctx.train_ix, int(ctx.knob("fit_polish_steps")), n_fit)
  include_dictionary = include.copy()  # before the metric-aware check (the endpoint fit's prior)
  with jax.enable_x64(True):
    real, include, not_ident = _profiled_identifiable(
        vfit, u, g, include, rows_t, names, ctx.train_ix, float(ctx.knob("vif_profiled_max")))
    excluded.update(not_ident)
    null = _fit_null(vfit, u, g, include, rows_t, ctx.perms, observed=_observed_gain(real),
                     alpha=_stop_alpha(ctx))
  ht_r2, ht_r2_0 = objective_fit.heldout_task_r2(u, g, real["w_norm"], real["metric"], include,
                                                 ctx.train_ix, real["metric_train_only"])
  out = {"fit": real, "null": null, "include": include, "excluded": excluded, "rows": rows_t,
         "include_dictionary": include_dictionary,
         "ht_r2": ht_r2, "ht_r2_0": ht_r2_0, "corr": c_mean, "n_fit": n_fit,
         "coords": (f"all {ctx.n_params}" if isinstance(coords, slice) else
                    f"{n_max} of {ctx.n_params} (uniform random subset)")}
  if ctx.use_qs and (ctx.sm.dim <= int(ctx.knob("qs_fit_max_state")) or ctx.qs_matfree):
    sub = np.unique(np.linspace(0, ctx.t_len - 1, min(ctx.t_len, int(ctx.knob("qs_fit_steps")))
                                ).round().astype(np.int32))
    ubar = ctx.qs_updates(sub)[..., coords]
    # Padded with zero rows to the trajectory's T (``fit_objective``'s ``valid_T``: the same
    # answer); η_t cut back to the solved steps. Small fits reuse the real fit's compiled program
    # (compiling is the cost there); above QS_OWN_PROGRAM floats the qs: fit gets its own program
    # for its fewer fitted rows (~19 of 25 against the real fit's 30 at T = 40: ~35% less work in
    # each of its 1 + num_perms calls, for one more compilation).
    n_sub = len(sub)
    pad = lambda x: np.concatenate(
        [x, np.zeros((x.shape[0], ctx.t_len - n_sub) + x.shape[2:], x.dtype)], axis=1)
    valid = (np.arange(ctx.t_len) < n_sub).astype(np.float64)
    rows_q = np.zeros(ctx.t_len)
    rows_q[:n_sub] = sub < n_fit
    q_u, q_g = pad(np.asarray(ubar, np.float64)), pad(g[:, sub])
    vfit_q = vfit
    if g.size >= QS_OWN_PROGRAM:
      vfit_q = _fit_fn(iters, ctx.train_ix, int(ctx.knob("fit_polish_steps")),
                       max(int(rows_q.sum()), 1))
    with jax.enable_x64(True):
      qfit = vfit_q(jnp.asarray(q_u), jnp.asarray(q_g), jnp.asarray(include),
                    jnp.asarray(rows_q), jnp.asarray(valid))
      out["qs_fit"] = jax.tree.map(np.asarray, qfit)
      out["qs_fit"]["eta"] = out["qs_fit"]["eta"][:, :n_sub]
      # The qs: fit's own permutation null (ū of task i with task perms[r, i]'s gradients): a
      # sign flip of the per-task weights is not calibrated here (tasks share structure that
      # gives every task the same nonzero weight; the untrained initialisation cleared it in up
      # to a third of its rows).
      out["qs_null"] = _fit_null(vfit_q, q_u, q_g, include, rows_q, ctx.perms, valid,
                                 observed=_observed_gain(out["qs_fit"]),
                                 alpha=_stop_alpha(ctx))
  ctx.cache["fit"] = out
  ctx.lap("objective_fit")
  return out


def _test_gain(row, gain_B, null, perm_name, alpha, seed) -> bool:
  """Marks an ``r2_gain_heldout_steps`` row against the permutation null of the same fit (the
  task-mean gain of each draw; one-sided) or, without draws, a sign flip of the per-task gains;
  returns whether it clears (p < alpha and the CI above 0)."""
  if row["value"] is None:
    return False
  if null is not None:
    ng = _draw_gains(null)
    p = _gain_pvalue(row["value"], ng, null)
    # The 95% quantile of the draws, when all were made (a few stopped draws do not give one).
    row["null_q95"] = (float(np.nanquantile(ng, 0.95)) if np.any(np.isfinite(ng))
                       and not null["stopped"] else None)
    clears = bool(p < alpha and row["ci_low"] > 0)
    _mark(row, perm_name, p, clears)
    return clears
  p = sign_flip_pvalue(gain_B, seed=seed)
  clears = bool(p < alpha and row["ci_low"] > 0)
  _mark(row, "sign flip of the per-task gains", p, clears)
  return clears


def _test_weight(row, w_B, k, null, perm_name, alpha, vif_max, gain_clears, seed, gain_metric):
  """Marks a weight row (per-task weights ``w_B``, term ``k``): the t-statistic of the weights
  over tasks against the same statistic of each permutation draw (its non-identifiable tasks left
  out alike), or, without draws, a sign flip. It clears only if p < alpha, its CI excludes 0 and
  ``gain_metric`` clears its null (``gain_clears``)."""
  if row["value"] is None:
    return
  excl0 = row["ci_low"] > 0 or row["ci_high"] < 0
  if null is not None:
    t_obs = _tstat(np.asarray(w_B)[None])[0]
    t_null = _tstat(_identifiable_w(null["w_norm"][:, :, k], null["vif_profiled"][:, :, k],
                                    vif_max))
    p = null_pvalue(t_obs, t_null[np.isfinite(t_null)])
    _mark(row, perm_name + "; t-statistic of the weight", p,
          bool(p < alpha and excl0 and gain_clears))
  else:
    p = sign_flip_pvalue(w_B, seed=seed)
    _mark(row, "sign flip", p, bool(p < alpha and excl0 and gain_clears))
  row["requires"] = f"{gain_metric} clears its null"


def objective_fit_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  r, names, alpha = ctx.rows, ctx.names, float(ctx.knob("alpha"))
  f = fit_results(ctx)
  fit, null, include, excluded = f["fit"], f["null"], f["include"], f["excluded"]
  n_perm = 0 if null is None else int(ctx.perms.shape[0])
  perm_name = _perm_name("updates paired with another task's gradients", null, n_perm)
  common = {"heldout_steps": f"last {ctx.t_len - f['n_fit']} of {ctx.t_len}",
            "fit_coords": f["coords"]}

  # R² on held-out steps (w and M fitted on the first steps), and its gain over the training loss.
  gain = fit["r2_heldout"] - fit["r2_train_only_heldout"]
  r.add("objective_fit", "r2_heldout_steps", fit["r2_heldout"], **common)
  r.add("objective_fit", "r2_train_only_heldout_steps", fit["r2_train_only_heldout"], **common)
  r.add("objective_fit", "r2_gain_heldout_steps", gain, **common)
  gain_clears = _test_gain(r.rows[-1], gain, null, perm_name, alpha,
                           r.seed_for("objective_fit", "gain_flip"))
  # R² on held-out tasks (the objective fitted on the other tasks).
  ht_gain = f["ht_r2"] - f["ht_r2_0"]
  r.add("objective_fit", "r2_heldout_tasks", f["ht_r2"])
  r.add("objective_fit", "r2_train_only_heldout_tasks", f["ht_r2_0"])
  r.add("objective_fit", "r2_gain_heldout_tasks", ht_gain)
  row = r.rows[-1]
  if row["value"] is not None:
    p = sign_flip_pvalue(ht_gain, seed=r.seed_for("objective_fit", "ht_flip"))
    _mark(row, "sign flip of the per-task gains", p, p < alpha and row["ci_low"] > 0)
  r.add("objective_fit", "r2_in_sample", fit["r2"], sample="fitted rows (optimistic)")
  r.add("objective_fit", "r2_train_only_in_sample", fit["r2_train_only"],
        sample="fitted rows (optimistic)")
  r.add("objective_fit", "frac_eta_positive", fit["frac_eta_positive"],
        note="share of fitted steps that descend the fitted objective (η_t > 0)")
  r.add("objective_fit", "gram_cond", fit["gram_cond"], stat=np.median)
  r.add("objective_fit", "metric_cond", fit["metric_cond"], stat=np.median)
  vif = objective_fit.vifs(f["corr"], include)
  vif_p_max = float(ctx.knob("vif_profiled_max"))

  # Weights: w_train = 1 by construction; a term is a finding only when the out-of-sample gain
  # clears its null and the weight's t-statistic clears the permutation null of the weight.
  for k, name in enumerate(names):
    metric = f"w:{name}"
    if not include[k]:
      r.fixed("objective_fit", metric, None, n=0, undefined=f"excluded: {excluded[name]}")
      continue
    if k == ctx.train_ix:
      r.fixed("objective_fit", metric, 1.0, n=ctx.b, note="fixed at 1 (normalisation); the "
              "sign of the update is frac_eta_positive")
      continue
    vif_k = fit["vif_profiled"][:, k]
    left_out = _vif_reason(vif_k, vif_p_max)
    w_k = _identifiable_w(fit["w_norm"][:, k], vif_k, vif_p_max)
    r.add("objective_fit", metric, w_k, vif=float(vif[k]), vif_profiled=_median(vif_k),
          undefined=left_out)
    _test_weight(r.rows[-1], w_k, k, null, perm_name, alpha, vif_p_max, gain_clears,
                 r.seed_for("objective_fit", metric), "r2_gain_heldout_steps")
    r.add("objective_fit", f"share:{name}", _identifiable_w(fit["share"][:, k], vif_k, vif_p_max),
          undefined=left_out)

  if "qs_fit" in f:
    q, q_null = f["qs_fit"], f["qs_null"]
    qgain = q["r2_heldout"] - q["r2_train_only_heldout"]
    q_perm = _perm_name("ū paired with another task's gradients", q_null, n_perm)
    r.add("objective_fit", "qs:r2_heldout_steps", q["r2_heldout"])
    r.add("objective_fit", "qs:r2_gain_heldout_steps", qgain)
    q_clears = _test_gain(r.rows[-1], qgain, q_null, q_perm, alpha,
                          r.seed_for("objective_fit", "qs_gain"))
    for k, name in enumerate(names):
      if not include[k] or k == ctx.train_ix:
        continue
      vq = _median(q["vif_profiled"][:, k])
      vq_max = float(ctx.knob("vif_profiled_max"))
      if vq > vq_max:  # NaN (no finite fit): the row says why itself
        r.fixed("objective_fit", f"qs:w:{name}", None, n=ctx.b, vif_profiled=vq,
                undefined=_not_identifiable(vq, vq_max))
        continue
      qw_k = _identifiable_w(q["w_norm"][:, k], q["vif_profiled"][:, k], vq_max)
      r.add("objective_fit", f"qs:w:{name}", qw_k, vif_profiled=vq,
            undefined=_vif_reason(q["vif_profiled"][:, k], vq_max))
      _test_weight(r.rows[-1], qw_k, k, q_null, q_perm, alpha, vq_max, q_clears,
                   r.seed_for("objective_fit", "qs", name), "qs:r2_gain_heldout_steps")
  return _new_rows(ctx, start)


# --- 5. endpoint fit ------------------------------------------------------------------------------

def endpoint_fit_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  r, names, alpha = ctx.rows, ctx.names, float(ctx.knob("alpha"))
  steps = ctx.knob("endpoint_steps")
  steps = ctx.horizon if steps is None else int(steps)
  g_end, u_end = ctx.endpoint(steps)
  u_scale = np.max(np.linalg.norm(ctx.updates, axis=2), axis=1)   # the run's own update scale
  with np.errstate(divide="ignore", invalid="ignore"):
    rel = u_end / u_scale
  tol = float(ctx.knob("stationary_tol"))
  stat = np.isfinite(rel) & (rel <= tol) & np.all(np.isfinite(g_end), axis=(1, 2))
  r.fixed("endpoint_fit", "endpoint_steps", steps, n=ctx.b)
  r.add("endpoint_fit", "update_norm_end_rel", rel,
        note="‖u(θ_end)‖ / max_t ‖u_t‖ along the trajectory")
  gn_end = np.linalg.norm(g_end[:, ctx.train_ix], axis=1)
  g0 = np.asarray(ctx.traj["grads"][:, 0, ctx.train_ix], np.float64)
  r.add("endpoint_fit", "grad_norm_end", gn_end)
  r.add("endpoint_fit", "grad_norm_end_rel", gn_end / np.linalg.norm(g0, axis=1))
  r.add("endpoint_fit", "frac_stationary", stat.astype(float),
        note=f"update_norm_end_rel <= stationary_tol = {tol:g}")
  n_stat = int(stat.sum())
  if n_stat < 2:
    with np.errstate(invalid="ignore"):
      med = float(np.nanmedian(rel)) if np.any(np.isfinite(rel)) else float("nan")
    reason = (f"not stationary: update_norm_end_rel={med:.3g} > {tol:g} (median; "
              f"{n_stat} of {ctx.b} tasks stationary)")
    for name in names:
      r.fixed("endpoint_fit", f"w:{name}", None, n=n_stat, undefined=reason)
    r.fixed("endpoint_fit", "residual_ratio", None, n=n_stat, undefined=reason)
    return _new_rows(ctx, start)
  # The trajectory's aliases and collinear terms; not the terms only the free metric M confounds
  # (the endpoint fit has no metric).
  prior = fit_results(ctx)["include_dictionary"] if "fit" in ctx.cache else None
  g_s = g_end[stat]
  ep = endpoint_fit.endpoint_fit(g_s, names, ctx.train_ix, g0[stat], n_boot=int(ctx.knob("n_boot")),
                                 seed=r.seed_for("endpoint_fit", "w"), prior_include=prior)
  perms = np.stack([np.random.default_rng(r.seed_for("endpoint_fit", "perm", i)).permutation(n_stat)
                    for i in range(int(ctx.knob("num_perms")))]) if n_stat > 1 else np.zeros((0, 0))
  null_rr = endpoint_fit.permutation_null(g_s, ep["include"], ctx.train_ix, perms)
  p_rr = null_pvalue(-ep["residual_ratio"], -null_rr, two_sided=False)
  rr_clears = bool(p_rr < alpha and ep["residual_ratio"] < 0.5)
  for k, name in enumerate(names):
    if k == ctx.train_ix:
      r.fixed("endpoint_fit", f"w:{name}", 1.0, n=ep["n"], note="fixed at 1 (normalisation)")
    elif ep["include"][k]:
      r.fixed("endpoint_fit", f"w:{name}", ep["w"][k], ep["ci_low"][k], ep["ci_high"][k], ep["n"])
      row = r.rows[-1]
      excl0 = row["ci_low"] is not None and (row["ci_low"] > 0 or row["ci_high"] < 0)
      _mark(row, "residual_ratio vs permutation null (end points of other tasks)", p_rr,
            bool(excl0 and rr_clears))
    else:
      r.fixed("endpoint_fit", f"w:{name}", None, n=ep["n"],
              undefined=f"excluded: {ep['excluded'][name]}")
  r.fixed("endpoint_fit", "residual_ratio", ep["residual_ratio"], n=ep["n"],
          note="fit residual / training-loss-only residual at the same end points")
  if r.rows[-1]["value"] is not None:
    r.rows[-1]["null_q05"] = float(np.quantile(null_rr, 0.05)) if null_rr.size else None
    _mark(r.rows[-1], "permutation: other terms' gradients from other end points", p_rr,
          rr_clears)
  r.fixed("endpoint_fit", "rel_residual", ep["rel_residual"], n=ep["n"],
          note="residual / Σ‖∇L_train(θ₀)‖² (scale only; use residual_ratio)")
  return _new_rows(ctx, start)


# --- 6. alignment ---------------------------------------------------------------------------------

def _phi_undefined(include_K, vif_BxK, vif_max: float) -> np.ndarray:
  """bool [B]: tasks whose fitted objective Φ_w = Σ_k w_k φ_k is undefined, because an included
  term's weight is not identifiable there with the metric free (profiled VIF > ``vif_max``)."""
  with np.errstate(invalid="ignore"):
    return np.any(np.asarray(include_K, bool)[None, :]
                  & (np.asarray(vif_BxK, np.float64) > vif_max), axis=1)


def alignment_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  r, alpha = ctx.rows, float(ctx.knob("alpha"))
  f = fit_results(ctx)
  traj, u = ctx.traj, ctx.updates
  vals = np.asarray(traj["vals"], np.float64)
  gt = np.asarray(traj["grads"][:, :-1, ctx.train_ix], np.float64)
  go = np.asarray(traj["grads"][:, :-1, ctx.outer_ix], np.float64)
  w_fit = np.where(f["include"][None, :], np.nan_to_num(f["fit"]["w_norm"]), 0.0)
  tie = float(ctx.knob("tie_rtol"))
  al = [align_mod.alignment(u[i], gt[i], go[i], vals[i, :, ctx.outer_ix], vals[i] @ w_fit[i],
                            tie_rtol=tie) for i in range(ctx.b)]
  # Φ_w of a task where some included term's weight is not identifiable with the metric free
  # (its profiled VIF above the limit: the weight ran off along a flat valley, |w| up to 10¹⁰)
  # is that one term, not the fitted objective: the divergence test is undefined there.
  vif_max = float(ctx.knob("vif_profiled_max"))
  phi_bad = _phi_undefined(f["include"], f["fit"]["vif_profiled"], vif_max)
  for i in np.flatnonzero(phi_bad):
    al[i]["divergence_step"] = al[i]["diverged"] = np.nan
  phi_reason = (f"{int(phi_bad.sum())} of {ctx.b} tasks: Φ_w undefined (a weight not "
                f"identifiable with the metric free: profiled VIF > {vif_max:g})"
                if phi_bad.any() else None)
  div_all_nan = all(np.isnan(a["divergence_step"]) for a in al)
  div_reason = "; ".join(x for x in ("no divergence step in any task" if div_all_nan else
                                     "no divergence step in these tasks", phi_reason) if x)
  perms = ctx.perms
  nulls = {
      "cos_u_neg_outer_grad": lambda i, j: align_mod.cos_mean(u[i], go[j]),
      "descent_ratio": lambda i, j: align_mod.descent_ratio(u[i], go[j], gt[i]),
  }
  perm_name = f"permutation: updates paired with another task's outer gradient ({perms.shape[0]})"
  for m in ("cos_u_neg_outer_grad", "cos_u_neg_outer_grad_late", "cos_u_neg_train_grad",
            "descent_ratio", "descent_ratio_late", "frac_outer_descent", "divergence_step"):
    stat = np.median if "ratio" in m else np.mean
    extra = {"tie_rtol": tie} if m == "frac_outer_descent" else {}
    r.add("alignment", m, [a[m] for a in al], stat=stat,
          undefined=div_reason if m == "divergence_step" else None, **extra)
    row = r.rows[-1]
    if m in nulls and row["value"] is not None and perms.shape[0]:
      null = np.array([stat(np.array([nulls[m](i, int(p[i])) for i in range(ctx.b)]))
                       for p in perms])
      p = null_pvalue(row["value"], null[np.isfinite(null)], two_sided=True, centre=0.0)
      ci_excl = row["ci_low"] > 0 or row["ci_high"] < 0
      _mark(row, perm_name, p, bool(p < alpha and ci_excl))
  r.add("alignment", "frac_diverged", [a["diverged"] for a in al], undefined=phi_reason)
  ctx.lap("alignment")
  return _new_rows(ctx, start)


# --- 7. probes ------------------------------------------------------------------------------------

def probes_stage(ctx: SplitContext) -> list[dict]:
  start = len(ctx.rows.rows)
  if ctx.hidden_like is None:
    return []
  r, traj = ctx.rows, ctx.traj
  hid = jax.vmap(jax.vmap(ctx.opt.hidden_state))(take(traj["opt_states"],
                                                      jnp.arange(1, ctx.t_len + 1)))
  vals = np.asarray(traj["vals"], np.float64)
  tg = probes.targets(np.asarray(traj["grads"][:, :-1, ctx.train_ix]),
                      vals[:, :-1, ctx.train_ix], np.asarray(traj["curvature"]), ctx.horizon)
  res = probes.probe_all(np.asarray(hid), tg, seed=r.seed_for("probes"),
                         n_boot=int(ctx.knob("n_boot")),
                         max_rows=int(ctx.knob("probe_max_rows")))
  null = "control probe on targets shuffled within folds (Hewitt & Liang 2019)"
  for tname, x in res.items():
    r.fixed("probes", f"r2:{tname}", x["r2"], x["r2_lo"], x["r2_hi"], x["n"])
    r.fixed("probes", f"selectivity:{tname}", x["selectivity"], x["sel_lo"], x["sel_hi"], x["n"])
    row = r.rows[-1]
    if row["value"] is not None:
      row["null"] = null
      row["clears_null"] = bool(row["ci_low"] is not None and row["ci_low"] > 0.05)
    r.fixed("probes", f"r2_control:{tname}", x["r2_control"], n=x["n"])
  ctx.lap("probes")
  return _new_rows(ctx, start)
