"""Endpoint inverse optimisation: which objective is stationary where the optimizer stops?

At the end points θ*_i of long runs on tasks i = 1..N (where the update vanishes), an optimizer
whose update is −P∇Φ for a non-singular P has ∇Φ(θ*_i) = 0, whatever P is: the preconditioner drops
out. Following inverse optimisation (Keshavarz, Wang & Boyd 2011, "Imputing a convex objective
function"), fit the dictionary weights by

  min_w Σ_i ‖Σ_k w_k ∇φ_k(θ*_i)‖²   subject to  w_train_loss = 1,

a K−1-dimensional least-squares problem in the per-task Gram matrices A_i = G_iᵀG_i (G_i the
[n, K] matrix of dictionary gradients at θ*_i): w' = −(Σ A_i)_oo⁻¹ (Σ A_i)_o,train over the other
included terms (columns scaled to unit RMS for the solve, ridge 1e-10·trace). Bootstrap CIs
resample tasks and re-solve.

Invisible terms: a term whose gradient vanishes at every end point carries no information here and
is excluded (reported as ``vanishing``). In particular ``grad_norm_sq`` = ½‖∇L‖² has gradient
H∇L = 0 wherever ∇L_train = 0, so at the stationary points of any optimizer that drives the
training gradient to zero it is invisible; terms aliased with earlier ones (e.g. ``outer_loss`` when
it equals the training loss) are excluded as in ``objective_fit``. ``train_loss`` is always kept
(the normalisation); if its gradient vanishes at the end points too (plain gradient descent), the
fit returns w' ≈ 0: the end points are explained by the training loss alone.

Known answer: gradient descent with weight decay λ stops at ∇L + λθ = 0, so w = (1, λ) on
(train_loss, l2). Cost per task: the run to the end point (``endpoint_steps`` updates), then the
dictionary gradients once (K gradients + 1 HVP).
"""
from __future__ import annotations

import warnings

import numpy as np

from mesajax.analysis.objective_fit import alias_mask


def exclusions(g_IxKxN, names, train_index: int = 0, prior_include=None, vanish: float = 1e-4,
               tol: float = 1e-4):
  """(include bool[K], {name: reason}) for the end points.

  ``train_loss`` is always in. Of the other terms, those excluded by ``prior_include`` (structural
  aliases found on the trajectories, e.g. an outer loss identical to the training loss) stay out;
  then terms whose gradient vanishes at the end points (RMS below ``vanish`` times the largest
  other term's) and terms aliased with earlier *other* terms at the end points are dropped.
  Collinearity with ``train_loss`` itself is not an alias here: it is the signal (at a weight-decay
  end point ∇L_train = −λθ).
  """
  g = np.asarray(g_IxKxN, np.float64)
  k = len(names)
  prior = np.ones(k, bool) if prior_include is None else np.asarray(prior_include, bool)
  a = np.einsum("ikn,iln->kl", g, g)
  nrm = np.sqrt(np.maximum(np.diagonal(a), 0.0))
  safe = np.where(nrm > 0, nrm, 1.0)
  corr = a / (safe[:, None] * safe[None, :])
  excl = {names[j]: "aliased (trajectories)" for j in range(k) if j != train_index and not prior[j]}
  others = [j for j in range(k) if j != train_index and prior[j]]
  inc_o, ex_o = alias_mask(corr[np.ix_(others, others)], nrm[others], [names[j] for j in others],
                           tol=tol, vanish=vanish)
  excl.update(ex_o)
  include = np.zeros(k, bool)
  include[others] = inc_o
  include[train_index] = True
  return include, excl


def solve_weights(a_KxK, include, train_index: int = 0, ridge: float = 1e-10) -> np.ndarray:
  """w with w_train = 1 minimising wᵀ A w over the included terms (excluded terms: NaN)."""
  a = np.asarray(a_KxK, np.float64)
  others = [k for k in np.flatnonzero(include) if k != train_index]
  w = np.full(a.shape[0], np.nan)
  w[train_index] = 1.0
  if others:
    s = np.sqrt(np.maximum(np.diagonal(a)[others], 1e-300))
    a_oo = a[np.ix_(others, others)] / (s[:, None] * s[None, :])
    a_ot = a[others, train_index] / s
    a_oo = a_oo + ridge * max(np.trace(a_oo), 1e-300) * np.eye(len(others))
    w[others] = -np.linalg.solve(a_oo, a_ot) / s
  return w


def endpoint_fit(g_IxKxN, names, train_index: int = 0, g0_train_IxN=None, n_boot: int = 1000,
                 seed: int = 0, vanish: float = 1e-4, prior_include=None) -> dict:
  """Fit at N end points. ``g_IxKxN``: dictionary gradients at the end points; ``g0_train_IxN``:
  training gradients at the initial points (for the relative residual); ``prior_include``: the
  trajectory-based identifiability mask of ``objective_fit.alias_mask`` (optional).

  Returns ``{"w", "ci_low", "ci_high" (each [K], NaN for excluded terms), "include", "excluded",
  "rel_residual"}`` where ``rel_residual`` = Σ_i ‖Σ_k w_k ∇φ_k(θ*_i)‖² / Σ_i ‖∇L_train(θ₀_i)‖².
  """
  g = np.asarray(g_IxKxN, np.float64)
  ok = np.all(np.isfinite(g), axis=(1, 2))
  g = g[ok]
  include, excluded = exclusions(g, names, train_index, prior_include, vanish=vanish)
  a_i = np.einsum("ikn,iln->ikl", g, g)
  w = solve_weights(a_i.sum(0), include, train_index)
  n = g.shape[0]
  lo = hi = np.full_like(w, np.nan)
  if n > 1:
    rng = np.random.default_rng(seed)
    boots = np.stack([solve_weights(a_i[rng.integers(0, n, n)].sum(0), include, train_index)
                      for _ in range(n_boot)])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # excluded terms are all-NaN columns
      lo, hi = np.nanpercentile(boots, 2.5, axis=0), np.nanpercentile(boots, 97.5, axis=0)
    lo[~include], hi[~include] = np.nan, np.nan
  w0 = np.where(include, w, 0.0)
  resid = np.einsum("k,ikn->in", w0, g)
  denom = np.sum(np.asarray(g0_train_IxN, np.float64)[ok] ** 2) if g0_train_IxN is not None \
      else np.sum(g[:, train_index] ** 2)
  return {"w": w, "ci_low": lo, "ci_high": hi, "include": include, "excluded": excluded,
          "rel_residual": float(np.sum(resid ** 2) / max(denom, 1e-300)),
          "residual_ratio": residual_ratio(g, w0, train_index), "n": int(n)}


def residual_ratio(g_IxKxN, w_K, train_index: int = 0) -> float:
  """Σ_i ‖Σ_k w_k ∇φ_k(θ*_i)‖² / Σ_i ‖∇L_train(θ*_i)‖²: the fit's residual relative to the
  training-loss-only residual at the same end points (1: the other terms explain nothing; 0: the
  fitted objective is exactly stationary there)."""
  g = np.asarray(g_IxKxN, np.float64)
  w0 = np.nan_to_num(np.asarray(w_K, np.float64))
  resid = np.einsum("k,ikn->in", w0, g)
  return float(np.sum(resid ** 2) / max(np.sum(g[:, train_index] ** 2), 1e-300))


def permutation_null(g_IxKxN, include, train_index: int, perms_RxI) -> np.ndarray:
  """``residual_ratio`` of the refitted weights when each task's training gradient is paired with
  the other terms' gradients of another task (rows of ``perms_RxI``): the ratio a dictionary
  reaches by chance, without any link between the terms at the same end point."""
  g = np.asarray(g_IxKxN, np.float64)
  out = []
  for perm in np.asarray(perms_RxI):
    gp = g[perm].copy()
    gp[:, train_index] = g[:, train_index]
    a = np.einsum("ikn,iln->kl", gp, gp)
    w = solve_weights(a, include, train_index)
    out.append(residual_ratio(gp, np.where(include, w, 0.0), train_index))
  return np.asarray(out)
