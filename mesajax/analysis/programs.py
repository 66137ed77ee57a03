"""The compiled programs of the analysis suite, one ``jax.jit`` each per optimizer and split shape
(``lru_cache``d on their static arguments): the full-batch trajectory with the dictionary along it
(``_trajectory_fn``), the float64 Jacobian analyses at points (``_points_fn``, through
``field_metrics``), ū along the trajectory for the ``qs:`` fit (``_qs_trajectory_fn``) and the
end-point runs (``_endpoint_fn``). ``mesajax.analysis.context.SplitContext`` calls them lazily.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mesajax.analysis import dictionary, fields, matfree, nci
from mesajax.analysis import quasi_static as qs
from mesajax.optimizers.base import make_context
from mesajax.rollout import init_inner, inner_step, run_trajectory
from mesajax.tasks.views import FullBatch

def to64(tree):
  """Float leaves of ``tree`` as float64 (call inside ``jax.enable_x64(True)``)."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
      else x, tree)


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
        start = jax.random.normal(jax.random.PRNGKey(0), s0.shape, s0.dtype)
        # One start per point for every solve there (``matfree.krylov_start``: the division by
        # the diagonal where ∂F/∂s is diagonal, else a GMRES polynomial: ~m cheap matvecs instead
        # of a Krylov process re-reading its basis; GMRES then checks the residual and corrects).
        # Built at the trajectory's state for the Newton steps, then, unless the operator is
        # diagonal, again at s* for the tangents (the operator there is frozen).
        poly0 = matfree.fixed_point_polynomial(sm.F, s0, args, shift, start, krylov)
        s_star = matfree.newton_krylov(sm.F, s0, args, shift, m=krylov, poly=poly0)
        ub = sm.u(s_star, args)
        res = jnp.linalg.norm(sm.F(s_star, args) - s_star) / jnp.maximum(
            jnp.linalg.norm(s_star), 1e-30)
        _, jf = jax.linearize(lambda x: sm.F(x, args), s_star)
        out["state_hess"] = matfree.arnoldi(jf, start, krylov)[0]
        poly = jax.lax.cond(
            poly0[3], lambda _: poly0,
            lambda _: matfree.fixed_point_polynomial(sm.F, s_star, args, shift, start, krylov), None)

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
