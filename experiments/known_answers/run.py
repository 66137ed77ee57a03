"""Known-answer table for the mesa-objective analyses (science.md, "Analyses and their known
answers").

  python experiments/known_answers/run.py --workdir runs/known_answers

Runs every analysis on problems whose answer is known in closed form — hand-designed optimizers
through the same driver (``mesajax.analysis.suite.run_analyses``) that analyses learned ones, and
hand-built fields / hidden states for the cases no registered optimizer realises — and writes
``DIR/known_answers.md`` (expected beside measured) and ``DIR/results.jsonl`` (tidy rows with the
extra keys ``expected`` and ``passed``). About 2-4 minutes on a 2-core CPU.
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

from mesajax.tasks.views import FullBatch
from mesajax.analysis import fields, nci, objective_fit, probes, suite
from mesajax.analysis import dictionary
from mesajax.optimizers.baselines import SGD, SGDM, Adam, RMSProp
from mesajax.report.rows import append_rows, make_row
from mesajax.rollout import run_trajectory
from mesajax.splits import Split
from mesajax.tasks.quadratic import Quadratic
from mesajax.tasks.regression import LinearRegression

ACFG = dict(num_tasks=8, num_steps=60, num_points=3, num_probes=64, n_boot=500,
            endpoint_steps=2000)
QUAD = Quadratic(dim=10, cond=10.0, init_scale=1.0)  # rotated (default), θ₀ ≠ 0


class Table:
  """Collects (case, analysis, metric, expected, measured, check) and the matching rows."""

  def __init__(self):
    self.lines, self.rows = [], []

  def add(self, case, analysis, metric, measured, expected_text, ok, ci=None,
          optimizer="hand-built", n=None):
    measured = float(measured)
    self.lines.append((case, analysis, metric, expected_text, measured, ci, bool(ok)))
    lo, hi = ci if ci is not None else (None, None)
    self.rows.append(make_row(analysis, case, optimizer, metric, measured, lo, hi, n,
                              expected=expected_text, passed=bool(ok)))

  def from_rows(self, case, rows, analysis, metric, expected_text, check):
    r = [x for x in rows if x["analysis"] == analysis and x["metric"] == metric][0]
    self.add(case, analysis, metric, r["value"], expected_text, check(r["value"]),
             (r["ci_low"], r["ci_high"]), r["optimizer"], r["n"])

  def markdown(self) -> str:
    out = ["| known answer | analysis | metric | expected | measured [95% CI] | ok |",
           "|---|---|---|---|---|---|"]
    for case, analysis, metric, exp, val, ci, ok in self.lines:
      m = _fmt(val)
      if ci is not None and ci[0] is not None and ci[0] != ci[1]:
        m += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
      out.append(f"| {case} | {analysis} | {metric} | {exp} | {m} | {'✓' if ok else '✗'} |")
    n_ok = sum(x[-1] for x in self.lines)
    out += ["", f"{n_ok}/{len(self.lines)} known answers reproduced."]
    return "\n".join(out)


def _fmt(x):
  if x is None:
    return "–"
  ax = abs(x)
  return f"{x:.2e}" if ax != 0 and (ax < 1e-3 or ax >= 1e4) else f"{x:.4f}"


def _run(opt, name, fam=QUAD, horizon=60, seed=0, **acfg):
  cfg = ml_collections.ConfigDict({**ACFG, **acfg})
  splits = {"heldout": Split("heldout", fam, horizon)}
  return suite.run_analyses(opt, opt.init_phi(None), name, splits,
                            cfg, seed)


def gradient_descent(t: Table):
  rows = _run(SGD(learning_rate=0.3), "sgd")
  case = "GD, rotated quadratic"
  t.from_rows(case, rows, "nci", "nci", "0 (< 1e-4)", lambda v: v < 1e-4)
  t.from_rows(case, rows, "transverse", "transverse", "0 (< 1e-4)", lambda v: v < 1e-4)
  t.from_rows(case, rows, "objective_fit", "w:train_loss", "1", lambda v: abs(v - 1) < 1e-3)
  for term in ("l2", "l2_init", "grad_norm_sq", "dist_opt", "diag_quadratic"):
    t.from_rows(case, rows, "objective_fit", f"w:{term}", "0", lambda v: abs(v) < 1e-2)
  t.from_rows(case, rows, "objective_fit", "r2", "1", lambda v: v > 0.9999)
  t.from_rows(case, rows, "endpoint_fit", "w:l2", "0", lambda v: abs(v) < 1e-3)


def weight_decay(t: Table):
  for lam in (0.01, 0.1, 0.3):
    rows = _run(SGD(learning_rate=0.3, weight_decay=lam), f"sgd_wd{lam:g}")
    case = f"GD + weight decay λ={lam:g}"
    t.from_rows(case, rows, "nci", "nci", "0 (< 1e-4)", lambda v: v < 1e-4)
    t.from_rows(case, rows, "objective_fit", "w:l2", f"{lam:g}",
                lambda v, lam=lam: abs(v - lam) < 0.03 * lam + 2e-4)
    t.from_rows(case, rows, "endpoint_fit", "w:l2", f"{lam:g}",
                lambda v, lam=lam: abs(v - lam) < 0.01 * lam)


def momentum_and_adam(t: Table):
  for beta in (0.5, 0.9):
    lr = 0.05
    rows = _run(SGDM(learning_rate=lr, momentum=beta), f"sgdm{beta:g}")
    case = f"momentum β={beta:g}, η={lr:g}"
    t.from_rows(case, rows, "quasi_static", "eig_1", f"{beta:g}",
                lambda v, b=beta: abs(v - b) < 1e-4)
    t.from_rows(case, rows, "quasi_static", "effective_step", f"η/(1−β) = {lr / (1 - beta):g}",
                lambda v, e=lr / (1 - beta): abs(v - e) < 1e-3 * e)
    t.from_rows(case, rows, "nci", "qs:nci", "0 (ū is a gradient field)", lambda v: v < 1e-4)
  rows = _run(Adam(learning_rate=0.01, b1=0.9, b2=0.999), "adam")
  case = "Adam β₁=0.9, β₂=0.999"
  t.from_rows(case, rows, "quasi_static", "eig_1", "0.999", lambda v: abs(v - 0.999) < 1e-4)
  t.from_rows(case, rows, "quasi_static", "eig_2", "0.9", lambda v: abs(v - 0.9) < 1e-4)


def adaptive_metrics(t: Table):
  fam6 = Quadratic(dim=6, cond=10.0, init_scale=1.0)
  rows = _run(RMSProp(learning_rate=0.01, decay=0.0, eps=0.1), "rmsprop_memoryless", fam6)
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
  rows = _run(SGD(learning_rate=0.1, clip_norm=0.1), "sgd_clip")
  case = "global-norm clipped GD (clip active)"
  t.from_rows(case, rows, "nci", "nci", "> 0 (≈0.29 seen)", lambda v: v > 0.05)
  t.from_rows(case, rows, "transverse", "transverse", "0 (< 1e-3)", lambda v: v < 1e-3)

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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  args = ap.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  t, start = Table(), time.time()
  for section in (gradient_descent, weight_decay, momentum_and_adam, adaptive_metrics,
                  clipping_and_rotation, overfitting_alignment, implicit_gradient_regularisation,
                  hidden_state_probes):
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
  return 0 if all(x[-1] for x in t.lines) else 1


if __name__ == "__main__":
  sys.exit(main())
