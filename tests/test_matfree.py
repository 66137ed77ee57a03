"""Matrix-free estimators (mesajax/analysis/matfree.py) against their dense references, float64."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.analysis import fields, matfree, nci, suite
from mesajax.analysis import quasi_static as qs
from mesajax.optimizers.base import make_context
from mesajax.optimizers.baselines import Adam
from mesajax.optimizers.mlp_lopt import MLPLOpt
from mesajax.optimizers.rnn_lopt import RNNLOpt
from mesajax.splits import Split
from mesajax.tasks.quadratic import Quadratic

DIM = 6


def test_arnoldi_ritz_values_match_dense_eigenvalues():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    a = jnp.asarray(rng.standard_normal((12, 12)) / np.sqrt(12))
    h, q = matfree.arnoldi(lambda v: a @ v, jnp.asarray(rng.standard_normal(12)), 12)
    ritz = np.sort_complex(matfree.ritz_values(h))
    np.testing.assert_allclose(ritz, np.sort_complex(np.linalg.eigvals(np.asarray(a))), atol=1e-8)
    # Invariant Krylov space: a diagonal map with 3 distinct decays breaks down after 3 steps and
    # its Ritz values are exactly the decays (the per-coordinate optimizer state maps).
    d = jnp.asarray(np.repeat([0.5, 0.9, 0.999], 40))
    h, _ = matfree.arnoldi(lambda v: d * v, jnp.asarray(rng.standard_normal(120)), 10)
    np.testing.assert_allclose(np.sort(matfree.ritz_values(h).real), [0.5, 0.9, 0.999], atol=1e-10)


def test_gmres_solve_and_its_tangent():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    a = jnp.eye(15) * 2.0 + jnp.asarray(rng.standard_normal((15, 15))) * 0.2
    b, db = jnp.asarray(rng.standard_normal(15)), jnp.asarray(rng.standard_normal(15))
    mv = lambda x: a @ x
    x, dx = jax.jit(lambda b, db: jax.jvp(lambda bb: matfree.solve(mv, bb, m=15), (b,), (db,)))(
        b, db)
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(a), np.asarray(b)), rtol=1e-9)
    np.testing.assert_allclose(dx, np.linalg.solve(np.asarray(a), np.asarray(db)), rtol=1e-9)


def test_krylov_solvers_stop_early_on_an_invariant_space():
  """GMRES and Newton–Krylov stop once converged: a diagonal map with 3 distinct entries needs
  about 3 matvecs per solve, not m · (restarts + 1) (the per-coordinate optimizer state maps at
  10⁵ parameters, where every matvec of the Krylov process reads the whole basis)."""
  rng = np.random.default_rng(2)
  calls = []
  with jax.enable_x64(True):
    d = jnp.asarray(np.repeat([0.5, 0.1, 1e-3], 50))

    def mv(v):
      jax.debug.callback(lambda: calls.append(1))
      return d * v

    b = jnp.asarray(rng.standard_normal(150))
    x = matfree.gmres(mv, b, m=20, restarts=2)
    np.testing.assert_allclose(x, b / d, rtol=1e-9)
    assert len(calls) <= 5, len(calls)  # 1 residual + 3 Arnoldi steps (+1 breakdown check)
    calls.clear()
    assert np.all(np.asarray(matfree.gmres(mv, jnp.zeros(150), m=20)) == 0) and not calls
    # A non-invariant operator still converges, through the restarts.
    a = jnp.eye(40) * 2.0 + jnp.asarray(rng.standard_normal((40, 40))) * 0.2
    bb = jnp.asarray(rng.standard_normal(40))
    np.testing.assert_allclose(matfree.gmres(lambda v: a @ v, bb, m=10, restarts=4),
                               np.linalg.solve(np.asarray(a), np.asarray(bb)), rtol=1e-8)
    # Newton–Krylov on the linear map s ← d·s + (1 − d)·g: one Newton step reaches s* = g.
    g = jnp.asarray(rng.standard_normal(150))
    calls.clear()
    F = lambda s, g: mv(s) + (1 - d) * g
    s = matfree.newton_krylov(F, jnp.zeros(150), g, 1e-13, m=20)
    np.testing.assert_allclose(s, g, rtol=1e-9)
    assert len(calls) <= 16, len(calls)  # the fixed count was 3·(3·21 + 2) + 10 = 205


def _qs_setup(opt, seed=0):
  fam = Quadratic(dim=DIM, cond=10.0)
  task = fam.sample(jax.random.PRNGKey(seed))
  params = {"theta": jax.random.normal(jax.random.PRNGKey(seed + 1), (DIM,), jnp.float64)}
  phi = opt.init_phi(jax.random.PRNGKey(2))
  phi = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(
      jnp.result_type(x), jnp.floating) else x, phi)
  state = opt.init(phi, params)
  ctx = make_context(5, 100, 0.5)
  return fam, task, params, phi, state, ctx, qs.StateMap(opt, state, params)


@pytest.mark.parametrize("opt", [Adam(learning_rate=0.01, b1=0.8, b2=0.95), MLPLOpt()],
                         ids=["adam", "mlp_lopt"])
def test_newton_krylov_and_implicit_tangent_match_dense(opt):
  """Newton–Krylov, Arnoldi and the implicit tangents (from 0, and from ``krylov_start``: here
  the division by the diagonal of these elementwise state maps) against the dense solver."""
  with jax.enable_x64(True):
    fam, task, params, phi, state, ctx, sm = _qs_setup(opt)
    g = ravel_pytree(jax.grad(fam.train_loss_full)(params, task))[0]
    dense = jax.jit(lambda g: qs.solve_point(sm, state, g, params, phi, ctx))(g)
    s0, others = sm.split(state)
    shift = qs._reg(g.dtype)
    dg = jax.random.normal(jax.random.PRNGKey(3), g.shape, g.dtype)
    start = jax.random.normal(jax.random.PRNGKey(0), s0.shape, s0.dtype)

    @jax.jit
    def matrix_free(g):  # one compiled program (eager fori_loops are slow)
      args = (g, params, phi, ctx, others)
      s_mf = matfree.newton_krylov(sm.F, s0, args, shift, m=16)
      _, jf = jax.linearize(lambda x: sm.F(x, args), s_mf)
      h, _ = matfree.arnoldi(jf, start, 16)
      f_mf = lambda gg: matfree.implicit_fixed_point(sm.F, s_mf, (gg,) + args[1:], shift, 16)
      # The same tangent with every solve started from one GMRES polynomial of the operator.
      poly = matfree.fixed_point_polynomial(sm.F, s_mf, args, shift, start, 16)
      f_pl = lambda gg: matfree.implicit_fixed_point(sm.F, s_mf, (gg,) + args[1:], shift, 16,
                                                     poly)
      return (s_mf, sm.u(s_mf, args), h, jax.jvp(f_mf, (g,), (dg,))[1],
              jax.jvp(f_pl, (g,), (dg,))[1], poly[3])

    s_mf, u_mf, h, t_mf, t_pl, flag = matrix_free(g)
    assert bool(flag)
    np.testing.assert_allclose(s_mf, dense["s_star"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(u_mf, dense["u_bar"], rtol=1e-7, atol=1e-12)
    # Memory: Arnoldi magnitudes = the dense eigenvalue magnitudes (distinct, largest first).
    np.testing.assert_allclose(qs.distinct_magnitudes(matfree.ritz_values(h), 3),
                               qs.distinct_magnitudes(np.linalg.eigvals(dense["jac"]), 3),
                               atol=1e-8)
    # The implicit tangent of s*(g): one GMRES solve against the dense shifted inverse.
    args = (g, params, phi, ctx, others)
    f_dn = lambda gg: qs.implicit_fixed_point(sm.F, s0, (gg,) + args[1:],
                                              solution=(dense["s_star"], dense["jac"]))
    t_dn = jax.jit(lambda g: jax.jvp(f_dn, (g,), (dg,))[1])(g)
    np.testing.assert_allclose(t_mf, t_dn, rtol=1e-6, atol=1e-10 * float(jnp.max(jnp.abs(t_dn))))
    np.testing.assert_allclose(t_pl, t_dn, rtol=1e-6, atol=1e-10 * float(jnp.max(jnp.abs(t_dn))))


def test_gmres_polynomial_inverts_other_right_hand_sides():
  """The GMRES polynomial of one start vector inverts a map with few distinct eigenvalues on any
  vector (the momenta of the MLP optimizer: 6 decays up to 0.9999, κ ≈ 10⁴), so a solve started
  from it needs no Krylov step; on a general map it is only a start and GMRES still converges."""
  rng = np.random.default_rng(4)
  calls = []
  with jax.enable_x64(True):
    betas = np.array([0.1, 0.5, 0.9, 0.99, 0.999, 0.9999])
    mu = jnp.asarray(np.repeat(1 - betas, 300) + 1e-13)

    def mv(v):
      jax.debug.callback(lambda: calls.append(1))
      return mu * v

    poly = matfree.gmres_polynomial(mv, jnp.asarray(rng.standard_normal(1800)), m=12)
    for b in (rng.standard_normal(1800),                                  # generic
              np.tile(rng.standard_normal(300), 6) * np.repeat(1 - betas, 300),  # a tangent's form
              rng.standard_normal(1800) * np.repeat(betas ** 3, 300)):           # skewed weights
      b = jnp.asarray(b)
      x = matfree.apply_polynomial(mv, poly, b)
      assert float(jnp.linalg.norm(mu * x - b) / jnp.linalg.norm(b)) < 1e-10
      calls.clear()
      np.testing.assert_allclose(matfree.gmres(mv, b, m=12, x0=x), b / mu, rtol=1e-7)
      assert len(calls) == 1  # the residual check only
    a = jnp.eye(40) * 2.0 + jnp.asarray(rng.standard_normal((40, 40))) * 0.2
    pa = matfree.gmres_polynomial(lambda v: a @ v, jnp.asarray(rng.standard_normal(40)), m=6)
    bb = jnp.asarray(rng.standard_normal(40))
    x0 = matfree.apply_polynomial(lambda v: a @ v, pa, bb)
    np.testing.assert_allclose(matfree.gmres(lambda v: a @ v, bb, m=10, restarts=4, x0=x0),
                               np.linalg.solve(np.asarray(a), np.asarray(bb)), rtol=1e-8)


def test_krylov_start_divides_by_a_diagonal_and_applies_the_polynomial_otherwise():
  """``is_diagonal`` flags the shifted state map of six decays up to 0.9999 (diagonal, its 1 − β
  rounded differently in A v and A 1) and no coupled map, even one with off-diagonal entries of
  1e-6; ``krylov_start`` is then b ⊘ (A 1) from one matvec under ``jit`` (its other branch does
  not run), and p(A) b otherwise (also the recurrent optimizer's coupled hidden-state map)."""
  rng = np.random.default_rng(5)
  calls = []
  with jax.enable_x64(True):
    betas = jnp.asarray(np.repeat([0.1, 0.5, 0.9, 0.99, 0.999, 0.9999], 300))

    def mv(v):
      jax.debug.callback(lambda: calls.append(1))
      return v - betas * v + 1e-6 * v

    b0 = jnp.asarray(rng.standard_normal(1800))
    poly = jax.jit(lambda b: matfree.gmres_polynomial(mv, b, m=12))(b0)
    assert bool(poly[3])
    b = jnp.asarray(rng.standard_normal(1800))
    calls.clear()
    x = jax.jit(lambda b, p: matfree.krylov_start(mv, p, b))(b, poly)
    jax.effects_barrier()
    assert len(calls) == 1
    np.testing.assert_allclose(x, b / (1 - betas + 1e-6), rtol=1e-11)
    for eps in (0.2, 1e-6):
      a = jnp.diag(jnp.asarray(rng.uniform(0.5, 2.0, 40))) + eps * jnp.asarray(
          rng.standard_normal((40, 40)))
      pa = matfree.gmres_polynomial(lambda v: a @ v, jnp.asarray(rng.standard_normal(40)), m=6)
      assert not bool(pa[3])
      bb = jnp.asarray(rng.standard_normal(40))
      np.testing.assert_allclose(matfree.krylov_start(lambda v: a @ v, pa, bb),
                                 matfree.apply_polynomial(lambda v: a @ v, pa, bb), rtol=1e-12)
    fam, task, params, phi, state, ctx, sm = _qs_setup(RNNLOpt())
    g = ravel_pytree(jax.grad(fam.train_loss_full)(params, task))[0]
    s0, others = sm.split(state)
    op = matfree._shifted(sm.F, s0, (g, params, phi, ctx, others), qs._reg(g.dtype))
    assert not bool(matfree.is_diagonal(op, jnp.asarray(rng.standard_normal(s0.shape[0]))))


def test_block_metric_probes_match_dense():
  rng = np.random.default_rng(3)
  n, sizes = 12, (5, 7)
  with jax.enable_x64(True):
    j = jnp.asarray(rng.standard_normal((n, n)))
    own = jnp.asarray(rng.uniform(0.5, 2.0, n))
    basis = matfree.leaf_basis(sizes, own)
    c_ex, r_ex = matfree.block_metric_exact(j, basis)
    lin = lambda v: j @ v
    # Probes √n·e_k make the Hutchinson averages exact traces.
    c_k, r_k = jax.jit(matfree.block_metric_products, static_argnums=0)(
        lin, jnp.sqrt(n) * jnp.eye(n), basis)
    np.testing.assert_allclose(c_k.mean(0), c_ex, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r_k.mean(0), r_ex, rtol=1e-10, atol=1e-10)
    # A J that diag(d) symmetrises, d in the family: the fit recovers d and NCI_M = 0.
    d_true = basis.T @ jnp.asarray([1.0, 3.0, 0.5, 0.0])
    s = jnp.asarray(rng.standard_normal((n, n)))
    js = (s + s.T) / d_true[:, None]      # diag(d) J = S + Sᵀ
    basis = matfree.leaf_basis(sizes, own)
    m, nci_min = matfree.fit_block_metric(*matfree.block_metric_exact(js, basis), basis)
    assert float(nci.nci_exact(js, m)[0]) < 1e-6 and float(nci_min) < 1e-6
    f = jnp.asarray(rng.standard_normal((4000, n)))
    m_p, _ = matfree.fit_block_metric(*[x.mean(0) for x in matfree.block_metric_products(
        lambda v: js @ v, f, basis)], basis)
    np.testing.assert_allclose(m_p, m, rtol=0.1)
    assert float(nci.nci_exact(js, m_p)[0]) < 0.05


def test_jackknife_se_matches_spread_over_probe_draws():
  rng = np.random.default_rng(4)
  n, k, reps = 10, 16, 300
  with jax.enable_x64(True):
    j = jnp.asarray(rng.standard_normal((n, n)))
    v = jnp.asarray(rng.standard_normal((reps, k, n)))
    w = jnp.asarray(rng.standard_normal((reps, k, n)))

    def one(v, w):
      p = nci.Probes(v, w, v @ j.T, w @ j.T, jnp.zeros(n), jnp.zeros(n))
      s, t = nci.st_from_probes(p)
      return nci.nci_from_probes(p)[0], matfree.jackknife_nci(s, t)

    est, se = jax.vmap(one)(v, w)
  sd = float(np.std(np.asarray(est), ddof=1))
  assert 0.7 < float(np.median(se)) / sd < 1.4
  total, point = matfree.probe_se_of_mean(np.asarray(se).reshape(30, 10))
  np.testing.assert_allclose(total, np.sqrt(np.sum(np.asarray(se) ** 2)) / 300, rtol=1e-9)


@pytest.mark.slow  # four compiled point programs (dense / matrix-free, with and without ū)
def test_suite_matrix_free_rows_agree_with_dense():
  """dense_max = qs_max_state = 0 forces every estimator matrix-free on a tiny problem; the rows
  agree with the dense run within the probe standard errors (NCI) or to round-off (Krylov)."""
  fam = Quadratic(dim=4, cond=5.0, init_scale=1.0)
  splits = {"heldout": Split("heldout", fam, 24)}
  base = dict(suite.DEFAULTS, num_tasks=4, num_steps=12, num_points=2, n_boot=20, num_perms=0,
              controls=(), endpoint_steps=50, spd_max=0, num_probes=256, num_fit_probes=256)
  opt = Adam(learning_rate=0.05, b1=0.8, b2=0.95)
  phi = opt.init_phi(None)
  run = lambda **kw: {(r["analysis"], r["metric"]): r for r in suite.run_analyses(
      opt, phi, "adam", splits, ml_collections.ConfigDict(dict(base, **kw)), 0,
      stages=("nci", "quasi_static"))}
  dense, mf = run(), run(dense_max=0, qs_max_state=0)
  assert mf[("quasi_static", "eig_1")]["estimator"].startswith("Arnoldi")
  for key in (("quasi_static", "eig_1"), ("quasi_static", "eig_2"),
              ("quasi_static", "effective_step")):
    np.testing.assert_allclose(mf[key]["value"], dense[key]["value"], rtol=1e-6)
  assert mf[("quasi_static", "frac_conserved_dims")]["undefined"]
  for key in (("nci", "nci"), ("nci", "qs:nci")):
    assert "probe_se" in mf[key] and "probe_se" not in dense[key]
    assert abs(mf[key]["value"] - dense[key]["value"]) < 5 * mf[key]["probe_se"] + 1e-6, key
  # Dense u, matrix-free ū (n <= dense_max, state > qs_max_state): u stays exact, ū is probed
  # (each of its tangents is a GMRES solve, so n of them would cost n solves per point).
  mixed = run(qs_max_state=0)
  assert "probe_se" not in mixed[("nci", "nci")]
  np.testing.assert_allclose(mixed[("nci", "nci")]["value"], dense[("nci", "nci")]["value"],
                             rtol=1e-9)
  q = mixed[("nci", "qs:nci")]
  assert "probe_se" in q and q["estimator"].startswith("probes")
  assert abs(q["value"] - dense[("nci", "qs:nci")]["value"]) < 5 * q["probe_se"] + 1e-6
  assert "matrix-free" in mixed[("nci_metric", "qs:nci:fitted_diag")]["undefined"]
  # The probe-fitted metric is near the exact fit's (Adam: the own-metric block symmetrises J, so
  # 0); fit noise only raises it (probe_se covers the evaluation, not the fit).
  key = ("nci_metric", "nci:fitted_block")
  assert dense[key]["value"] < 1e-8 and mf[key]["value"] < 0.05
