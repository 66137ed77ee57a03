"""Statistics helpers of the analyses (independent streams, nulls, hierarchical bootstrap), the
tie tolerance of alignment and the control update rules."""
import jax.numpy as jnp
import numpy as np

from mesajax.analysis import alignment
from mesajax.eval import stats
from mesajax.optimizers.base import make_context
from mesajax.optimizers.controls import NoiseUpdate, PrecondSGD, RandomField, spd_preconditioner


def test_stream_seeds_differ_by_name_and_are_deterministic():
  a = stats.stream_seed(0, "opt", "heldout", "nci", "nci")
  assert a == stats.stream_seed(0, "opt", "heldout", "nci", "nci")
  assert a != stats.stream_seed(0, "opt", "heldout", "nci", "ratio")


def test_sign_flip_and_null_pvalues():
  rng = np.random.default_rng(0)
  assert stats.sign_flip_pvalue(rng.standard_normal(40)) > 0.05
  assert stats.sign_flip_pvalue(rng.standard_normal(40) + 2.0) < 0.01
  assert stats.null_pvalue(5.0, rng.standard_normal(99)) == 0.01
  assert np.isnan(stats.null_pvalue(1.0, []))


def test_hierarchical_bootstrap_is_wider_with_seed_effects():
  rng = np.random.default_rng(1)
  seeds = np.repeat(np.arange(4), 20)
  x = rng.standard_normal(80) * 0.1 + np.array([0.0, 1.0, -1.0, 0.5])[seeds]
  v, lo, hi = stats.hierarchical_bootstrap_ci(x, seeds, n_boot=500, seed=0)
  _, lo1, hi1 = stats.bootstrap_ci(x, n_boot=500, seed=0)
  assert lo <= v <= hi and (hi - lo) > 2 * (hi1 - lo1)
  assert stats.finite_bootstrap_ci([np.nan, np.nan]) is None


def test_frac_outer_descent_counts_ties_as_descent():
  u = np.ones((4, 2))
  g = -np.ones((4, 2))
  outer = np.array([3.0, 2.0, 2.0, 2.0 * (1 + 1e-9), 1.0])  # two ties (one with round-off)
  out = alignment.alignment(u, g, g, outer, outer)
  assert out["frac_outer_descent"] == 1.0
  outer[3] = 2.5
  assert alignment.alignment(u, g, g, outer, outer)["frac_outer_descent"] == 0.75


def test_control_rules():
  params = {"w": jnp.arange(5.0), "b": jnp.zeros([])}
  grads = {"w": jnp.ones(5), "b": jnp.ones([])}
  ctx = make_context(3, 10, 1.0)
  noise = NoiseUpdate(learning_rate=0.1)
  u1, _ = noise.update(noise.init_phi(), noise.init(None, params), grads, params, ctx)
  u2, _ = noise.update(noise.init_phi(), noise.init(None, params), grads,
                       {"w": params["w"] + 1.0, "b": params["b"]}, ctx)
  np.testing.assert_array_equal(u1["w"], u2["w"])         # independent of θ
  p = spd_preconditioner(6, 0, 10.0)
  np.testing.assert_allclose(p, p.T)
  np.testing.assert_allclose(np.linalg.cond(p), 10.0, rtol=1e-8)
  pre = PrecondSGD(learning_rate=0.5, cond=10.0)
  u, _ = pre.update(pre.init_phi(), pre.init(None, params), grads, params, ctx)
  flat = np.asarray(jnp.concatenate([u["b"][None], u["w"]]))  # ravel_pytree order: b, w
  np.testing.assert_allclose(flat, -0.5 * pre.preconditioner(6) @ np.ones(6), rtol=1e-5)
  rf = RandomField(learning_rate=0.1)
  u, _ = rf.update(rf.init_phi(), rf.init(None, params), grads, params, ctx)
  assert np.all(np.abs(np.asarray(u["w"])) <= 0.1 + 1e-7)
