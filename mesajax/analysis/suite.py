"""The analysis driver: every mesa-objective analysis on every split, as tidy rows.

``run_analyses(opt, phi, opt_name, splits, acfg, seed)`` runs, for each split (a task family and a
horizon), on ``acfg.num_tasks`` tasks drawn from the ``analysis`` key stream of that split
(``mesajax.splits.purpose_key(seed, "analysis", split.name)``), with deterministic full batches:

1. trajectories of ``acfg.num_steps`` steps (horizon = the split's) and the dictionary values and
   gradients at every point (``dictionary``);
2. at ``acfg.num_points`` evenly spaced points per trajectory: ``nci``, ``transverse``,
   ``nci_metric`` (``nci``) and ``quasi_static`` (its eigenvalues, effective step, and the same NCI
   metrics of the effective field ū, prefixed ``qs:``);
3. ``objective_fit`` along the trajectories (and of ū, prefixed ``qs:``);
4. ``endpoint_fit`` at the end of runs of ``acfg.endpoint_steps`` (default: the split's horizon);
5. ``alignment`` along the trajectories, using each task's fitted objective;
6. ``probes`` when ``opt.hidden_state`` is not None.

Each stage is one ``jax.jit`` per (optimizer, split), vmapped over tasks (and points and probes).
Per-task values are aggregated as the mean over tasks with a 95% percentile-bootstrap CI over tasks
(``mesajax.eval.stats.bootstrap_ci``; non-finite tasks are dropped and ``n`` counts the rest).
Optional ``acfg`` fields (defaults): ``endpoint_steps`` (split horizon), ``dense_max`` (2048: the
largest n for the dense Jacobian of the fitted diagonal metric), ``qs_max_state`` (1024: the
largest float-state size for the quasi-static reduction), ``qs_fit_steps`` (25: trajectory steps
per task at which ū is solved for the ``qs:`` objective fit), ``qs_fit_max_state`` (256: the
largest float-state size for that fit), ``num_sens_probes`` (8),
``fit_iters`` (100), ``num_eigs`` (4), ``probe_max_rows`` (50000).
"""
from __future__ import annotations

import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mesajax.tasks.views import FullBatch
from mesajax.analysis import alignment as align_mod
from mesajax.analysis import dictionary, endpoint_fit, fields, nci, objective_fit, probes
from mesajax.analysis import quasi_static as qs
from mesajax.eval.stats import bootstrap_ci
from mesajax.optimizers.base import make_context
from mesajax.report.rows import make_row
from mesajax.rollout import init_inner, inner_step, run_trajectory
from mesajax.splits import purpose_key

ANALYSES = ("nci", "transverse", "nci_metric", "quasi_static", "objective_fit", "endpoint_fit",
            "alignment", "probes")
_DEFAULTS = {"endpoint_steps": None, "dense_max": 2048, "qs_max_state": 1024,
             "num_sens_probes": 8, "fit_iters": 100, "num_eigs": 4, "probe_max_rows": 50000,
             "qs_fit_steps": 25, "qs_fit_max_state": 256}


def _get(acfg, name):
  return acfg.get(name, _DEFAULTS.get(name)) if hasattr(acfg, "get") else getattr(acfg, name)


def validate(acfg) -> None:
  """One-line ``ValueError`` for out-of-range analysis settings (before anything compiles)."""
  def need(cond, msg):
    if not cond:
      raise ValueError(f"analysis: {msg}")
  for f in ("num_tasks", "num_steps", "num_points", "num_probes", "n_boot"):
    need(_get(acfg, f) is not None, f"config.analysis.{f} is required")
  need(int(acfg.num_tasks) >= 2, f"num_tasks must be >= 2, got {acfg.num_tasks}")
  need(int(acfg.num_steps) >= 4, f"num_steps must be >= 4, got {acfg.num_steps}")
  need(1 <= int(acfg.num_points) <= int(acfg.num_steps),
       f"num_points must be in [1, num_steps], got {acfg.num_points}")
  need(int(acfg.num_probes) >= 2, f"num_probes must be >= 2, got {acfg.num_probes}")
  need(int(acfg.n_boot) >= 1, f"n_boot must be >= 1, got {acfg.n_boot}")
  es = _get(acfg, "endpoint_steps")
  need(es is None or int(es) >= 1, f"endpoint_steps must be >= 1, got {es}")


# --- device stages (one jit each per optimizer and split) ----------------------------------------

@functools.lru_cache(maxsize=64)
def _trajectory_fn(opt, family, num_steps, want_curvature):
  fb = FullBatch(family)

  def one(phi, horizon, task, key):
    states, _ = run_trajectory(opt, phi, fb, task, key, num_steps, horizon)
    p0 = jax.tree.map(lambda x: x[0], states.params)
    dict_at = lambda p: dictionary.values_and_grads(family, task, p, p0)
    vals, grads = jax.vmap(dict_at)(states.params)
    thetas = jax.vmap(lambda p: ravel_pytree(p)[0])(states.params)
    # The updates themselves (θ_{t+1} − θ_t in float32 loses precision once steps are small).
    _, unravel = ravel_pytree(p0)
    at = lambda tree, i: jax.tree.map(lambda x: x[i], tree)

    def update(i):
      params, g = at(states.params, i), unravel(grads[i, 0])
      ctx = make_context(i, horizon, vals[i, 0])
      return ravel_pytree(opt.update(phi, at(states.opt_state, i), g, params, ctx)[0])[0]

    u = jax.vmap(update)(jnp.arange(num_steps))
    out = {"thetas": thetas, "vals": vals, "grads": grads, "opt_states": states.opt_state,
           "updates": u}
    if want_curvature:
      gfun = lambda th: ravel_pytree(jax.grad(family.train_loss_full)(unravel(th), task))[0]
      hu = jax.vmap(lambda th, d: jax.jvp(gfun, (th,), (d,))[1])(thetas[:-1], u)
      out["curvature"] = jnp.sum(u * hu, 1) / jnp.maximum(jnp.sum(u * u, 1), 1e-30)
    return out

  return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))


def _field_metrics(field, u_of_g, theta, v, w, z, dense):
  """NCI, transverse and metric NCIs of one field at one point (2K + 1 JVPs of the field for K
  probe pairs (v, w), plus one JVP of the update in g per Rademacher row of z, plus n JVPs for the
  dense Jacobian if ``dense``)."""
  u, g, p = nci.probe_products(field, theta, v, w)
  out = {}
  out["nci"], out["ratio"] = nci.nci_from_probes(p)
  out["transverse"], out["transverse_ratio"] = nci.transverse_from_probes(p)
  out["cos_u_neg_grad"] = fields.cosine(u, -g)
  d = fields.diag_sensitivity(u_of_g, g, z)
  m_own, out["own_diag_neg_frac"] = nci.own_diag_metric(d)
  out["nci:own_diag"] = nci.nci_from_probes(p, m_own)[0]
  out["metric_cond:own_diag"] = nci.metric_cond(m_own)
  if dense:
    jac = jax.jacfwd(lambda t: field(t)[0])(theta)
    m_fit, _ = nci.fit_diag_metric(jac)
    out["nci:fitted_diag"] = nci.nci_from_probes(p, m_fit)[0]
    out["metric_cond:fitted_diag"] = nci.metric_cond(m_fit)
    out["fitted_diag_clip_frac"] = jnp.mean(m_fit <= 1.0001e-6 * jnp.max(m_fit))
  return out, u, g


@functools.lru_cache(maxsize=64)
def _points_fn(opt, family, dense, sm):
  def point(phi, horizon, task, params, state, step, v, w, z):
    loss = family.train_loss_full(params, task)
    ctx = make_context(step, horizon, loss)
    theta = ravel_pytree(params)[0]
    field = fields.update_field(opt, phi, family, task, state, ctx, params)
    u_of_g = fields.update_of_grad(opt, phi, state, params, ctx)
    out, _, g = _field_metrics(field, u_of_g, theta, v, w, z, dense)
    if sm is not None:
      sol = qs.solve_point(sm, state, g, params, phi, ctx)
      ub = sol["u_bar"]
      out["effective_step"] = -jnp.vdot(ub, g) / jnp.maximum(jnp.vdot(g, g), 1e-30)
      out["cos_ubar_neg_grad"] = fields.cosine(ub, -g)
      out["fp_residual"] = sol["residual"]
      out["state_jac"] = sol["jac"]
      state_fn = qs.effective_state_fn(sm, state, phi, solution=(sol["s_star"], sol["jac"]))
      qfield = fields.update_field(opt, phi, family, task, state, ctx, params, state_fn=state_fn)
      qu_of_g = fields.update_of_grad(opt, phi, state, params, ctx, state_fn=state_fn)
      qout, _, _ = _field_metrics(qfield, qu_of_g, theta, v, w, z, dense)
      out.update({f"qs:{k}": v for k, v in qout.items()})
    return out

  if sm is None or qs.batchable(sm.dim):
    over_points = jax.vmap(point, in_axes=(None, None, None, 0, 0, 0, 0, 0, 0))
    return jax.jit(jax.vmap(over_points, in_axes=(None, None, 0, 0, 0, None, 0, 0, 0)))

  def sequential(phi, horizon, tasks, params, states, steps, v, w, z):
    b, p = v.shape[:2]
    flat = lambda x: x.reshape((b * p,) + x.shape[2:])
    xs = (jax.tree.map(lambda x: jnp.repeat(x, p, axis=0), tasks), jax.tree.map(flat, params),
          jax.tree.map(flat, states), jnp.tile(steps, b), flat(v), flat(w), flat(z))
    out = jax.lax.map(lambda a: point(phi, horizon, *a), xs)
    return jax.tree.map(lambda x: x.reshape((b, p) + x.shape[1:]), out)

  return jax.jit(sequential)  # large states: unbatched LAPACK inverses (quasi_static._inverse)


@functools.lru_cache(maxsize=64)
def _qs_trajectory_fn(opt, family, sm):
  """ū at every trajectory point (for the ``qs:`` objective fit): a fixed-point solve per step."""

  def one_step(phi, horizon, task, params, state, step, g):
    ctx = make_context(step, horizon, family.train_loss_full(params, task))
    s0, others = sm.split(state)
    args = (g, params, phi, ctx, others)
    s = qs._newton_solve(sm.F, s0, args, 3, 10)
    return sm.u(s, args)

  if qs.batchable(sm.dim):
    over_t = jax.vmap(one_step, in_axes=(None, None, None, 0, 0, 0, 0))
    return jax.jit(jax.vmap(over_t, in_axes=(None, None, 0, 0, 0, None, 0)))

  def sequential(phi, horizon, tasks, params, states, steps, g):
    b, t = g.shape[:2]
    flat = lambda x: x.reshape((b * t,) + x.shape[2:])
    xs = (jax.tree.map(lambda x: jnp.repeat(x, t, axis=0), tasks), jax.tree.map(flat, params),
          jax.tree.map(flat, states), jnp.tile(steps, b), flat(g))
    out = jax.lax.map(lambda a: one_step(phi, horizon, *a), xs)
    return out.reshape((b, t) + out.shape[1:])

  return jax.jit(sequential)


@functools.lru_cache(maxsize=16)
def _fit_fn(n_iter, train_index):
  fit = lambda u, g, inc: objective_fit.fit_objective(u, g, inc, train_index, n_iter)
  return jax.jit(jax.vmap(fit, in_axes=(0, 0, None)))


@functools.lru_cache(maxsize=64)
def _endpoint_fn(opt, family):
  """Runs ``steps`` (traced, so one compilation serves every run length) full-batch steps and
  returns the dictionary gradients and the update norm at the end point."""
  fb = FullBatch(family)

  def one(phi, horizon, steps, task, key):
    k_init, k_run = jax.random.split(key)
    state = init_inner(opt, phi, fb, task, k_init)
    body = lambda _, s: inner_step(opt, phi, fb, task, s, k_run, horizon)[0]
    fin = jax.lax.fori_loop(0, steps, body, state)
    p0 = family.init(k_init, task)
    _, grads = dictionary.values_and_grads(family, task, fin.params, p0)
    g_tree = jax.grad(family.train_loss_full)(fin.params, task)
    ctx = make_context(steps, horizon, family.train_loss_full(fin.params, task))
    u_end = ravel_pytree(opt.update(phi, fin.opt_state, g_tree, fin.params, ctx)[0])[0]
    return grads, jnp.linalg.norm(u_end)

  return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


# --- host-side aggregation ------------------------------------------------------------------------

class _Rows:
  def __init__(self, split, opt_name, n_boot, seed):
    self.split, self.opt, self.n_boot, self.seed, self.rows = split, opt_name, n_boot, seed, []

  def add(self, analysis, metric, per_task, stat=np.mean, **extra):
    x = np.asarray(per_task, np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
      self.rows.append(make_row(analysis, self.split, self.opt, metric, None, n=0, **extra))
      return
    v, lo, hi = bootstrap_ci(x, n_boot=self.n_boot, seed=self.seed, stat=stat)
    self.rows.append(make_row(analysis, self.split, self.opt, metric, v, lo, hi, n=x.size, **extra))

  def fixed(self, analysis, metric, value, ci_low=None, ci_high=None, n=None, **extra):
    self.rows.append(make_row(analysis, self.split, self.opt, metric, value, ci_low, ci_high, n,
                              **extra))


def _point_indices(num_steps, num_points):
  return np.floor((np.arange(num_points) + 0.5) * num_steps / num_points).astype(np.int32)


def _take(tree, idx, axis=1):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=axis), tree)


def analyse_split(opt, phi, opt_name, split, acfg, seed: int, timings: dict | None = None):
  """All analyses on one split; returns its rows."""
  fam = split.family
  b, t_len, p_num = int(acfg.num_tasks), int(acfg.num_steps), int(acfg.num_points)
  horizon = int(split.horizon)
  names = dictionary.term_names(fam)
  train_ix = names.index("train_loss")
  outer_ix = names.index("outer_loss")
  out = _Rows(split.name, opt_name, int(acfg.n_boot), seed)
  tick = time.perf_counter()

  def lap(stage):
    nonlocal tick
    if timings is not None:
      now = time.perf_counter()
      timings[f"{split.name}/{stage}"] = now - tick
      tick = now

  k_tasks, k_init, k_pts = jax.random.split(purpose_key(seed, "analysis", split.name), 3)
  tasks = fam.sample_batch(k_tasks, b)
  keys = jax.random.split(k_init, b)
  params_like = fam.init(keys[0], jax.tree.map(lambda x: x[0], tasks))
  state_like = opt.init(phi, params_like)
  n_params = int(ravel_pytree(params_like)[0].shape[0])
  hidden_like = opt.hidden_state(state_like)
  sm = qs.StateMap(opt, state_like, params_like)
  use_qs = 0 < sm.dim <= int(_get(acfg, "qs_max_state"))

  # 1. trajectories and the dictionary along them
  hz = jnp.asarray(horizon, jnp.int32)
  traj = _trajectory_fn(opt, fam, t_len, hidden_like is not None)(phi, hz, tasks, keys)
  traj = jax.block_until_ready(traj)
  lap("trajectories")
  u_np = np.asarray(traj["updates"], np.float64)

  # 2. Jacobian analyses at points
  idx = _point_indices(t_len, p_num)
  params_pts = jax.vmap(fields_unravel(params_like))(traj["thetas"][:, idx].reshape(b * p_num, -1))
  params_pts = jax.tree.map(lambda x: x.reshape((b, p_num) + x.shape[1:]), params_pts)
  states_pts = _take(traj["opt_states"], jnp.asarray(idx))
  # Probes drawn on the host (threefry sampling inside jit is slow to compile on CPU), seeded
  # from the split's analysis key; the effective field ū uses the same probes (paired comparison).
  rng = np.random.default_rng(np.asarray(k_pts, np.uint32))
  k_pr, k_sens = int(acfg.num_probes), int(_get(acfg, "num_sens_probes"))
  v = rng.standard_normal((b, p_num, k_pr, n_params), np.float32)
  w = rng.standard_normal((b, p_num, k_pr, n_params), np.float32)
  z = rng.choice(np.array([-1.0, 1.0], np.float32), (b, p_num, k_sens, n_params))
  dense = n_params <= int(_get(acfg, "dense_max"))
  pts = _points_fn(opt, fam, dense, sm if use_qs else None)(
      phi, hz, tasks, params_pts, states_pts, jnp.asarray(idx), v, w, z)
  pts = jax.tree.map(np.asarray, jax.block_until_ready(pts))
  lap("points")
  def per_task(key):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN tasks are dropped later
      return np.nanmean(pts[key], axis=1)

  for prefix in ("", "qs:") if use_qs else ("",):
    if prefix + "nci" not in pts:
      continue
    for m in ("nci", "ratio", "cos_u_neg_grad"):
      out.add("nci", prefix + m, per_task(prefix + m))
    for m in ("transverse", "transverse_ratio"):
      out.add("transverse", prefix + m, per_task(prefix + m))
    out.add("nci_metric", prefix + "nci:identity", per_task(prefix + "nci"))
    for m in ("nci:fitted_diag", "metric_cond:fitted_diag", "fitted_diag_clip_frac", "nci:own_diag",
              "metric_cond:own_diag", "own_diag_neg_frac", "cos_u_neg_grad"):
      if prefix + m in pts:
        stat = np.median if m.startswith("metric_cond") else np.mean
        out.add("nci_metric", prefix + m, per_task(prefix + m), stat=stat)

  # quasi-static reduction
  out.fixed("quasi_static", "state_dim", sm.dim)
  if use_qs:
    k_eig = int(_get(acfg, "num_eigs"))
    # Eigenvalues (host LAPACK) at one point per task, the middle one: O(B · d_s³).
    jac = pts["state_jac"][:, p_num // 2]
    mags = np.stack([qs.distinct_magnitudes(np.linalg.eigvals(j), k_eig)
                     if np.all(np.isfinite(j)) else np.full(k_eig, np.nan) for j in jac])
    for i in range(k_eig):
      out.add("quasi_static", f"eig_{i + 1}", mags[:, i])
      with np.errstate(divide="ignore", invalid="ignore"):  # |λ| ≥ 1: no finite timescale
        out.add("quasi_static", f"timescale_{i + 1}",
                np.where(mags[:, i] < 1.0, 1.0 / (1.0 - mags[:, i]), np.nan))
    out.add("quasi_static", "frac_unstable", (mags[:, 0] >= 1.0).astype(float))
    for m in ("effective_step", "cos_ubar_neg_grad", "fp_residual"):
      out.add("quasi_static", m, per_task(m))
  lap("quasi_static_host")

  # 3. objective fit along the trajectories
  g_traj = traj["grads"][:, :-1]
  corr, norms = jax.vmap(objective_fit.gram)(g_traj)
  corr, norms = np.asarray(corr), np.asarray(norms)
  good = np.all(np.isfinite(corr), axis=(1, 2)) & np.all(np.isfinite(norms), axis=1)
  if not np.any(good):
    good[:] = True
  include, excluded = objective_fit.alias_mask(corr[good].mean(0), norms[good].mean(0), names)
  fit_fn = _fit_fn(int(_get(acfg, "fit_iters")), train_ix)
  fits = {"": jax.tree.map(np.asarray, fit_fn(jnp.asarray(u_np, jnp.float32), g_traj, include))}
  if use_qs and sm.dim <= int(_get(acfg, "qs_fit_max_state")):
    # ū at a subsample of at most ``qs_fit_steps`` evenly spaced steps (a fixed-point solve each).
    sub = np.unique(np.linspace(0, t_len - 1, min(t_len, int(_get(acfg, "qs_fit_steps")))
                                ).round().astype(np.int32))
    ubar = _qs_trajectory_fn(opt, fam, sm)(
        phi, hz, tasks, _take(_params_tree(traj, params_like), jnp.asarray(sub)),
        _take(traj["opt_states"], jnp.asarray(sub)), jnp.asarray(sub),
        traj["grads"][:, sub, train_ix])
    fits["qs:"] = jax.tree.map(np.asarray, fit_fn(ubar, g_traj[:, sub], include))
  lap("objective_fit")
  for prefix, fit in fits.items():
    for k, name in enumerate(names):
      if not include[k]:
        out.fixed("objective_fit", f"{prefix}w:{name}", None, excluded=excluded[name])
        continue
      out.add("objective_fit", f"{prefix}w:{name}", fit["w_norm"][:, k])
      out.add("objective_fit", f"{prefix}share:{name}", fit["share"][:, k])
      if not prefix:
        out.add("objective_fit", f"w_raw:{name}", fit["w"][:, k])
        out.fixed("objective_fit", f"w_std:{name}", float(np.nanstd(fit["w_norm"][:, k])), n=b)
    out.add("objective_fit", prefix + "r2", fit["r2"])
    out.add("objective_fit", prefix + "r2_train_only", fit["r2_train_only"])
    if not prefix:
      out.add("objective_fit", "gram_cond", fit["gram_cond"], stat=np.median)
      out.add("objective_fit", "metric_cond", fit["metric_cond"], stat=np.median)
      out.add("objective_fit", "normalised_by_train", fit["normalised_by_train"])

  # 4. endpoint inverse optimisation
  steps_end = _get(acfg, "endpoint_steps")
  steps_end = horizon if steps_end is None else int(steps_end)
  g_end, u_end = _endpoint_fn(opt, fam)(phi, hz, jnp.asarray(steps_end, jnp.int32), tasks, keys)
  g_end, u_end = np.asarray(g_end), np.asarray(u_end)
  lap("endpoint")
  g0_train = np.asarray(traj["grads"][:, 0, train_ix])
  ep = endpoint_fit.endpoint_fit(g_end, names, train_ix, g0_train, n_boot=int(acfg.n_boot),
                                 seed=seed, prior_include=include)
  for k, name in enumerate(names):
    if ep["include"][k]:
      out.fixed("endpoint_fit", f"w:{name}", ep["w"][k], ep["ci_low"][k], ep["ci_high"][k], ep["n"])
    else:
      out.fixed("endpoint_fit", f"w:{name}", None, n=ep["n"], excluded=ep["excluded"][name])
  out.fixed("endpoint_fit", "rel_residual", ep["rel_residual"], n=ep["n"])
  out.fixed("endpoint_fit", "endpoint_steps", steps_end)
  gn_end = np.linalg.norm(g_end[:, train_ix], axis=1)
  out.add("endpoint_fit", "grad_norm_end", gn_end)
  out.add("endpoint_fit", "grad_norm_end_rel", gn_end / np.linalg.norm(g0_train, axis=1))
  out.add("endpoint_fit", "update_norm_end_rel", u_end / np.linalg.norm(u_np[:, 0], axis=1))

  # 5. alignment (with each task's fitted implicit objective)
  vals = np.asarray(traj["vals"], np.float64)
  grads_np = np.asarray(traj["grads"][:, :-1][:, :, [train_ix, outer_ix]], np.float64)
  w_fit = np.where(include[None, :], np.nan_to_num(fits[""]["w_norm"]), 0.0)
  al = [align_mod.alignment(u_np[i], grads_np[i, :, 0], grads_np[i, :, 1], vals[i, :, outer_ix],
                            vals[i] @ w_fit[i]) for i in range(b)]
  for m in ("cos_u_neg_outer_grad", "cos_u_neg_outer_grad_late", "cos_u_neg_train_grad",
            "descent_ratio", "descent_ratio_late", "frac_outer_descent", "divergence_step"):
    out.add("alignment", m, [a[m] for a in al], stat=np.median if "ratio" in m else np.mean)
  out.add("alignment", "frac_diverged", [a["diverged"] for a in al])
  lap("alignment")

  # 6. probes of the hidden state
  if hidden_like is not None:
    hid = jax.vmap(jax.vmap(opt.hidden_state))(_take(traj["opt_states"], jnp.arange(1, t_len + 1)))
    tg = probes.targets(np.asarray(traj["grads"][:, :-1, train_ix]), vals[:, :-1, train_ix],
                        np.asarray(traj["curvature"]), horizon)
    res = probes.probe_all(np.asarray(hid), tg, seed=seed, n_boot=int(acfg.n_boot),
                           max_rows=int(_get(acfg, "probe_max_rows")))
    for tname, r in res.items():
      out.fixed("probes", f"r2:{tname}", r["r2"], r["r2_lo"], r["r2_hi"], r["n"])
      out.fixed("probes", f"selectivity:{tname}", r["selectivity"], r["sel_lo"], r["sel_hi"],
                r["n"])
      out.fixed("probes", f"r2_control:{tname}", r["r2_control"], n=r["n"])
    lap("probes")
  return out.rows


def fields_unravel(params_like):
  return ravel_pytree(params_like)[1]


def _params_tree(traj, params_like):
  unravel = fields_unravel(params_like)
  th = traj["thetas"]
  flat = jax.vmap(unravel)(th.reshape((-1, th.shape[-1])))
  return jax.tree.map(lambda x: x.reshape(th.shape[:2] + x.shape[1:]), flat)


def run_analyses(opt, phi, opt_name: str, splits: dict, acfg, seed: int,
                 timings: dict | None = None) -> list[dict]:
  """Every analysis on every split; returns tidy rows (``mesajax.report.rows`` keys, plus
  ``excluded`` on rows of terms left out of a fit). ``timings``, if given, receives the wall time
  of each stage (``"<split>/<stage>"``)."""
  validate(acfg)
  rows = []
  for split in splits.values():
    rows.extend(analyse_split(opt, phi, opt_name, split, acfg, seed, timings))
  return rows
