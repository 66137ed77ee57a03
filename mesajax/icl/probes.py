"""Linear probes per layer: is a quantity of an inner algorithm linearly readable from the query
token's representation? (von Oswald et al. 2023b probe their models for the preconditioned input;
Akyürek et al. 2022 probe for Xᵀy and the ridge/least-squares weights.)

Features: the query token after each layer (``model.hidden``; layer 0 is the input token (x_q, 0)).
Targets per task (d-vectors unless marked scalar):

  xty          Xᵀy / N                         (the one-GD-step direction)
  ridge_w      ŵ_ridge(λ*) = (XᵀX + λ*I)⁻¹Xᵀy
  ols_w        ŵ_OLS (minimum-norm)
  precond_q    (XᵀX + λ*I)⁻¹ x_q               (the preconditioned query; λ* → 10⁻² if σ = 0)
  xty_q        x_qᵀXᵀy / N                     (scalar: one GD step's prediction, up to η)
  ridge_q      x_qᵀŵ_ridge(λ*)                 (scalar)
  ols_q        x_qᵀŵ_OLS                       (scalar)

Probe: ridge regression (penalty 10⁻³ on standardised features, with a bias) fitted on half the
tasks; R² = 1 − SSE/SST on the other, held-out half, averaged over target dimensions. Control:
the same probe fitted on targets shuffled across the fitting tasks (a probe that recovers
"structure" from the shuffled targets would be reading noise); its held-out R² should be ≤ 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.eval.stats import bootstrap_ci
from mesajax.icl import config as cfg
from mesajax.icl import references as R
from mesajax.icl.linalg import spd_solve
from mesajax.report.rows import make_row

TARGETS = ("xty", "ridge_w", "ols_w", "precond_q", "xty_q", "ridge_q", "ols_q")


def fit_probe(f_train, y_train, alpha: float = 1e-3):
  """Ridge probe on standardised features with a bias: returns ``predict(f) -> y``."""
  f_train, y_train = np.asarray(f_train, np.float64), np.asarray(y_train, np.float64)
  y_train = y_train.reshape(len(y_train), -1)
  mu, sd = f_train.mean(0), f_train.std(0) + 1e-8
  z = np.concatenate([(f_train - mu) / sd, np.ones((len(f_train), 1))], axis=1)
  coef = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ y_train)
  def predict(f):
    f = np.asarray(f, np.float64)
    return np.concatenate([(f - mu) / sd, np.ones((len(f), 1))], axis=1) @ coef
  return predict


def r2(y_true, y_pred) -> float:
  """Held-out R², averaged over target dimensions (dimensions with no variance skipped)."""
  y_true = np.asarray(y_true, np.float64).reshape(len(y_true), -1)
  y_pred = np.asarray(y_pred, np.float64).reshape(len(y_pred), -1)
  sst = ((y_true - y_true.mean(0)) ** 2).sum(0)
  sse = ((y_true - y_pred) ** 2).sum(0)
  ok = sst > 1e-12 * len(y_true)
  return float(np.mean(1.0 - sse[ok] / sst[ok])) if ok.any() else float("nan")


def probe(features, targets, seed: int = 0) -> tuple[float, float]:
  """``(r2, r2_shuffled)``: fit on the first half of the tasks, score on the second half."""
  n = len(features) // 2
  pred = fit_probe(features[:n], targets[:n])
  perm = np.random.default_rng(seed).permutation(n)
  ctrl = fit_probe(features[:n], np.asarray(targets[:n])[perm])
  return r2(targets[n:], pred(features[n:])), r2(targets[n:], ctrl(features[n:]))


def targets(task, lam: float) -> dict:
  """Probe targets of one task with one query (module docstring)."""
  x, y, q = task["x_NxD"], task["y_N"], task["xq_MxD"][0]
  n, d = x.shape
  lam_p = lam if lam > 0 else 1e-2
  w_r = R.ridge_weights(x, y, jnp.asarray(lam, x.dtype))[0]
  w_o = R.ridge_weights(x, y, jnp.asarray(0.0, x.dtype))[0]
  xty = x.T @ y / n
  return {"xty": xty, "ridge_w": w_r, "ols_w": w_o,
          "precond_q": spd_solve(x.T @ x + lam_p * jnp.eye(d), q),
          "xty_q": q @ xty, "ridge_q": q @ w_r, "ols_q": q @ w_o}


def probe_rows(config, trainer, state, split: str = "train") -> list[dict]:
  """One row per (target, layer) with the held-out R² (mean over seeds, bootstrap CI over seeds)
  and one for the shuffled control; extra keys ``target``, ``layer``, ``per_seed``."""
  fam = cfg.shift_families(config)[split]
  n_tasks = int(config.icl.eval.probe_tasks)
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 104729), 0)

  @jax.jit
  def compute(params_S, key):
    tasks = fam.sample_batch(key, n_tasks, 1)
    h = jax.vmap(lambda p: jax.vmap(lambda t: trainer.hidden(p, t["x_NxD"], t["y_N"],
                                                             t["xq_MxD"])[:, 0])(tasks))(params_S)
    return h, jax.vmap(lambda t: targets(t, fam.bayes_lambda))(tasks)

  h_SxTxLxF, tg = jax.device_get(compute(state.params, key))
  rows = []
  n_boot = int(config.icl.eval.n_boot)
  for name in TARGETS:
    for layer in range(h_SxTxLxF.shape[2]):
      res = np.array([probe(h_SxTxLxF[s, :, layer], tg[name], seed=s)
                      for s in range(h_SxTxLxF.shape[0])])
      for j, metric in enumerate(("r2", "r2_shuffled")):
        vals = res[:, j]
        fin = vals[np.isfinite(vals)]
        extra = dict(target=name, layer=layer, per_seed=[float(v) for v in vals],
                     model=config.icl.model, step=int(state.step))
        if fin.size == 0:
          rows.append(make_row("icl_probe", split, config.name, metric, None, n=len(vals),
                               undefined="the target has no variance across tasks", **extra))
          continue
        v, lo, hi = bootstrap_ci(fin, n_boot=n_boot, seed=layer) if fin.size > 1 else (fin[0],) * 3
        rows.append(make_row("icl_probe", split, config.name, metric, v, lo, hi, fin.size, **extra))
  return rows
