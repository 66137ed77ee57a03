"""Known answer for inner–outer alignment: GD in an overfitting regime."""
import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from mesajax.tasks.views import FullBatch
from mesajax.analysis import alignment, fields
from mesajax.optimizers.baselines import SGD
from mesajax.rollout import run_trajectory
from mesajax.tasks.regression import LinearRegression


def _gd_alignment(fam, steps=300, lr=0.3, seed=0):
  # In float64: once GD has fitted the training rows (dim > n_train), the late updates are tiny and
  # in float32 the late-phase ratio Σ⟨u, ∇L_outer⟩ / Σ⟨u, ∇L_train⟩ divides round-off by round-off
  # (its sign then depends on the jax version and the device).
  with jax.enable_x64(True):
    return _gd_alignment64(fam, steps, lr, seed)


def _gd_alignment64(fam, steps, lr, seed):
  task = fam.sample(jax.random.PRNGKey(seed))
  opt = SGD(learning_rate=lr)
  states, _ = run_trajectory(opt, opt.init_phi(None), FullBatch(fam), task,
                             jax.random.PRNGKey(seed + 1), steps)
  flat = lambda p: ravel_pytree(p)[0]
  th = np.asarray(jax.vmap(flat)(states.params))
  g_tr = np.asarray(jax.vmap(lambda p: flat(jax.grad(fam.train_loss_full)(p, task)))(states.params))
  grad_out = lambda p: flat(jax.grad(fam.outer_loss_full)(p, task))
  g_out = np.asarray(jax.vmap(grad_out)(states.params))
  outer = np.asarray(jax.vmap(lambda p: fam.outer_loss_full(p, task))(states.params))
  train = np.asarray(jax.vmap(lambda p: fam.train_loss_full(p, task))(states.params))
  u = -lr * g_tr[:-1]  # GD's update, exactly (differences of θ lose precision near convergence)
  np.testing.assert_allclose(u, th[1:] - th[:-1], atol=1e-5)
  # The fitted objective of plain GD is the training loss (test_analysis_objective_fit).
  return alignment.alignment(u, g_tr[:-1], g_out[:-1], outer, train), outer


def test_overfitting_gd_turns_against_the_outer_loss():
  fam = LinearRegression(dim=40, n_train=10, n_val=500, noise=1.0)
  out, outer = _gd_alignment(fam, steps=400, lr=0.05)
  np.testing.assert_allclose(out["cos_u_neg_train_grad"], 1.0, atol=1e-5)
  assert outer[1] < outer[0]                  # early steps help both losses
  assert out["descent_ratio_late"] < 0        # late steps climb the outer loss
  assert np.isfinite(out["divergence_step"]) and out["diverged"] == 1.0
  t = int(out["divergence_step"])
  assert t == int(np.argmin(outer)) and 0 < t < len(outer) - 1
  assert 0 < out["frac_outer_descent"] < 1


def test_well_posed_regression_does_not_diverge():
  fam = LinearRegression(dim=5, n_train=500, n_val=500, noise=0.0)
  out, _ = _gd_alignment(fam, steps=40, lr=0.1)
  assert np.isnan(out["divergence_step"]) and out["diverged"] == 0.0
  assert out["descent_ratio_late"] > 0.5
  assert out["cos_u_neg_outer_grad"] > 0.9


def test_divergence_needs_the_fitted_objective_to_fall():
  u = np.ones((4, 2))
  g = -np.ones((4, 2))
  outer = np.array([3.0, 1.0, 2.0, 3.0, 4.0])
  falling = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
  assert alignment.alignment(u, g, g, outer, falling)["divergence_step"] == 1.0
  assert np.isnan(alignment.alignment(u, g, g, outer, falling[::-1])["divergence_step"])
