"""Known answers for the quasi-static reduction: memory eigenvalues and the effective update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.analysis import fields, nci
from mesajax.analysis import quasi_static as qs
from mesajax.optimizers.base import make_context
from mesajax.optimizers.baselines import SGD, SGDM, Adam, RMSProp
from mesajax.tasks.quadratic import Quadratic

DIM = 6


def _setup(opt, seed=0):
  fam = Quadratic(dim=DIM, cond=10.0)
  task = fam.sample(jax.random.PRNGKey(seed))
  params = {"theta": jax.random.normal(jax.random.PRNGKey(seed + 1), (DIM,))}
  phi = opt.init_phi(None)
  state = opt.init(phi, params)
  g = ravel_pytree(jax.grad(fam.train_loss_full)(params, task))[0]
  ctx = make_context(5, 100, 0.0)
  sm = qs.StateMap(opt, state, params)
  return fam, task, params, phi, state, g, ctx, sm


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_momentum_eigenvalue_and_effective_step(beta):
  lr = 0.05
  fam, task, params, phi, state, g, ctx, sm = _setup(SGDM(learning_rate=lr, momentum=beta))
  out = qs.solve_point(sm, state, g, params, phi, ctx)
  mags = qs.distinct_magnitudes(np.linalg.eigvals(np.asarray(out["jac"])), 3)
  np.testing.assert_allclose(mags[0], beta, atol=1e-6)
  assert np.all(np.isnan(mags[1:]))
  np.testing.assert_allclose(out["u_bar"], -lr / (1 - beta) * g, rtol=1e-4, atol=1e-7)
  assert float(out["residual"]) < 1e-5
  # ū is −η/(1−β)∇f: its Jacobian through the implicit fixed point is −η/(1−β) A, symmetric.
  field = fields.update_field(SGDM(learning_rate=lr, momentum=beta), phi, fam, task, state, ctx,
                              params, state_fn=qs.effective_state_fn(sm, state, phi))
  jac = jax.jacfwd(lambda t: field(t)[0])(params["theta"])
  np.testing.assert_allclose(jac, -lr / (1 - beta) * task["A"], rtol=1e-3, atol=1e-5)
  _, _, p = nci.probe_products(field, params["theta"],
                               *nci.gaussian_probes(jax.random.PRNGKey(0), 16, DIM))
  assert nci.nci_from_probes(p)[0] < 1e-4


def test_adam_eigenvalues_are_its_decays():
  fam, task, params, phi, state, g, ctx, sm = _setup(Adam(learning_rate=0.01, b1=0.8, b2=0.95))
  out = qs.solve_point(sm, state, g, params, phi, ctx)
  mags = qs.distinct_magnitudes(np.linalg.eigvals(np.asarray(out["jac"])), 4)
  np.testing.assert_allclose(mags[:2], [0.95, 0.8], atol=1e-6)
  assert np.all(np.isnan(mags[2:]))
  assert sm.dim == 2 * DIM  # m and v; the int count is held at COUNT_VALUE, not iterated


def test_adam_effective_update_and_its_jacobian():
  """Bias corrections vanish at the held count: ū = −η g / (|g| + ε), whose Jacobian is
  −η ε/(|g|+ε)² A (checked through the implicit fixed point, with a large ε)."""
  lr, eps = 0.01, 0.5
  opt = Adam(learning_rate=lr, b1=0.9, b2=0.999, eps=eps)
  fam, task, params, phi, state, g, ctx, sm = _setup(opt, seed=3)
  out = qs.solve_point(sm, state, g, params, phi, ctx)
  np.testing.assert_allclose(out["u_bar"], -lr * g / (jnp.abs(g) + eps), rtol=1e-4)
  field = fields.update_field(opt, phi, fam, task, state, ctx, params,
                              state_fn=qs.effective_state_fn(sm, state, phi))
  jac = jax.jacfwd(lambda t: field(t)[0])(params["theta"])
  expect = -lr * (eps / (jnp.abs(g) + eps) ** 2)[:, None] * task["A"]
  np.testing.assert_allclose(jac, expect, rtol=2e-3, atol=1e-6)


def test_rmsprop_implicit_jacobian_matches_finite_differences():
  opt = RMSProp(learning_rate=0.01, decay=0.9, eps=0.1)
  fam, task, params, phi, state, g, ctx, sm = _setup(opt, seed=5)
  field = fields.update_field(opt, phi, fam, task, state, ctx, params,
                              state_fn=qs.effective_state_fn(sm, state, phi))
  theta = params["theta"]
  jac = jax.jacfwd(lambda t: field(t)[0])(theta)
  h = 1e-2
  fd = jnp.stack([(field(theta + h * e)[0] - field(theta - h * e)[0]) / (2 * h)
                  for e in jnp.eye(DIM)], axis=1)
  np.testing.assert_allclose(jac, fd, rtol=2e-2, atol=2e-5)


def test_stateless_optimizer_has_empty_state():
  *_, sm = _setup(SGD(learning_rate=0.1))
  assert sm.dim == 0


def test_distinct_magnitudes_clusters_copies():
  eigs = np.array([0.9, 0.9 + 1e-7, 0.999, 0.9999, 0.5, -0.5, 0.0])
  np.testing.assert_allclose(qs.distinct_magnitudes(eigs, 4), [0.9999, 0.999, 0.9, 0.5], rtol=1e-6)
  out = qs.distinct_magnitudes(np.array([0.3]), 2)
  assert out[0] == 0.3 and np.isnan(out[1])


def test_state_map_is_hashable_structurally():
  opt = SGDM(learning_rate=0.1, momentum=0.9)
  p = {"theta": jnp.ones(3)}
  a = qs.StateMap(opt, opt.init(None, p), p)
  b = qs.StateMap(opt, opt.init(None, {"theta": jnp.zeros(3)}), {"theta": jnp.zeros(3)})
  assert a == b and hash(a) == hash(b)


def test_inverse_both_paths_match_numpy():
  for d in (7, qs.LAPACK_MIN + 3):
    a = np.asarray(jax.random.normal(jax.random.PRNGKey(d), (d, d))) + 0.5 * np.eye(d)
    np.testing.assert_allclose(qs._inverse(jnp.asarray(a)) @ a, np.eye(d), atol=5e-4)
  # The Gauss–Jordan path vmaps (no LAPACK), including pivoting on a zero diagonal entry.
  perm = jnp.array([[0.0, 2.0], [1.0, 0.0]])
  batch = jnp.stack([perm, 2.0 * perm])
  np.testing.assert_allclose(jax.vmap(qs._inverse)(batch) @ batch, np.stack([np.eye(2)] * 2),
                             atol=1e-6)
  assert qs.batchable(qs.LAPACK_MIN - 1) and not qs.batchable(qs.LAPACK_MIN)
