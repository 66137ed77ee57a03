"""Known answers for the implicit-objective fit and endpoint inverse optimisation."""
import functools

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.tasks.views import FullBatch
from mesajax.analysis import dictionary, endpoint_fit, fields, objective_fit
from mesajax.optimizers.baselines import SGD
from mesajax.rollout import run_curve, run_trajectory
from mesajax.tasks.quadratic import Quadratic

FAM = Quadratic(dim=8, cond=10.0, init_scale=1.0)  # θ₀ ≠ 0, so l2 and l2_init differ
NAMES = dictionary.term_names(FAM)
N_TASKS = 4


@functools.lru_cache(maxsize=None)
def _runs(lr, lam, steps, end_steps, fam=FAM):
  """Full-batch GD(+weight decay) trajectories, dictionary gradients, and end points."""
  opt = SGD(learning_rate=lr, weight_decay=lam)
  phi = opt.init_phi(None)
  tasks = fam.sample_batch(jax.random.PRNGKey(0), N_TASKS)
  keys = jax.random.split(jax.random.PRNGKey(1), N_TASKS)
  fb = FullBatch(fam)

  def one(task, key):
    states, _ = run_trajectory(opt, phi, fb, task, key, steps)
    p0 = jax.tree.map(lambda x: x[0], states.params)
    _, g = jax.vmap(lambda p: dictionary.values_and_grads(fam, task, p, p0))(states.params)
    th = jax.vmap(lambda p: ravel_pytree(p)[0])(states.params)
    end = run_curve(opt, phi, fb, task, key, end_steps, every=end_steps)["final_state"].params
    _, g_end = dictionary.values_and_grads(fam, task, end, p0)
    return th, g, g_end

  th, g, g_end = jax.jit(jax.vmap(one))(tasks, keys)
  corr, norms = jax.vmap(objective_fit.gram)(g[:, :-1])
  include, excluded = objective_fit.alias_mask(np.mean(corr, 0), np.mean(norms, 0), NAMES)
  return th, g, g_end, include, excluded


def _fit(th, g, include):
  """The fit in float64 (as the suite runs it): GD's step is recovered to float64 precision."""
  u = np.asarray(th[:, 1:] - th[:, :-1], np.float64)
  with jax.enable_x64(True):
    fit = jax.jit(jax.vmap(objective_fit.fit_objective, in_axes=(0, 0, None)))
    return jax.tree.map(np.asarray, fit(u, np.asarray(g[:, :-1], np.float64), include))


def test_alias_mask_drops_identical_terms():
  *_, include, excluded = _runs(0.3, 0.0, 40, 40)
  # The quadratic's outer loss is its training loss: not identifiable, dropped.
  assert excluded == {"outer_loss": "aliased:train_loss"}
  assert include[NAMES.index("train_loss")] and include[NAMES.index("l2")]
  # With θ₀ = 0, ½‖θ − θ₀‖² is ½‖θ‖².
  names = ("a", "b", "c")
  c = np.array([[1.0, 1.0, 0.2], [1.0, 1.0, 0.2], [0.2, 0.2, 1.0]])
  inc, exc = objective_fit.alias_mask(c, np.ones(3), names)
  assert list(inc) == [True, False, True] and exc == {"b": "aliased:a"}
  inc, exc = objective_fit.alias_mask(np.eye(3), np.array([1.0, 0.0, 1.0]), names)
  assert exc == {"b": "vanishing"}


def test_gradient_descent_fit():
  th, g, _, include, _ = _runs(0.3, 0.0, 60, 60)
  fit = _fit(th, g, include)
  w = fit["w_norm"]
  np.testing.assert_allclose(w[:, NAMES.index("train_loss")], 1.0)
  others = [k for k in range(len(NAMES)) if include[k] and NAMES[k] != "train_loss"]
  assert np.max(np.abs(w[:, others])) < 5e-3
  assert np.all(fit["r2"] > 0.9999)
  # θ_{t+1} − θ_t is float32 (relative error ~1e-7); the float64 fit adds nothing on top (on
  # jax 0.12 a float32 fit accumulated to η = 0.30040).
  np.testing.assert_allclose(fit["eta"], 0.3, rtol=2e-5)
  np.testing.assert_allclose(fit["metric"], 1.0, atol=2e-3)
  assert np.all(fit["frac_eta_positive"] == 1.0)
  assert np.all(fit["gram_cond"] > 1.0)


def test_heldout_steps_r2_is_out_of_sample_and_pure_noise_gains_nothing():
  """A pure-noise update: in-sample the extra terms always "help"; on held-out steps they do not."""
  th, g, _, include, _ = _runs(0.3, 0.0, 60, 60)
  rng = np.random.default_rng(0)
  u = rng.standard_normal(np.asarray(th[:, 1:]).shape)
  rows = (np.arange(60) < 45).astype(np.float64)
  with jax.enable_x64(True):
    fit = jax.jit(jax.vmap(lambda a, b: objective_fit.fit_objective(a, b, include,
                                                                    fit_rows_T=rows)))
    out = jax.tree.map(np.asarray, fit(u, np.asarray(g[:, :-1], np.float64)))
  assert np.all(out["r2"] >= out["r2_train_only"])          # nested model, fitted rows
  gain_out = out["r2_heldout"] - out["r2_train_only_heldout"]
  # Out of sample the gain is noise around 0 (either sign), never the systematic in-sample gain.
  assert np.any(gain_out < 0) and abs(np.mean(gain_out)) < 0.1
  assert np.all(out["r2_heldout"] < 0.4)


def test_identifiable_mask_drops_collinear_terms_with_a_reason():
  names = ("train_loss", "a", "b")
  x = np.random.default_rng(0).standard_normal((3, 50))
  x[2] = x[1] + 0.01 * x[2]                       # b ≈ a: VIF ~ 1e4
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  c = x @ x.T
  inc, why = objective_fit.identifiable_mask(c, np.ones(3, bool), names, 0, vif_max=100.0)
  assert list(inc) == [True, True, False] and why["b"].startswith("not identifiable: VIF=")


@pytest.mark.parametrize("lam", [0.01, 0.1, 0.3])
def test_weight_decay_fit_and_endpoint(lam):
  th, g, g_end, include, _ = _runs(0.3, lam, 60, 1500)
  fit = _fit(th, g, include)
  np.testing.assert_allclose(fit["w_norm"][:, NAMES.index("l2")], lam, rtol=1e-3, atol=2e-5)
  assert np.all(fit["r2"] > 0.999)
  ep = endpoint_fit.endpoint_fit(g_end, NAMES, 0, np.asarray(g[:, 0, 0]), n_boot=100,
                                 prior_include=include)
  np.testing.assert_allclose(ep["w"][NAMES.index("l2")], lam, rtol=1e-2)
  k = NAMES.index("l2")
  assert ep["ci_low"][k] <= lam * 1.01 and ep["ci_high"][k] >= lam * 0.99
  assert ep["rel_residual"] < 1e-6


def test_endpoint_of_gd_is_train_loss_and_grad_norm_sq_is_invisible():
  th, g, g_end, include, _ = _runs(0.3, 0.0, 40, 1500)
  ep = endpoint_fit.endpoint_fit(g_end, NAMES, 0, np.asarray(g[:, 0, 0]), n_boot=50,
                                 prior_include=include)
  assert ep["excluded"]["grad_norm_sq"] == "vanishing"
  assert ep["excluded"]["dist_opt"] == "vanishing"  # ∇ ½‖θ − θ*‖² = 0 at θ*
  assert ep["w"][0] == 1.0
  assert abs(ep["w"][NAMES.index("l2")]) < 1e-4


def test_endpoint_solve_weights_closed_form():
  # Two terms with gradients a and b at one point: min ‖a + w b‖² gives w = −⟨a,b⟩/‖b‖².
  a, b = np.array([1.0, 2.0, 0.0]), np.array([0.5, -1.0, 3.0])
  g = np.stack([a, b])[None]
  w = endpoint_fit.solve_weights(np.einsum("ikn,iln->kl", g, g), np.array([True, True]))
  np.testing.assert_allclose(w[1], -(a @ b) / (b @ b), rtol=1e-8)


@pytest.mark.slow
def test_central_difference_velocity_sees_implicit_gradient_regularisation():
  """GD with step h follows the modified flow −∇(f + h/4‖∇f‖²) (Barrett & Dherin 2021): the
  central-difference velocity fit over {train_loss, grad_norm_sq} (M = I) gives
  w:grad_norm_sq ≈ h/2, with a higher-order bias that grows with h."""
  fam = Quadratic(dim=8, cond=4.0, init_scale=1.0, eig_max=1.0)
  inc = np.zeros(len(NAMES), bool)
  inc[[NAMES.index("train_loss"), NAMES.index("grad_norm_sq")]] = True
  fit = jax.jit(jax.vmap(lambda u, g: objective_fit.fit_objective(u, g, inc, fit_metric=False)))
  rel = []
  for h in (0.02, 0.05, 0.2):
    th, g, *_ = _runs(h, 0.0, 40, 40, fam)
    _, idx = objective_fit.displacements(th[0], "central")
    vel = jax.vmap(lambda t: objective_fit.displacements(t, "central")[0])(th)
    out = fit(vel, g[:, np.asarray(idx)])
    rel.append(np.asarray(out["w_norm"])[:, NAMES.index("grad_norm_sq")] / (h / 2))
    assert np.all(np.asarray(out["r2"]) > 0.9999)
  np.testing.assert_allclose(rel[0], 1.0, rtol=0.05)
  np.testing.assert_allclose(rel[1], 1.0, rtol=0.1)
  assert np.all(rel[2] > rel[1]) and np.all(rel[2] > 1.1)  # the bias at larger h


def _metric_data(seed=1, sig=1.0, t=24, n=40):
  """u_t = −η_t M (g0 + ½ g1)_t exactly, with a log-normal diagonal M (mean 1) and varying η_t."""
  rng = np.random.default_rng(seed)
  g0, g1 = rng.standard_normal((t, n)), rng.standard_normal((t, n))
  m = np.exp(sig * rng.standard_normal(n))
  m /= m.mean()
  eta = 0.1 * np.exp(0.5 * rng.standard_normal(t))
  return -eta[:, None] * m[None] * (g0 + 0.5 * g1), g0, g1, m


def test_levenberg_marquardt_polish_reaches_the_exact_fit_that_als_approaches():
  """ALS converges linearly where w and the metric trade off; the LM polish reaches the exact
  (w, M) to round-off. Without it the same 20 iterations leave an error this test detects."""
  u, g0, g1, m = _metric_data()
  g = np.stack([g0, g1], 1)
  with jax.enable_x64(True):
    fit = lambda ps: jax.jit(lambda a, b: objective_fit.fit_objective(
        a, b, np.array([True, True]), 0, 20, polish_steps=ps))(u, g)
    als, lm = fit(0), fit(20)
  assert abs(float(als["w_norm"][1]) - 0.5) > 1e-7        # ALS alone: not there after 20 steps
  assert abs(float(lm["w_norm"][1]) - 0.5) < 1e-10
  np.testing.assert_allclose(np.asarray(lm["metric"]), m, rtol=1e-9)
  assert 1.0 - float(lm["r2"]) < 1e-12
  assert float(lm["r2"]) >= float(als["r2"])


def test_full_fit_is_never_worse_in_sample_than_the_training_loss_alone():
  """Updates that follow the training loss through a metric spanning ~10⁴ plus much noise: the
  fit's objective (bilinear in (w, M) and η) has several local optima, and full fits started at
  (w = e_train, M = 1) and from the pooled direction ended below the training-loss-only fit in
  sample (by 0.037 in R² on one of these tasks, 0.013 on another). The full fit starts from the
  training-loss-only end point and keeps it as a candidate, so it cannot end below it."""
  t, n, k, b = 24, 64, 4, 8
  rows = (np.arange(t) < 18).astype(np.float64)
  with jax.enable_x64(True):
    fit = jax.jit(jax.vmap(lambda a, c: objective_fit.fit_objective(
        a, c, np.ones(k, bool), 0, 10, fit_rows_T=rows)))
    for seed in (17, 37):
      rng = np.random.default_rng(seed)
      g = rng.standard_normal((b, t, k, n)) * np.exp(2 * rng.standard_normal((b, 1, k, n)))
      m = np.exp(3 * rng.standard_normal((b, 1, n)))
      eta = np.exp(rng.standard_normal((b, t, 1)))
      u = -eta * m * g[:, :, 0] + 3 * rng.standard_normal((b, t, n)) * np.sqrt(m) * np.abs(
          g[:, :, 0]).mean()
      out = jax.tree.map(np.asarray, fit(u, g))
      assert np.all(out["r2"] >= out["r2_train_only"] - 1e-12), seed
      assert np.all(np.isfinite(out["r2_heldout"]))


def test_polish_converges_with_the_metric_floor_active():
  """Half of the true metric lies below the fit's floor (1e-3 max M): the constrained optimum has
  those M_n at the floor. The polish holds them there and fixes M's scale at its largest entry,
  so 30 steps reach the 1000-step fit. (Before, each trial pushed them through the floor, the clip
  undid it, and every step was rejected: w stayed 1e-6 to 1e-5 off.)"""
  rng = np.random.default_rng(1)
  t, n = 24, 40
  g0, g1 = rng.standard_normal((t, n)), rng.standard_normal((t, n))
  m = np.exp(rng.standard_normal(n))
  m[: n // 2] = 1e-6 * m.max()
  eta = 0.1 * np.exp(0.5 * rng.standard_normal(t))
  u = -eta[:, None] * (m / m.mean())[None] * (g0 + 0.5 * g1)
  with jax.enable_x64(True):
    fit = lambda ps: jax.jit(lambda a, b: objective_fit.fit_objective(
        a, b, np.array([True, True]), 0, 10, polish_steps=ps))(u, np.stack([g0, g1], 1))
    als, lm, ref = fit(0), fit(30), fit(1000)
  fitted_m = np.asarray(lm["metric"])
  assert np.mean(fitted_m <= 1.0001e-3 * fitted_m.max()) == 0.5
  assert abs(float(als["w_norm"][1]) - float(ref["w_norm"][1])) > 1e-4   # ALS alone: not there
  assert abs(float(lm["w_norm"][1]) - float(ref["w_norm"][1])) < 1e-10
  assert abs(float(lm["r2"]) - float(ref["r2"])) < 1e-13


def test_profiled_vif_flags_a_term_the_metric_can_absorb():
  """∇φ = D ∇L_train with a fixed diagonal D is a per-coordinate rescaling of the training
  gradient: with M free its weight is not identifiable (profiled VIF = ∞, or ~1e16 in float64
  round-off), although the correlation-form VIF sees two distinct gradients (≈ 2). An independent
  term stays identifiable."""
  u, g0, g1, _ = _metric_data(seed=2)
  d = np.exp(np.random.default_rng(3).standard_normal(g0.shape[1]))
  with jax.enable_x64(True):
    confounded = np.stack([g0, d[None] * g0], 1)
    out = objective_fit.fit_objective(u, confounded, np.array([True, True]), 0, 20)
    plain = objective_fit.vifs(objective_fit.gram(confounded)[0], np.array([True, True]))
    # ∞ in exact arithmetic; float64 round-off leaves S singular to ~1e-16 (jax 0.12: 9e15)
    assert float(out["vif_profiled"][1]) > 1e12 and plain[1] < 5
    clean = np.stack([g0, g1], 1)
    out = objective_fit.fit_objective(u, clean, np.array([True, True]), 0, 20)
    assert np.isnan(float(out["vif_profiled"][0]))          # the fixed training-loss weight
    assert 1.0 <= float(out["vif_profiled"][1]) < 10


def _suite_fit(us, gs, names, polish_steps):
  """The suite's fit with its profiled-VIF drops (``stages._profiled_identifiable``, vif_max 100)
  on per-task lists of updates and dictionary gradients, w and M fitted on the first 18 steps."""
  from mesajax.analysis import stages
  rows = (np.arange(us[0].shape[0]) < 18).astype(np.float64)
  with jax.enable_x64(True):
    return stages._profiled_identifiable(
        stages._fit_fn(20, 0, polish_steps), np.stack(us), np.stack(gs),
        np.ones(len(names), bool), rows, names, 0, 100.0)


def test_fit_drops_terms_the_metric_can_absorb_with_a_reason():
  """The suite's fit (``stages._profiled_identifiable``) refits without a term whose median
  profiled VIF exceeds vif_max, and says why; an identifiable term is kept. Updates descend
  L_train in a metric M, so the fitted w_clean is 0, and there M can absorb D ∇L_train exactly."""
  b = 3
  us, gs = [], []
  for i in range(b):
    u, g0, g1, m = _metric_data(seed=10 + i)
    eta = -u[:, 0] / (m[0] * (g0[:, 0] + 0.5 * g1[:, 0]))
    d = np.exp(np.random.default_rng(20 + i).standard_normal(g0.shape[1]))
    us.append(-eta[:, None] * m[None] * g0)
    gs.append(np.stack([g0, g1, d[None] * g0], 1))
  fit, inc, reasons = _suite_fit(us, gs, ("train_loss", "clean", "rescaled_train"), 20)
  assert inc.tolist() == [True, True, False]
  assert reasons["rescaled_train"].startswith("not identifiable with the metric free")
  np.testing.assert_allclose(fit["w_norm"][:, 1], 0.0, atol=1e-8)
  assert np.all(np.asarray(fit["r2"]) > 1 - 1e-10)


def test_weight_rows_leave_out_the_tasks_where_the_metric_absorbs_the_term():
  """A term identifiable in most tasks (median profiled VIF small: kept by the suite) can be
  confounded with M in one: there ∇φ = D ∇L_train for a fixed diagonal D, its weight is not
  determined by the fit, and before it entered the weight row's mean (|w| up to 10¹⁰ in real
  fits). ``stages._identifiable_w`` leaves that task out of the row, and only that one."""
  from mesajax.analysis import stages
  us, gs = [], []
  for i in range(4):
    u, g0, g1, m = _metric_data(seed=30 + i)
    eta = -u[:, 0] / (m[0] * (g0[:, 0] + 0.5 * g1[:, 0]))
    rng = np.random.default_rng(40 + i)
    if i < 3:   # u descends L_train + ½ clean + 0.3 third, an independent term
      third = rng.standard_normal(g0.shape)
      us.append(-eta[:, None] * m[None] * (g0 + 0.5 * g1 + 0.3 * third))
    else:       # u descends L_train alone, and third = D ∇L_train: M absorbs it exactly
      third = np.exp(rng.standard_normal(g0.shape[1]))[None] * g0
      us.append(-eta[:, None] * m[None] * g0)
    gs.append(np.stack([g0, g1, third], 1))
  fit, inc, reasons = _suite_fit(us, gs, ("train_loss", "clean", "third"), 30)
  assert inc.tolist() == [True, True, True] and not reasons
  vif = np.asarray(fit["vif_profiled"])[:, 2]
  assert np.all(vif[:3] < 100.0) and vif[3] > 100.0
  w = stages._identifiable_w(fit["w_norm"][:, 2], fit["vif_profiled"][:, 2], 100.0)
  assert np.all(np.isfinite(w[:3])) and np.isnan(w[3])
  np.testing.assert_array_equal(w[:3], np.asarray(fit["w_norm"])[:3, 2])
  np.testing.assert_allclose(w[:3], 0.3, rtol=1e-6)
  assert stages._vif_reason(fit["vif_profiled"][:, 2], 100.0).startswith(
      "1 of 4 tasks not identifiable with the metric free")
  assert stages._vif_reason(fit["vif_profiled"][:3, 1], 100.0) is None
  # That task's fitted objective Φ_w is undefined too (alignment's divergence test skips it).
  assert stages._phi_undefined(inc, fit["vif_profiled"], 100.0).tolist() == [False] * 3 + [True]
  assert not stages._phi_undefined(np.array([True, False, False]), fit["vif_profiled"],
                                   100.0).any()


def test_fit_on_gathered_rows_equals_the_fit_on_all_rows():
  """``max_fit_rows`` gathers the fitted rows (any mask, here not a prefix) before ALS and the
  polish: the held-out and padding rows carry no weight, so w, M, η and every R² are those of the
  fit over all T rows, to round-off."""
  rng = np.random.default_rng(5)
  t, n = 30, 24
  u, g0, g1, _ = _metric_data(seed=4, t=t, n=n)
  u = u + 0.3 * np.abs(u).mean() * rng.standard_normal(u.shape)      # a noisy, unique optimum
  g = np.stack([g0, g1, rng.standard_normal((t, n))], 1)
  rows = (rng.random(t) < 0.6).astype(np.float64)
  valid = np.ones(t)
  valid[-4:] = 0.0
  rows[-4:] = 0.0
  u[-4:], g[-4:] = 0.0, 0.0                                          # padding rows
  with jax.enable_x64(True):
    fit = lambda mr: jax.tree.map(np.asarray, jax.jit(lambda a, b: objective_fit.fit_objective(
        a, b, np.ones(3, bool), 0, 10, fit_rows_T=rows, valid_T=valid,
        max_fit_rows=mr))(u, g))
    full, gathered = fit(None), fit(int(rows.sum()) + 2)
  for key in ("w_norm", "metric", "eta", "r2", "r2_heldout", "r2_train_only_heldout",
              "vif_profiled"):
    np.testing.assert_allclose(gathered[key], full[key], rtol=1e-7, atol=1e-12, err_msg=key)
  assert 0.3 < float(full["r2_heldout"]) < 0.99
