"""Known-answer table for the mesa-objective analyses (docs/analyses.md, "Known answers" of each
analysis).

  python experiments/known_answers/run.py --workdir runs/known_answers [--quick]

Runs every analysis on problems whose answer is known in closed form — hand-designed optimizers
through the same driver (``mesajax.analysis.suite.run_analyses``) that analyses learned ones, and
hand-built fields / hidden states for the cases no registered optimizer realises — and writes
``DIR/known_answers.md`` (expected beside measured) and ``DIR/results.jsonl`` (tidy rows with the
extra keys ``expected`` and ``passed``). About 1.5-3 minutes on an idle 2-core CPU; ``--quick``
(CI) runs only the gradient-descent cases (about 20 s of CPU time).

Besides the closed-form answers, each failure class of the analysis-validity review is a case:
a pure-noise update (no finding, NCI undefined), preconditioned GD with a dense SPD P (symmetric in
the metric P⁻¹), Adam at ε = 1e-8 (float64 quasi-static), a sign-based update (J = 0), SGD that has
not converged (endpoint fit undefined), exact GD on the outer loss (ties), a stored θ₀
(eigenvalue 1, not unstable).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

import dataclasses
from typing import NamedTuple

from mesajax.tasks.views import FullBatch
from mesajax.analysis import fields, nci, objective_fit, probes, suite
from mesajax.analysis import dictionary
from mesajax.optimizers.base import Optimizer
from mesajax.optimizers.baselines import SGD, SGDM, Adam, RMSProp
from mesajax.optimizers.controls import NoiseUpdate, PrecondSGD, RandomField
from mesajax.report.rows import append_rows, make_row
from mesajax.rollout import run_trajectory
from mesajax.splits import Split
from mesajax.tasks.quadratic import Quadratic
from mesajax.tasks.regression import LinearRegression, LogisticRegression

ACFG = dict(num_tasks=8, num_steps=60, num_points=3, num_probes=64, n_boot=500,
            endpoint_steps=2000, num_perms=20, controls=())
QUAD = Quadratic(dim=10, cond=10.0, init_scale=1.0)  # rotated (default), θ₀ ≠ 0


class Table:
  """Collects (case, analysis, metric, expected, measured, check) and the matching rows."""

  def __init__(self):
    self.lines, self.rows = [], []

  def add(self, case, analysis, metric, measured, expected_text, ok, ci=None,
          optimizer="hand-built", n=None):
    measured = float(measured)
    self.lines.append((case, analysis, metric, expected_text, measured, ci, bool(ok), None))
    lo, hi = ci if ci is not None else (None, None)
    self.rows.append(make_row(analysis, case, optimizer, metric, measured, lo, hi, n,
                              expected=expected_text, passed=bool(ok)))

  def from_rows(self, case, rows, analysis, metric, expected_text, check, row_check=None):
    r = [x for x in rows if x["analysis"] == analysis and x["metric"] == metric][0]
    if r["value"] is None:  # an undefined row: shown with its reason; passes only if expected
      ok = row_check(r) if row_check is not None else False
      self.lines.append((case, analysis, metric, expected_text, None, None, bool(ok),
                         r.get("undefined")))
      self.rows.append(make_row(analysis, case, r["optimizer"], metric, None, n=r["n"],
                                undefined=r.get("undefined"), expected=expected_text,
                                passed=bool(ok)))
      return
    ok = check(r["value"]) and (row_check(r) if row_check is not None else True)
    self.add(case, analysis, metric, r["value"], expected_text, ok,
             (r["ci_low"], r["ci_high"]), r["optimizer"], r["n"])
    if r.get("p_value") is not None or "clears_null" in r:
      self.lines[-1] = self.lines[-1] + (None,)
      self.rows[-1].update({k: r[k] for k in ("p_value", "clears_null", "null") if k in r})

  def markdown(self) -> str:
    out = ["| known answer | analysis | metric | expected | measured [95% CI] | ok |",
           "|---|---|---|---|---|---|"]
    for line in self.lines:
      case, analysis, metric, exp, val, ci, ok, why = line[:8]
      m = _fmt(val) if val is not None else f"undefined: {why}"
      if ci is not None and ci[0] is not None and ci[0] != ci[1]:
        m += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
      out.append(f"| {case} | {analysis} | {metric} | {exp} | {m} | {'✓' if ok else '✗'} |")
    n_ok = sum(x[6] for x in self.lines)
    out += ["", f"{n_ok}/{len(self.lines)} known answers reproduced."]
    return "\n".join(out)


def _fmt(x):
  if x is None:
    return "–"
  ax = abs(x)
  return f"{x:.2e}" if ax != 0 and (ax < 1e-3 or ax >= 1e4) else f"{x:.4f}"


def _run(opt, name, fam=QUAD, horizon=60, seed=0, stages=None, **acfg):
  cfg = ml_collections.ConfigDict({**suite.DEFAULTS, **ACFG, **acfg})
  splits = {"heldout": Split("heldout", fam, horizon)}
  return suite.run_analyses(opt, opt.init_phi(None), name, splits, cfg, seed, stages=stages)


def _zero_or_undefined(r):
  return r["value"] is None and r.get("undefined", "").startswith("excluded")


def gradient_descent(t: Table):
  rows = _run(SGD(learning_rate=0.3), "sgd",
              stages=("nci", "objective_fit", "endpoint_fit"))
  case = "GD, rotated quadratic"
  t.from_rows(case, rows, "nci", "nci", "0 (< 1e-12, exact)", lambda v: v < 1e-12)
  t.from_rows(case, rows, "transverse", "transverse", "0 (< 1e-12)", lambda v: v < 1e-12)
  t.from_rows(case, rows, "objective_fit", "frac_eta_positive", "1 (descends L_train)",
              lambda v: v == 1.0)
  for term in ("l2", "l2_init", "grad_norm_sq", "dist_opt", "diag_quadratic"):
    t.from_rows(case, rows, "objective_fit", f"w:{term}", "0 or excluded",
                lambda v: abs(v) < 1e-6, row_check=lambda r: r["value"] is not None or
                _zero_or_undefined(r))
  t.from_rows(case, rows, "objective_fit", "r2_heldout_steps", "1", lambda v: v > 0.9999)
  t.from_rows(case, rows, "objective_fit", "r2_gain_heldout_steps", "0, no finding",
              lambda v: abs(v) < 1e-9, row_check=lambda r: not r.get("clears_null"))
  t.from_rows(case, rows, "endpoint_fit", "w:l2", "0", lambda v: abs(v) < 1e-3)


def weight_decay(t: Table):
  for lam in (0.01, 0.1, 0.3):
    rows = _run(SGD(learning_rate=0.3, weight_decay=lam), f"sgd_wd{lam:g}",
                stages=("nci", "objective_fit", "endpoint_fit"))
    case = f"GD + weight decay λ={lam:g}"
    t.from_rows(case, rows, "nci", "nci", "0 (< 1e-12)", lambda v: v < 1e-12)
    t.from_rows(case, rows, "objective_fit", "w:l2", f"{lam:g}, a finding",
                lambda v, lam=lam: abs(v - lam) < 1e-3 * lam + 1e-6,
                row_check=lambda r: r.get("clears_null") is True)
    t.from_rows(case, rows, "objective_fit", "r2_gain_heldout_steps", "> 0, clears the "
                "permutation null", lambda v: v > 0, row_check=lambda r: r.get("clears_null"))
    t.from_rows(case, rows, "endpoint_fit", "w:l2", f"{lam:g}",
                lambda v, lam=lam: abs(v - lam) < 0.01 * lam)


def momentum_and_adam(t: Table):
  for beta in (0.5, 0.9):
    lr = 0.05
    rows = _run(SGDM(learning_rate=lr, momentum=beta), f"sgdm{beta:g}",
                stages=("nci", "quasi_static"))
    case = f"momentum β={beta:g}, η={lr:g}"
    t.from_rows(case, rows, "quasi_static", "eig_1", f"{beta:g}",
                lambda v, b=beta: abs(v - b) < 1e-4)
    t.from_rows(case, rows, "quasi_static", "effective_step", f"η/(1−β) = {lr / (1 - beta):g}",
                lambda v, e=lr / (1 - beta): abs(v - e) < 1e-3 * e)
    t.from_rows(case, rows, "nci", "qs:nci", "0 (ū is a gradient field)", lambda v: v < 1e-12)
  # The qs: fit on ū with its own permutation null: heavy ball on L_train + λ·½‖θ‖² has
  # ū = −η/(1−β)(∇L_train + λθ), so qs:w:l2 = λ exactly, and its t-statistic over tasks lies
  # beyond every permutation draw's. (Its gain row is not a known answer: ½‖θ‖² does not depend
  # on the task, so another task's θ-terms recover nearly the same gain; measured p = 2/21.
  # Every draw is made, null_stop_early off: the gain cannot clear, so the draws would otherwise
  # stop at the first one whose gain reaches it, and the weight's test would see only those.)
  lam, beta = 0.1, 0.5
  rows = _run(HeavyBallWD(lam=lam, beta=beta), "heavy_ball_wd", stages=("objective_fit",),
              null_stop_early=False)
  case = f"heavy ball β={beta:g} on L + λ·½‖θ‖², λ={lam:g}"
  t.from_rows(case, rows, "objective_fit", "qs:w:l2",
              f"{lam:g}; its t-statistic beyond all 20 permutation draws (p = 1/21)",
              lambda v: abs(v - lam) < 1e-6 * lam,
              row_check=lambda r: r.get("p_value") is not None and r["p_value"] < 0.05
              and r.get("null", "").startswith("permutation: ū paired"))
  rows = _run(Adam(learning_rate=0.01, b1=0.9, b2=0.999), "adam",
              stages=("nci", "quasi_static"))
  case = "Adam β₁=0.9, β₂=0.999, ε=1e-8 (default)"
  t.from_rows(case, rows, "quasi_static", "eig_1", "0.999", lambda v: abs(v - 0.999) < 1e-6)
  t.from_rows(case, rows, "quasi_static", "eig_2", "0.9", lambda v: abs(v - 0.9) < 1e-6)
  t.from_rows(case, rows, "nci", "qs:nci", "> 0 (sign descent in a rotated basis)",
              lambda v: v > 0.01)
  t.from_rows(case, rows, "nci_metric", "qs:nci:own_diag",
              "≈ 0 in float64 (< 1e-5; float32 gave 0.55)", lambda v: v < 1e-5)


def adaptive_metrics(t: Table):
  fam6 = Quadratic(dim=6, cond=10.0, init_scale=1.0)
  rows = _run(RMSProp(learning_rate=0.01, decay=0.0, eps=0.1), "rmsprop_memoryless", fam6,
              stages=("nci",))
  case = "memoryless RMSProp ε=0.1, rotated 6-d quadratic"
  t.from_rows(case, rows, "nci_metric", "nci:identity", "> 0 (≈0.29 seen)", lambda v: v > 0.05)
  t.from_rows(case, rows, "transverse", "transverse", "> 0", lambda v: v > 0.02)
  t.from_rows(case, rows, "nci_metric", "nci:own_diag", "0 (< 1e-4)", lambda v: v < 1e-4)
  t.from_rows(case, rows, "nci_metric", "nci:fitted_diag", "0 (< 1e-3)", lambda v: v < 1e-3)

  # Adam with v frozen, built by hand: u = −η g / (√v + ε) on a rotated quadratic.
  case = "Adam with v frozen (hand-built field)"
  task = QUAD.sample(jax.random.PRNGKey(3))
  v = jnp.exp(2.0 * jax.random.normal(jax.random.PRNGKey(4), (QUAD.dim,)))
  eps, lr = 1e-3, 0.01
  metric = jnp.sqrt(v) + eps

  def field(th):
    g = task["A"] @ (th - task["theta_star"])
    return -lr * g / metric, g

  pv, pw = nci.gaussian_probes(jax.random.PRNGKey(5), 256, QUAD.dim)
  _, _, p = nci.probe_products(field, jnp.zeros(QUAD.dim), pv, pw)
  jac = jax.jacfwd(lambda x: field(x)[0])(jnp.zeros(QUAD.dim))
  m_fit, _ = nci.fit_diag_metric(jac)
  val = nci.nci_from_probes(p)[0]
  t.add(case, "nci_metric", "nci:identity", val, "> 0", val > 0.1)
  val = nci.nci_from_probes(p, metric)[0]
  t.add(case, "nci_metric", "nci:diag(√v+ε)", val, "0 (< 1e-4)", val < 1e-4)
  val = nci.nci_from_probes(p, m_fit)[0]
  t.add(case, "nci_metric", "nci:fitted_diag", val, "0 (< 1e-3)", val < 1e-3)
  cond_true = float(nci.metric_cond(metric))
  t.add(case, "nci_metric", "metric_cond:fitted_diag", nci.metric_cond(m_fit),
        f"cond(√v+ε) = {cond_true:.1f}", abs(float(nci.metric_cond(m_fit)) / cond_true - 1) < 0.02)


def clipping_and_rotation(t: Table):
  rows = _run(SGD(learning_rate=0.1, clip_norm=0.1), "sgd_clip", stages=("nci",))
  case = "global-norm clipped GD (clip active)"
  t.from_rows(case, rows, "nci", "nci", "> 0 (≈0.29 seen)", lambda v: v > 0.05)
  t.from_rows(case, rows, "transverse", "transverse", "0 (< 1e-9)", lambda v: v < 1e-9)

  case = "rotation field u = Rθ, R = −Rᵀ"
  a = jax.random.normal(jax.random.PRNGKey(6), (QUAD.dim, QUAD.dim))
  _, _, p = nci.probe_products(lambda th: ((a - a.T) @ th, th), jnp.ones(QUAD.dim),
                               *nci.gaussian_probes(jax.random.PRNGKey(7), 64, QUAD.dim))
  val = nci.nci_from_probes(p)[0]
  t.add(case, "nci", "nci", val, "1", abs(val - 1) < 1e-5)

  case = "random J (8×8): estimator vs dense"
  j = jax.random.normal(jax.random.PRNGKey(0), (8, 8))
  exact = float(nci.nci_exact(j)[0])
  _, _, p = nci.probe_products(lambda th: (j @ th, th), jnp.ones(8),
                               *nci.gaussian_probes(jax.random.PRNGKey(1), 8192, 8))
  val = nci.nci_from_probes(p)[0]
  t.add(case, "nci", "nci (K=8192 probe pairs)", val, f"{exact:.4f} (dense)",
        abs(val - exact) < 0.03 * exact)


def overfitting_alignment(t: Table):
  fam = LinearRegression(dim=40, n_train=10, n_val=500, noise=1.0)
  rows = _run(SGD(learning_rate=0.05), "sgd", fam, horizon=400, num_steps=400, num_points=2,
              stages=("alignment",),
              endpoint_steps=400)
  case = "GD, over-parameterised noisy regression"
  t.from_rows(case, rows, "alignment", "cos_u_neg_train_grad", "1", lambda v: abs(v - 1) < 1e-4)
  t.from_rows(case, rows, "alignment", "descent_ratio_late", "< 0 (turns negative late)",
              lambda v: v < 0)
  t.from_rows(case, rows, "alignment", "frac_diverged", "1 (a divergence step exists)",
              lambda v: v == 1.0)


def implicit_gradient_regularisation(t: Table):
  fam = Quadratic(dim=8, cond=4.0, init_scale=1.0, eig_max=1.0)
  names = dictionary.term_names(fam)
  inc = np.zeros(len(names), bool)
  inc[[names.index("train_loss"), names.index("grad_norm_sq")]] = True
  tasks = fam.sample_batch(jax.random.PRNGKey(0), 4)
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  fit = jax.jit(jax.vmap(lambda u, g: objective_fit.fit_objective(u, g, inc, fit_metric=False)))
  for h in (0.02, 0.2):
    opt = SGD(learning_rate=h)

    def one(task, key):
      states, _ = run_trajectory(opt, opt.init_phi(None), FullBatch(fam), task, key, 40)
      p0 = jax.tree.map(lambda x: x[0], states.params)
      _, g = jax.vmap(lambda p: dictionary.values_and_grads(fam, task, p, p0))(states.params)
      return jax.vmap(lambda p: ravel_pytree(p)[0])(states.params), g

    th, g = jax.jit(jax.vmap(one))(tasks, keys)
    vel = jax.vmap(lambda x: objective_fit.displacements(x, "central")[0])(th)
    out = fit(vel, g[:, 1:-1])
    w = float(np.mean(np.asarray(out["w_norm"])[:, names.index("grad_norm_sq")]))
    case = f"GD h={h:g}, central-difference velocity"
    ok = abs(w / (h / 2) - 1) < 0.05 if h < 0.1 else w / (h / 2) > 1.1
    t.add(case, "objective_fit", "w:grad_norm_sq", w,
          f"h/2 = {h / 2:g}" + ("" if h < 0.1 else " + higher-order bias"), ok)


def hidden_state_probes(t: Table):
  rng = np.random.default_rng(0)
  b, steps, n = 8, 400, 10
  jumps = rng.uniform(size=(b, steps, n)) < 1 / 30
  levels = rng.uniform(-1.5, 1.5, (b, steps, n))
  idx = np.maximum.accumulate(np.where(jumps, np.arange(steps)[None, :, None], 0), axis=1)
  g = np.exp(np.take_along_axis(levels, idx, axis=1)) * rng.standard_normal((b, steps, n))
  m_v = np.stack([probes.ema(g, 0.9), probes.ema(g * g, 0.999)], -1)
  hidden = m_v @ rng.standard_normal((2, 6))
  tg = probes.targets(g, np.ones((b, steps)), np.ones((b, steps)), steps)
  res = probes.probe_all(hidden, tg, seed=0, n_boot=200)
  case = "cell embedding Adam's (m, v), β₁=0.9, β₂=0.999"
  for kind, true in (("ema_g", "0.9"), ("ema_g2", "0.999")):
    for d in probes.DECAYS:
      key = f"{kind}@{d:g}"
      r = res[key]
      is_true = f"{d:g}" == true
      t.add(case, "probes", f"r2:{key}", r["r2"], "≈ 1" if is_true else "< 1 (not the true decay)",
            r["r2"] > 0.999 if is_true else r["r2"] < 0.9, (r["r2_lo"], r["r2_hi"]), n=r["n"])


class _NoState(NamedTuple):
  pass


@dataclasses.dataclass(frozen=True)
class SignSGD(Optimizer):
  """u = −η sign(g): ∂u/∂θ = 0 wherever g ≠ 0, so NCI is 0/0 (undefined), not 0."""

  learning_rate: float = 0.01
  name = "sign_sgd"

  def init_phi(self, key=None):
    return {"log_lr": jnp.log(self.learning_rate)}

  def init(self, phi, params):
    return _NoState()

  def update(self, phi, state, grads, params, ctx):
    lr = jnp.exp(phi["log_lr"])
    return jax.tree.map(lambda g: -lr.astype(g.dtype) * jnp.sign(g), grads), state


class _InitState(NamedTuple):
  theta0: dict


@dataclasses.dataclass(frozen=True)
class HeavyBallWD(Optimizer):
  """m_t = ∇L + λθ + β m_{t−1}, u = −η m_t: momentum on L + λ·½‖θ‖² (ū = −η/(1−β)(∇L + λθ))."""

  lam: float = 0.1
  beta: float = 0.5
  name = "heavy_ball_wd"

  def init_phi(self, key=None):
    return {"log_lr": jnp.log(0.05)}

  def init(self, phi, params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(self, phi, state, grads, params, ctx):
    m = jax.tree.map(lambda g, p, t: g + self.lam * p + self.beta * t, grads, params, state)
    return jax.tree.map(lambda d: -jnp.exp(phi["log_lr"]).astype(d.dtype) * d, m), m


@dataclasses.dataclass(frozen=True)
class DecayToInit(Optimizer):
  """u = −η(g + λ(θ − θ₀)) with θ₀ stored in the state (eigenvalue exactly 1 of the state map)."""

  name = "decay_to_init"

  def init_phi(self, key=None):
    return {"log_lr": jnp.log(0.1)}

  def init(self, phi, params):
    return _InitState(params)

  def update(self, phi, state, grads, params, ctx):
    lr = jnp.exp(phi["log_lr"])
    return (jax.tree.map(lambda g, p, p0: -lr.astype(g.dtype) * (g + 0.1 * (p - p0)), grads,
                         params, state.theta0), state)


def _undefined(prefix):
  return lambda r: r["value"] is None and str(r.get("undefined", "")).startswith(prefix)


def _no_finding(r):
  return not r.get("clears_null")


def validity_cases(t: Table):
  """The failure classes of the analysis-validity review, each with its expected answer."""
  stages = ("nci", "dense_metric", "objective_fit")
  rows = _run(NoiseUpdate(learning_rate=0.05), "noise_update", stages=stages)
  case = "pure-noise update u = η ξ_t (control)"
  t.from_rows(case, rows, "nci", "nci", "undefined: J = 0", lambda v: False,
              row_check=_undefined("J = 0 at every point"))
  t.from_rows(case, rows, "nci_metric", "metric_cond:fitted_diag", "undefined (was 1e6)",
              lambda v: False, row_check=_undefined("J = 0"))
  t.from_rows(case, rows, "objective_fit", "r2_gain_heldout_steps",
              "CI includes 0; no finding", lambda v: True,
              row_check=lambda r: r["ci_low"] <= 0 <= r["ci_high"] and _no_finding(r))
  t.from_rows(case, rows, "objective_fit", "w:l2", "no finding (was 0.10 [0.005, 0.198])",
              lambda v: True, row_check=lambda r: r["value"] is None or _no_finding(r))

  rows = _run(RandomField(learning_rate=0.05, scale=2.0), "random_field", stages=stages)
  case = "smooth random field u = η sin(Wθ + b) (control)"
  t.from_rows(case, rows, "nci", "nci", "high (> 0.3), clears the floor", lambda v: v > 0.3,
              row_check=lambda r: r.get("clears_null") is True)
  t.from_rows(case, rows, "nci_metric", "nci:dense_spd", "> 0: no constant SPD metric",
              lambda v: v > 0.05, row_check=lambda r: r.get("clears_null") is True)
  t.from_rows(case, rows, "objective_fit", "r2_gain_heldout_steps", "no finding", lambda v: True,
              row_check=_no_finding)

  fam = LogisticRegression(dim=5, n_train=40, init_scale=1.0)
  rows = _run(PrecondSGD(learning_rate=1.0, cond=10.0), "precond_sgd", fam, stages=stages)
  case = "preconditioned GD u = −ηPg, dense SPD P, cond(P) = 10, logistic regression"
  t.from_rows(case, rows, "nci_metric", "nci:identity", "> 0 (was indistinguishable from the "
              "learned optimizer)", lambda v: v > 0.05)
  t.from_rows(case, rows, "nci_metric", "nci:fitted_diag", "> 0 (no diagonal metric)",
              lambda v: v > 0.01)
  t.from_rows(case, rows, "nci_metric", "nci:dense_spd", "≈ 0 (M = P⁻¹)", lambda v: v < 1e-6,
              row_check=lambda r: r.get("clears_null") is False)
  t.from_rows(case, rows, "nci_metric", "metric_cond:dense_spd", "≈ cond(P) = 10",
              lambda v: abs(v / 10.0 - 1) < 0.05)
  t.from_rows(case, rows, "objective_fit", "w:train_loss",
              "+1 fixed in every task (was −0.25 [−1, 0.5])", lambda v: v == 1.0)
  t.from_rows(case, rows, "objective_fit", "frac_eta_positive",
              "> 0.5: most steps descend the fitted objective (diagonal M cannot express P)",
              lambda v: v > 0.5)

  rows = _run(SignSGD(learning_rate=0.01), "sign_sgd", stages=("nci",))
  case = "sign-based update u = −η sign(g)"
  t.from_rows(case, rows, "nci", "nci", "undefined: J = 0", lambda v: False,
              row_check=_undefined("J = 0 at every point"))

  lin = LinearRegression(dim=10, n_train=20, n_val=200, noise=0.5)  # the quickstart's family
  rows = _run(SGD(learning_rate=0.01), "sgd", lin, horizon=200, stages=("endpoint_fit",),
              endpoint_steps=200)
  case = "SGD η=0.01, not converged after 200 steps (quickstart family)"
  t.from_rows(case, rows, "endpoint_fit", "w:grad_norm_sq",
              "undefined: not stationary (was −9.9 = −1/λ_min)", lambda v: False,
              row_check=_undefined("not stationary"))
  t.from_rows(case, rows, "endpoint_fit", "update_norm_end_rel", "> stationary_tol = 1e-3",
              lambda v: v > 1e-3)

  rows = _run(SGD(learning_rate=0.3), "sgd", QUAD, horizon=400, num_steps=400,
              stages=("alignment",))
  case = "exact GD on the outer loss (outer = train), converged: loss ties"
  t.from_rows(case, rows, "alignment", "frac_outer_descent", "1 with ties (was 0.42-0.74)",
              lambda v: v > 0.999)

  rows = _run(DecayToInit(), "decay_to_init", stages=("quasi_static",))
  case = "stored θ₀ in the state (u = −η(g + 0.1(θ − θ₀)))"
  t.from_rows(case, rows, "quasi_static", "frac_unstable", "0 (eigenvalue 1 is conserved)",
              lambda v: v == 0.0)
  t.from_rows(case, rows, "quasi_static", "frac_conserved_dims", "1", lambda v: v == 1.0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--quick", action="store_true", help="the CI size: the gradient-descent cases only")
  args = ap.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  t, start = Table(), time.time()
  sections = (gradient_descent, weight_decay, momentum_and_adam, adaptive_metrics,
              clipping_and_rotation, overfitting_alignment, implicit_gradient_regularisation,
              hidden_state_probes, validity_cases)
  for section in sections[:1] if args.quick else sections:
    section(t)
    print(f"[{time.time() - start:6.1f}s] {section.__name__}", file=sys.stderr)
  md = ("# Known answers of the mesa-objective analyses\n\n"
        "Command: `python experiments/known_answers/run.py --workdir DIR` "
        f"({time.time() - start:.0f} s on this machine).\n\n" + t.markdown() + "\n")
  with open(os.path.join(args.workdir, "known_answers.md"), "w") as f:
    f.write(md)
  path = os.path.join(args.workdir, "results.jsonl")
  if os.path.exists(path):
    os.remove(path)
  append_rows(path, t.rows)
  print(md)
  return 0 if all(x[6] for x in t.lines) else 1


if __name__ == "__main__":
  sys.exit(main())
