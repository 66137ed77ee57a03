"""Known answers for NCI, the transverse index and metric-restricted NCI (docs/analyses.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.analysis import fields, nci
from mesajax.optimizers.base import make_context
from mesajax.optimizers.baselines import SGD, RMSProp
from mesajax.tasks.quadratic import Quadratic

DIM = 8


def _quadratic(seed=0, dim=DIM, cond=10.0):
  fam = Quadratic(dim=dim, cond=cond, rotate=True)
  return fam, fam.sample(jax.random.PRNGKey(seed))


def _probes(dim, k, seed=1):
  return nci.gaussian_probes(jax.random.PRNGKey(seed), k, dim)


def _linear(mat):
  return lambda th: (mat @ th, th)


def _opt_field_metrics(opt, seed=0, k=32, theta_scale=1.0):
  fam, task = _quadratic(seed)
  params = {"theta": theta_scale * jax.random.normal(jax.random.PRNGKey(seed + 7), (DIM,))}
  phi = opt.init_phi(None)
  state = opt.init(phi, params)
  ctx = make_context(3, 100, 0.0)
  field = fields.update_field(opt, phi, fam, task, state, ctx, params)
  theta = ravel_pytree(params)[0]
  u, g, p = nci.probe_products(field, theta, *_probes(DIM, k))
  jac = jax.jacfwd(lambda t: field(t)[0])(theta)
  u_of_g = fields.update_of_grad(opt, phi, state, params, ctx)
  z = jax.random.rademacher(jax.random.PRNGKey(3), (4, DIM), jnp.float32)
  m_own, _ = nci.own_diag_metric(fields.diag_sensitivity(u_of_g, g, z))
  return {"nci": nci.nci_from_probes(p)[0], "transverse": nci.transverse_from_probes(p)[0],
          "own": nci.nci_from_probes(p, m_own)[0], "jac": jac, "u": u, "g": g, "probes": p}


def test_estimator_matches_dense_jacobian():
  j = jax.random.normal(jax.random.PRNGKey(0), (DIM, DIM))
  exact, exact_ratio = nci.nci_exact(j)
  _, _, p = nci.probe_products(_linear(j), jnp.ones(DIM), *_probes(DIM, 8192))
  est, est_ratio = nci.nci_from_probes(p)
  assert 0.3 < float(exact) < 0.95
  np.testing.assert_allclose(est, exact, rtol=0.03)
  np.testing.assert_allclose(est_ratio, exact_ratio, rtol=0.06)


def test_exact_decomposition_identity():
  j = jax.random.normal(jax.random.PRNGKey(1), (5, 5))
  a, s = 0.5 * (j - j.T), 0.5 * (j + j.T)
  n, r = nci.nci_exact(j)
  np.testing.assert_allclose(n, jnp.linalg.norm(a) / jnp.linalg.norm(j), rtol=1e-5)
  np.testing.assert_allclose(r, jnp.linalg.norm(a) / jnp.linalg.norm(s), rtol=1e-5)


def test_rotation_field_is_one():
  a = jax.random.normal(jax.random.PRNGKey(2), (DIM, DIM))
  rot = a - a.T
  _, _, p = nci.probe_products(_linear(rot), jnp.ones(DIM), *_probes(DIM, 16))
  n, ratio = nci.nci_from_probes(p)
  np.testing.assert_allclose(n, 1.0, atol=1e-6)
  assert ratio > 1e4


def test_gradient_descent_is_conservative():
  m = _opt_field_metrics(SGD(learning_rate=0.1))
  assert m["nci"] < 1e-4 and m["transverse"] < 1e-4 and m["own"] < 1e-4
  np.testing.assert_allclose(fields.cosine(m["u"], -m["g"]), 1.0, atol=1e-6)


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
def test_weight_decay_is_conservative(lam):
  m = _opt_field_metrics(SGD(learning_rate=0.1, weight_decay=lam))
  assert m["nci"] < 1e-4
  # J = −η(A + λI): check against the closed form too.
  fam, task = _quadratic(0)
  np.testing.assert_allclose(m["jac"], -0.1 * (task["A"] + lam * jnp.eye(DIM)), atol=1e-5)


def test_clipped_gd_nci_positive_transverse_zero():
  # ‖g‖ of these points is ~1-3, so a clip at 0.1 is active.
  m = _opt_field_metrics(SGD(learning_rate=0.1, clip_norm=0.1), theta_scale=3.0)
  assert float(jnp.linalg.norm(m["g"])) > 0.5
  assert m["nci"] > 0.05
  assert m["transverse"] < 1e-3


def test_rmsprop_on_rotated_quadratic():
  m = _opt_field_metrics(RMSProp(learning_rate=0.01, decay=0.9, eps=0.1))
  assert m["nci"] > 0.05       # non-conservative in the Euclidean metric
  assert m["transverse"] > 0.02
  assert m["own"] < 1e-4        # symmetric in its own diagonal metric


def test_frozen_v_adam_field_symmetrised_by_its_metric():
  """u = −η g / (√v + ε) with v frozen: NCI > 0 with M = I, ≈ 0 with M = diag(√v + ε)."""
  fam, task = _quadratic(3)
  v = jnp.exp(2.0 * jax.random.normal(jax.random.PRNGKey(4), (DIM,)))
  eps, lr = 1e-3, 0.01
  precond = 1.0 / (jnp.sqrt(v) + eps)

  def field(th):
    g = task["A"] @ (th - task["theta_star"])
    return -lr * precond * g, g

  theta = jnp.zeros(DIM)
  _, g, p = nci.probe_products(field, theta, *_probes(DIM, 64))
  assert nci.nci_from_probes(p)[0] > 0.1
  assert nci.nci_from_probes(p, jnp.sqrt(v) + eps)[0] < 1e-4
  jac = jax.jacfwd(lambda t: field(t)[0])(theta)
  m_fit, _ = nci.fit_diag_metric(jac)
  assert nci.nci_from_probes(p, m_fit)[0] < 1e-3
  m_true = (jnp.sqrt(v) + eps) / jnp.mean(jnp.sqrt(v) + eps)
  np.testing.assert_allclose(m_fit, m_true, rtol=1e-2)
  np.testing.assert_allclose(nci.metric_cond(m_fit), nci.metric_cond(m_true), rtol=1e-2)
  # The optimizer's own sensitivity: ∂u/∂g = −η diag(precond), so M ∝ √v + ε exactly.
  z = jax.random.rademacher(jax.random.PRNGKey(5), (2, DIM), jnp.float32)
  d = fields.diag_sensitivity(lambda gg: -lr * precond * gg, g, z)
  m_own, neg = nci.own_diag_metric(d)
  np.testing.assert_allclose(m_own, m_true, rtol=1e-4)
  assert float(neg) == 0.0


def test_fit_diag_metric_recovers_diagonal_of_dh():
  h = jax.random.normal(jax.random.PRNGKey(6), (6, 6))
  h = h @ h.T + jnp.eye(6)
  d = jnp.exp(jax.random.normal(jax.random.PRNGKey(7), (6,)))
  m, nci_min = nci.fit_diag_metric(-d[:, None] * h)
  np.testing.assert_allclose(m, (1 / d) / jnp.mean(1 / d), rtol=1e-3)
  assert nci_min < 2e-3  # float32: sqrt of a round-off-level eigenvalue gap
  assert nci.nci_exact(-(m * d)[:, None] * h)[0] < 1e-5


def test_diag_sensitivity_exact_for_per_coordinate_rule():
  p = jnp.arange(1.0, DIM + 1)
  z = jax.random.rademacher(jax.random.PRNGKey(8), (1, DIM), jnp.float32)
  d = fields.diag_sensitivity(lambda g: -p * jnp.tanh(g), jnp.zeros(DIM), z)
  np.testing.assert_allclose(d, -p, rtol=1e-6)
