"""The per-split analysis context shared by every analysis stage, and the row collector.

A stage is a function ``(SplitContext) -> list[row]`` registered by name in
``mesajax.registry.ANALYSES``. The context holds what several stages share, computed lazily and
once: the tasks of the split's ``analysis`` key stream, the full-batch trajectories with the
dictionary along them (``traj``), the Jacobian analyses at points (``points``, float64), the
objective fit (``fit``, float64, used by ``alignment`` too), and the permutations of the tasks used
by every permutation null (``perms``). Adding an analysis is one new module with a stage function
plus one line in ``ANALYSES``.

Numerics: trajectories run in float32 (what the optimizer does in use); everything that cancels —
the update field's Jacobian and every NCI, the quasi-static fixed point and ū, the objective fit —
is computed in float64 inside ``jax.enable_x64(True)`` scopes, from float64 copies of the points.
"""
from __future__ import annotations

import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mesajax.analysis import dictionary, fields, matfree, nci
from mesajax.analysis import quasi_static as qs
from mesajax.eval.stats import finite_bootstrap_ci, stream_seed
from mesajax.optimizers.base import make_context
from mesajax.report.rows import make_row
from mesajax.rollout import init_inner, inner_step, run_trajectory
from mesajax.splits import purpose_key
from mesajax.tasks.views import FullBatch


def knob(acfg, name, defaults):
  """``acfg.name``; the analysis default when the config does not carry the knob."""
  try:
    v = acfg[name] if hasattr(acfg, "__getitem__") else getattr(acfg, name)
  except (KeyError, AttributeError):
    return defaults[name]
  return v


def to64(tree):
  """Float leaves of ``tree`` as float64 (call inside ``jax.enable_x64(True)``)."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
      else x, tree)


# --- rows -----------------------------------------------------------------------------------------

class Rows:
  """Collects rows of one (optimizer, split); keeps every per-task vector for paired rows.

  ``add`` aggregates per-task values: mean (or ``stat``) over the finite ones with a percentile
  bootstrap CI whose seed is derived from (seed, optimizer, split, analysis, metric) — an
  independent stream per metric. A row without a finite value carries ``undefined=<reason>``;
  so does every ``fixed`` row whose value is None or non-finite.
  """

  def __init__(self, split: str, opt_name: str, n_boot: int, seed: int,
               common: dict | None = None):
    self.split, self.opt, self.n_boot, self.seed = split, opt_name, n_boot, seed
    self.common = dict(common or {})
    self.rows: list[dict] = []
    self.per_task: dict[tuple[str, str], np.ndarray] = {}

  def seed_for(self, *names) -> int:
    return stream_seed(self.seed, self.opt, self.split, *names)

  def add(self, analysis, metric, per_task, stat=np.mean, undefined: str | None = None, **extra):
    x = np.asarray(per_task, np.float64).reshape(-1).copy()
    self.per_task[(analysis, metric)] = x
    out = finite_bootstrap_ci(x, n_boot=self.n_boot, seed=self.seed_for(analysis, metric),
                              stat=stat)
    if out is None:
      reason = undefined or f"no finite value in {x.size} tasks"
      self.rows.append(make_row(analysis, self.split, self.opt, metric, None, n=0,
                                undefined=reason, **self.common, **extra))
      return
    v, lo, hi, n = out
    if n < x.size:
      extra.setdefault("n_undefined", int(x.size - n))
      if undefined:
        extra.setdefault("undefined_tasks", undefined)
    self.rows.append(make_row(analysis, self.split, self.opt, metric, v, lo, hi, n,
                              **self.common, **extra))

  def fixed(self, analysis, metric, value, ci_low=None, ci_high=None, n=None,
            undefined: str | None = None, **extra):
    bad = value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value))
    if bad:
      extra["undefined"] = undefined or "non-finite value"
      value, ci_low, ci_high = None, None, None
      n = 0 if n is None else n
    self.rows.append(make_row(analysis, self.split, self.opt, metric, value, ci_low, ci_high, n,
                              **self.common, **extra))


# --- device programs (one jit each per optimizer and split shape) ---------------------------------
# Keyed on ``family.program_key()``: splits whose families differ only in knobs that change task
# sampling (``TaskFamily.sample_only``, e.g. linreg's noise) share every program, since the tasks
# are inputs (quickstart: the `noiseless` split compiles nothing new).

# Up to this many parameters every analysis program (trajectories, points, quasi-static solves,
# end-point runs; not the objective fit, whose execution dominates) compiles at XLA's backend
# optimisation level 0: each runs once per (optimizer, split) on small arrays, so LLVM's
# optimisation costs more time than it saves (quickstart: one split's analyses 54 s -> 42 s).
# Above it, execution dominates and the default level applies. Code generated at another level
# rounds float32 differently (contraction into FMAs, reduction order): the float64 quantities agree
# to ~1e-9, while quantities that amplify float32 round-off along hundreds of steps move by a few
# per cent (end-point update norms; the median condition number of the clipped fitted diagonal
# metric, 353 -> 430 with CI [235, 1022]) — well inside their confidence intervals.
FAST_COMPILE_MAX_PARAMS = 4096
_FAST = {"xla_backend_optimization_level": 0}


def _jit(fn, fast: bool):
  return jax.jit(fn, compiler_options=_FAST) if fast else jax.jit(fn)


@functools.lru_cache(maxsize=64)
def _trajectory_fn(opt, family, num_steps, want_curvature, fast=False):
  fb = FullBatch(family)

  def one(phi, horizon, task, key):
    states, _ = run_trajectory(opt, phi, fb, task, key, num_steps, horizon)
    p0 = jax.tree.map(lambda x: x[0], states.params)
    dict_at = lambda p: dictionary.values_and_grads(family, task, p, p0)
    vals, grads = jax.vmap(dict_at)(states.params)
    thetas = jax.vmap(lambda p: ravel_pytree(p)[0])(states.params)
    _, unravel = ravel_pytree(p0)
    at = lambda tree, i: jax.tree.map(lambda x: x[i], tree)

    def update(i):  # the updates themselves (θ_{t+1} − θ_t loses precision once steps are small)
      params, g = at(states.params, i), unravel(grads[i, 0])
      ctx = make_context(i, horizon, vals[i, 0])
      return ravel_pytree(opt.update(phi, at(states.opt_state, i), g, params, ctx)[0])[0]

    # Steps in batches of ≤ 2¹⁸ / n (all at once for small n): the update of a per-parameter
    # learned optimizer holds [n, hidden] activations per step and task (a 10⁵-parameter run with
    # every step at once grew past 10 GB of host memory).
    batch = max(1, min(num_steps, 2 ** 18 // thetas.shape[1]))
    u = jax.lax.map(update, jnp.arange(num_steps), batch_size=batch)
    out = {"thetas": thetas, "vals": vals, "grads": grads, "opt_states": states.opt_state,
           "updates": u}
    if want_curvature:
      gfun = lambda th: ravel_pytree(jax.grad(family.train_loss_full)(unravel(th), task))[0]
      hu = jax.lax.map(lambda a: jax.jvp(gfun, (a[0],), (a[1],))[1], (thetas[:-1], u),
                       batch_size=batch)
      out["curvature"] = jnp.sum(u * hu, 1) / jnp.maximum(jnp.sum(u * u, 1), 1e-30)
    return out

  return _jit(jax.vmap(one, in_axes=(None, None, 0, 0)), fast)


def field_metrics(field, u_of_g, theta, v, w, z, dense: bool, want_jac: bool,
                  segments: tuple = (), f=None):
  """NCI, transverse and metric NCIs of one field at one point.

  ``dense``: exact values from the dense Jacobian (n JVPs of the field, ``jax.jacfwd``) and the
  exact diagonal of ∂u/∂g (n JVPs of the update in g); otherwise the probe estimators (2K + 1 JVPs
  plus ``num_sens_probes`` for the Hutchinson diagonal, plus K_f (L + 1) for the block metric fit
  on the separate probes ``f`` [K_f, n]), each with its jackknife standard error (``se:`` keys).
  ``segments``: flat sizes of the parameter tensors (the block metric's basis,
  ``matfree.leaf_basis``). Every NCI of a point where J = 0 exactly (the update does not depend on
  θ there) is NaN: 0/0, undefined, and flagged by ``j_zero``.
  """
  out = {}
  if dense:
    u, lin, g = jax.linearize(field, theta, has_aux=True)
    jac = jax.vmap(lin, out_axes=1)(jnp.eye(theta.shape[0], dtype=theta.dtype))
    jn = jnp.sqrt(jnp.sum(jac * jac))
    ok = jn > 0
    nanif = lambda x: jnp.where(ok, x, jnp.nan)
    out["nci"], out["ratio"] = map(nanif, nci.nci_exact(jac))
    out["transverse"], out["transverse_ratio"] = map(nanif, nci.transverse_exact(jac, u))
    diag = jnp.diagonal(jax.jacfwd(u_of_g)(g))
    m_own, out["own_diag_neg_frac"] = nci.own_diag_metric(diag)
    out["nci:own_diag"] = nanif(nci.nci_exact(jac, m_own)[0])
    out["metric_cond:own_diag"] = nci.metric_cond(m_own)
    m_fit, _ = nci.fit_diag_metric(jac)
    out["nci:fitted_diag"] = nanif(nci.nci_exact(jac, m_fit)[0])
    out["metric_cond:fitted_diag"] = nanif(nci.metric_cond(m_fit))
    out["fitted_diag_clip_frac"] = nanif(jnp.mean(m_fit <= 1.0001e-6 * jnp.max(m_fit)))
    if segments:
      basis = matfree.leaf_basis(segments, m_own)
      m_blk, _ = matfree.fit_block_metric(*matfree.block_metric_exact(jac, basis), basis)
      out["nci:fitted_block"] = nanif(nci.nci_exact(jac, m_blk)[0])
      out["metric_cond:fitted_block"] = nanif(nci.metric_cond(m_blk))
    if want_jac:
      out["jac"] = jac
  else:
    u, g, p, lin = nci.linearized_probes(field, theta, v, w)
    a = jnp.sum(p.v_KxN * p.jw_KxN, axis=1)
    b = jnp.sum(p.w_KxN * p.jv_KxN, axis=1)
    ok = jnp.sum(a * a + b * b) > 0
    jn = jnp.where(ok, 1.0, 0.0)
    nanif = lambda x: jnp.where(ok, x, jnp.nan)
    out["nci"], out["ratio"] = map(nanif, nci.nci_from_probes(p))
    out["transverse"], out["transverse_ratio"] = map(nanif, nci.transverse_from_probes(p))
    d = fields.diag_sensitivity(u_of_g, g, z)
    m_own, out["own_diag_neg_frac"] = nci.own_diag_metric(d)
    out["nci:own_diag"] = nanif(nci.nci_from_probes(p, m_own)[0])
    out["metric_cond:own_diag"] = nci.metric_cond(m_own)
    se = lambda metric=None, transverse=False: nanif(
        matfree.jackknife_nci(*nci.st_from_probes(p, metric, transverse)))
    out["se:nci"], out["se:transverse"], out["se:nci:own_diag"] = (
        se(), se(transverse=True), se(m_own))
    if segments and f is not None:
      basis = matfree.leaf_basis(segments, m_own)
      c_k, r_k = matfree.block_metric_products(lin, f, basis)
      m_blk, _ = matfree.fit_block_metric(jnp.mean(c_k, 0), jnp.mean(r_k, 0), basis)
      out["nci:fitted_block"] = nanif(nci.nci_from_probes(p, m_blk)[0])
      out["se:nci:fitted_block"] = se(m_blk)
      out["metric_cond:fitted_block"] = nanif(nci.metric_cond(m_blk))
  out["cos_u_neg_grad"] = fields.cosine(u, -g)
  out["j_zero"] = (jn == 0).astype(theta.dtype)
  return out, u, g


@functools.lru_cache(maxsize=64)
def _points_fn(opt, family, dense, want_jac, sm, segments=(), krylov=0, sequential=False,
               fast=False):
  """Float64 Jacobian analyses at points (call inside ``jax.enable_x64(True)``).

  ``krylov`` > 0: the quasi-static reduction is matrix-free (Newton–Krylov fixed point, Arnoldi
  Hessenberg matrix ``state_hess`` of ∂F/∂s instead of the dense ``state_jac``, implicit tangents by
  GMRES, all with ``krylov``-dimensional Krylov spaces; ``matfree``). ``sequential``: map over the
  points one at a time (``jax.lax.map``) instead of vmapping them (memory, or LAPACK; see below)."""

  def point(phi, horizon, task, params, state, step, v, w, z, f):
    task, params, state, v, w, z, f = to64((task, params, state, v, w, z, f))
    loss = family.train_loss_full(params, task)
    ctx = fields.with_loss(make_context(step, horizon), loss)
    theta = ravel_pytree(params)[0]
    field = fields.update_field(opt, phi, family, task, state, ctx, params)
    u_of_g = fields.update_of_grad(opt, phi, state, params, ctx)
    out, _, g = field_metrics(field, u_of_g, theta, v, w, z, dense, want_jac, segments, f)
    if sm is not None:
      if krylov:
        s0, others = sm.split(state)
        args = (g, params, phi, ctx, others)
        shift = qs._reg(g.dtype)
        s_star = matfree.newton_krylov(sm.F, s0, args, shift, m=krylov)
        ub = sm.u(s_star, args)
        res = jnp.linalg.norm(sm.F(s_star, args) - s_star) / jnp.maximum(
            jnp.linalg.norm(s_star), 1e-30)
        _, jf = jax.linearize(lambda x: sm.F(x, args), s_star)
        start = jax.random.normal(jax.random.PRNGKey(0), s_star.shape, s_star.dtype)
        out["state_hess"] = matfree.arnoldi(jf, start, krylov)[0]
        # One GMRES polynomial of the frozen operator per point starts every tangent's solve
        # (~m cheap matvecs instead of a Krylov process re-reading its basis; GMRES then checks
        # the residual and corrects if the polynomial falls short).
        poly = matfree.fixed_point_polynomial(sm.F, s_star, args, shift, start, krylov)

        def state_fn(grads, p_, c_):
          a = (ravel_pytree(grads)[0], p_, phi, c_, others)
          return sm.build(matfree.implicit_fixed_point(sm.F, s_star, a, shift, krylov, poly),
                          others)
      else:
        sol = qs.solve_point(sm, state, g, params, phi, ctx)
        ub, res = sol["u_bar"], sol["residual"]
        out["state_jac"] = sol["jac"]
        state_fn = qs.effective_state_fn(sm, state, phi, solution=(sol["s_star"], sol["jac"]))
      out["effective_step"] = -jnp.vdot(ub, g) / jnp.maximum(jnp.vdot(g, g), 1e-300)
      out["cos_ubar_neg_grad"] = fields.cosine(ub, -g)
      out["fp_residual"] = res
      qfield = fields.update_field(opt, phi, family, task, state, ctx, params, state_fn=state_fn)
      qu_of_g = fields.update_of_grad(opt, phi, state, params, ctx, state_fn=state_fn)
      # Matrix-free ū: every tangent is a GMRES solve, so the probe estimators (2K + 1 + ...
      # tangents) replace the dense Jacobian (n tangents) at every n.
      qdense = dense and not krylov
      qout, _, _ = field_metrics(qfield, qu_of_g, theta, v, w, z, qdense, want_jac and qdense,
                                 segments, f)
      out.update({f"qs:{k}": val for k, val in qout.items()})
    return out

  if not sequential and (sm is None or qs.batchable(sm.dim)):
    over_points = jax.vmap(point, in_axes=(None, None, None, 0, 0, 0, 0, 0, 0, 0))
    return _jit(jax.vmap(over_points, in_axes=(None, None, 0, 0, 0, None, 0, 0, 0, 0)), fast)

  def seq(phi, horizon, tasks, params, states, steps, v, w, z, f):
    b, p = v.shape[:2]
    flat = lambda x: x.reshape((b * p,) + x.shape[2:])
    xs = (jax.tree.map(lambda x: jnp.repeat(x, p, axis=0), tasks), jax.tree.map(flat, params),
          jax.tree.map(flat, states), jnp.tile(steps, b), flat(v), flat(w), flat(z), flat(f))
    out = jax.lax.map(lambda a: point(phi, horizon, *a), xs)
    return jax.tree.map(lambda x: x.reshape((b, p) + x.shape[1:]), out)

  return _jit(seq, fast)  # large states: unbatched LAPACK inverses (quasi_static._inverse)


@functools.lru_cache(maxsize=64)
def _qs_trajectory_fn(opt, family, sm, krylov=0, fast=False):
  """ū at trajectory points in float64 (for the ``qs:`` objective fit): a fixed-point solve each
  (Newton–Krylov with ``krylov``-dimensional spaces when ``krylov`` > 0, else dense Newton). The
  Newton–Krylov solves all start their GMRES from one GMRES polynomial of the state map's operator
  at the first task's first step (exact for a linear state map such as the MLP optimizer's
  momenta; only a start otherwise, see ``matfree.gmres_polynomial``)."""

  def setup(phi, horizon, task, params, state, step, g):
    """Float64 inputs: (state, its float part s0, the state map's args)."""
    task, params, state, g = to64((task, params, state, g))
    ctx = fields.with_loss(make_context(step, horizon), family.train_loss_full(params, task))
    s0, others = sm.split(state)
    return state, s0, (g, params, phi, ctx, others)

  def polynomial(phi, horizon, tasks, params, states, steps, g):
    first = lambda x: x[0, 0]
    _, s0, args = setup(phi, horizon, jax.tree.map(lambda x: x[0], tasks),
                        jax.tree.map(first, params), jax.tree.map(first, states), steps[0],
                        g[0, 0])
    start = jax.random.normal(jax.random.PRNGKey(0), s0.shape, s0.dtype)
    return matfree.fixed_point_polynomial(sm.F, s0, args, qs._reg(s0.dtype), start, krylov)

  def one_step(phi, horizon, task, params, state, step, g, poly=None):
    state, s0, args = setup(phi, horizon, task, params, state, step, g)
    if krylov:
      return sm.u(matfree.newton_krylov(sm.F, s0, args, qs._reg(s0.dtype), m=krylov, poly=poly),
                  args)
    g, params, _, ctx, _ = args
    return qs.effective_update(sm, state, g, params, phi, ctx)

  if qs.batchable(sm.dim):
    def batched(phi, horizon, tasks, params, states, steps, g):
      poly = polynomial(phi, horizon, tasks, params, states, steps, g) if krylov else None
      over_t = jax.vmap(lambda *a: one_step(*a, poly=poly), in_axes=(None, None, None, 0, 0, 0, 0))
      return jax.vmap(over_t, in_axes=(None, None, 0, 0, 0, None, 0))(
          phi, horizon, tasks, params, states, steps, g)
    return _jit(batched, fast)

  def sequential(phi, horizon, tasks, params, states, steps, g):
    poly = polynomial(phi, horizon, tasks, params, states, steps, g) if krylov else None
    b, t = g.shape[:2]
    flat = lambda x: x.reshape((b * t,) + x.shape[2:])
    xs = (jax.tree.map(lambda x: jnp.repeat(x, t, axis=0), tasks), jax.tree.map(flat, params),
          jax.tree.map(flat, states), jnp.tile(steps, b), flat(g))
    out = jax.lax.map(lambda a: one_step(phi, horizon, *a, poly=poly), xs)
    return out.reshape((b, t) + out.shape[1:])

  return _jit(sequential, fast)


@functools.lru_cache(maxsize=64)
def _endpoint_fn(opt, family, fast=False):
  """Runs ``steps`` (traced) full-batch steps; returns the dictionary gradients and the update
  norm at the end point."""
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

  return _jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)), fast)


def _point_indices(num_steps, num_points):
  return np.floor((np.arange(num_points) + 0.5) * num_steps / num_points).astype(np.int32)


def take(tree, idx, axis=1):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=axis), tree)


def derangements(b: int, r: int, seed: int) -> np.ndarray:
  """``r`` random permutations of ``b`` tasks without fixed points, [r, b] (the permutation null
  pairs each task's updates with another task's gradients)."""
  rng = np.random.default_rng(seed)
  out = np.empty((r, b), np.int64)
  for i in range(r):
    while True:
      p = rng.permutation(b)
      if b < 2 or np.all(p != np.arange(b)):
        break
    out[i] = p
  return out


# --- the context ----------------------------------------------------------------------------------

class SplitContext:
  """Everything the stages share for one (optimizer, φ, split): see the module docstring.

  Attributes: ``opt, phi, opt_name, split, fam, acfg, seed, knob(name)``; ``b`` tasks, ``t_len``
  steps, ``p_num`` points, ``horizon``, ``names`` (dictionary terms), ``train_ix``, ``outer_ix``,
  ``tasks``, ``keys``, ``n_params``, ``sm`` (``quasi_static.StateMap``), ``use_qs``, ``rows``
  (``Rows``); lazily: ``traj``, ``points``, ``perms``, and ``cache`` (a dict stages may fill, e.g.
  the objective fit that ``alignment`` reuses).
  """

  def __init__(self, opt, phi, opt_name, split, acfg, seed, defaults, timings=None,
               common: dict | None = None):
    # One placement for every φ: a restored checkpoint's φ carries the meta-training mesh's
    # NamedSharding, a fresh φ (the untrained null) a single-device one, and jit compiles each
    # input sharding separately (the null pass recompiled every program).
    phi = jax.device_put(phi, jax.local_devices()[0])
    self.opt, self.phi, self.opt_name, self.split = opt, phi, opt_name, split
    self.acfg, self.seed, self.defaults, self.timings = acfg, int(seed), defaults, timings
    self.fam = split.family
    self.b = int(self.knob("num_tasks"))
    self.t_len = int(self.knob("num_steps"))
    self.p_num = int(self.knob("num_points"))
    self.horizon = int(split.horizon)
    self.names = dictionary.term_names(self.fam)
    self.train_ix = self.names.index("train_loss")
    self.outer_ix = self.names.index("outer_loss")
    self.rows = Rows(split.name, opt_name, int(self.knob("n_boot")), self.seed, common)
    self.cache: dict = {}
    k_tasks, k_init, self.k_pts = jax.random.split(purpose_key(self.seed, "analysis", split.name), 3)
    self.tasks = self.fam.sample_batch(k_tasks, self.b)
    self.keys = jax.random.split(k_init, self.b)
    self.params_like = self.fam.init(self.keys[0], jax.tree.map(lambda x: x[0], self.tasks))
    self.state_like = opt.init(phi, self.params_like)
    self.n_params = int(ravel_pytree(self.params_like)[0].shape[0])
    self.hidden_like = opt.hidden_state(self.state_like)
    self.sm = qs.StateMap(opt, self.state_like, self.params_like)
    # Dense ∂F/∂s up to qs_max_state floats; above it Krylov methods (qs_matfree) or nothing.
    self.qs_matfree = self.sm.dim > int(self.knob("qs_max_state")) and bool(self.knob("qs_matfree"))
    self.use_qs = 0 < self.sm.dim and (self.sm.dim <= int(self.knob("qs_max_state"))
                                       or self.qs_matfree)
    self.hz = jnp.asarray(self.horizon, jnp.int32)
    self.fast = self.n_params <= FAST_COMPILE_MAX_PARAMS
    self._tick = time.perf_counter()

  def knob(self, name):
    return knob(self.acfg, name, self.defaults)

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    if self.timings is not None:
      key = f"{self.split.name}/{self.opt_name}/{stage}"
      self.timings[key] = self.timings.get(key, 0.0) + now - self._tick
    self._tick = now

  @functools.cached_property
  def traj(self) -> dict:
    fn = _trajectory_fn(self.opt, self.fam.program_key(), self.t_len,
                        self.hidden_like is not None, self.fast)
    out = jax.block_until_ready(fn(self.phi, self.hz, self.tasks, self.keys))
    self.lap("trajectories")
    return out

  @functools.cached_property
  def updates(self) -> np.ndarray:
    return np.asarray(self.traj["updates"], np.float64)

  @functools.cached_property
  def perms(self) -> np.ndarray:
    return derangements(self.b, int(self.knob("num_perms")), self.rows.seed_for("permutations"))

  def params_tree(self, thetas):
    unravel = ravel_pytree(self.params_like)[1]
    flat = jax.vmap(unravel)(thetas.reshape((-1, thetas.shape[-1])))
    return jax.tree.map(lambda x: x.reshape(thetas.shape[:2] + x.shape[1:]), flat)

  @functools.cached_property
  def point_idx(self) -> np.ndarray:
    return _point_indices(self.t_len, self.p_num)

  @functools.cached_property
  def points(self) -> dict:
    traj, b, p_num, n = self.traj, self.b, self.p_num, self.n_params
    idx = self.point_idx
    params_pts = self.params_tree(traj["thetas"][:, idx])
    states_pts = take(traj["opt_states"], jnp.asarray(idx))
    dense = n <= int(self.knob("dense_max"))
    want_jac = n <= int(self.knob("spd_max"))
    # Probes on the host (threefry inside jit is slow to compile on CPU), from the split's key.
    rng = np.random.default_rng(np.asarray(self.k_pts, np.uint32))
    # Probes wherever a field is not dense: above dense_max, and for ū when it is matrix-free.
    probed = not dense or self.qs_matfree
    k_pr = int(self.knob("num_probes")) if probed else 1
    k_sens = int(self.knob("num_sens_probes")) if probed else 1
    k_fit = int(self.knob("num_fit_probes")) if probed else 1
    v = rng.standard_normal((b, p_num, k_pr, n))
    w = rng.standard_normal((b, p_num, k_pr, n))
    z = rng.choice(np.array([-1.0, 1.0]), (b, p_num, k_sens, n))
    f = rng.standard_normal((b, p_num, k_fit, n))
    segments = tuple(int(np.size(x)) for x in jax.tree.leaves(self.params_like))
    krylov = int(self.knob("krylov_dim")) if self.qs_matfree else 0
    # Every point at once unless its probe products would exceed point_batch_mb (float64).
    jvps = 2 * k_pr + 1 + k_fit * (2 * len(segments) + 1)
    sequential = (probed and b * p_num * jvps * n * 8 * (2 if self.use_qs else 1)
                  > float(self.knob("point_batch_mb")) * 2 ** 20)
    with jax.enable_x64(True):
      sm = None
      if self.use_qs:
        sm = qs.StateMap(self.opt, to64(self.state_like), to64(self.params_like))
      fn = _points_fn(self.opt, self.fam.program_key(), dense, want_jac, sm, segments, krylov,
                      sequential, self.fast)
      out = fn(self.phi, self.hz, self.tasks, params_pts, states_pts, jnp.asarray(idx), v, w, z, f)
      out = jax.tree.map(np.asarray, jax.block_until_ready(out))
    self.lap("points")
    out["_dense"] = dense
    out["_qs_dense"] = dense and not self.qs_matfree
    return out

  def per_task_mean(self, key: str) -> np.ndarray:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN tasks stay NaN (undefined)
      return np.nanmean(self.points[key], axis=1)

  def qs_updates(self, sub: np.ndarray) -> np.ndarray:
    """ū (float64) at trajectory steps ``sub`` of every task."""
    traj = self.traj
    with jax.enable_x64(True):
      sm = qs.StateMap(self.opt, to64(self.state_like), to64(self.params_like))
      krylov = int(self.knob("krylov_dim")) if self.qs_matfree else 0
      out = _qs_trajectory_fn(self.opt, self.fam.program_key(), sm, krylov, self.fast)(
          self.phi, self.hz, self.tasks, self.params_tree(traj["thetas"][:, sub]),
          take(traj["opt_states"], jnp.asarray(sub)), jnp.asarray(sub),
          traj["grads"][:, sub, self.train_ix])
      return np.asarray(jax.block_until_ready(out))

  def endpoint(self, steps: int):
    fn = _endpoint_fn(self.opt, self.fam.program_key(), self.fast)
    g_end, u_end = fn(self.phi, self.hz, jnp.asarray(steps, jnp.int32), self.tasks, self.keys)
    out = np.asarray(g_end, np.float64), np.asarray(u_end, np.float64)
    self.lap("endpoint")
    return out
