"""Inner–outer alignment along a trajectory: does each update also descend the outer objective?

For a trajectory θ_0..θ_T with updates u_t = θ_{t+1} − θ_t (full-batch), per task:

  cos_u_neg_outer_grad   mean_t cos(u_t, −∇L_outer(θ_t))      (also for L_train, and over the last
                                                             quarter of the steps: ``_late``)
  descent_ratio          Σ_t⟨u_t, ∇L_outer⟩ / Σ_t⟨u_t, ∇L_train⟩   (1: the update's first-order
                         progress on the outer loss equals that on the training loss; < 0: it
                         climbs the outer loss while descending the training loss); ``_late``: the
                         same sums over the last quarter of the steps
  frac_outer_descent     fraction of steps with L_outer(θ_{t+1}) ≤ L_outer(θ_t)(1 + tie_rtol): ties
                         (a converged run repeats its loss) count as descent, not ascent
  divergence_step        t_div = argmin_t L_outer(θ_t) when, from there to the end, the outer loss
                         rises, L_outer(θ_T) > L_outer(θ_tdiv) + 0.01·(L_outer(θ_0) −
                         L_outer(θ_tdiv)),
                         while the fitted implicit objective Φ_w = Σ_k w_k φ_k (``objective_fit``
                         weights of the same task) falls, Φ_w(θ_T) < Φ_w(θ_tdiv); NaN (null) if not.
                         (The suite sets it undefined where a weight of the task is not
                         identifiable with the metric free: ``stages._phi_undefined``.)

Known answer: gradient descent on the training loss of an over-parameterised noisy regression has
cos(u, −∇L_train) = 1 while the descent ratio turns negative late and a divergence step exists
(classic overfitting; the same signature as goal misgeneralisation, Langosco et al. 2022).
Cost: the outer and training gradients at each trajectory point (shared with the objective fit).
"""
from __future__ import annotations

import warnings

import numpy as np


def _cos_rows(a_TxN, b_TxN):
  num = np.sum(a_TxN * b_TxN, axis=1)
  den = np.sqrt(np.sum(a_TxN ** 2, axis=1) * np.sum(b_TxN ** 2, axis=1))
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def cos_mean(u_TxN, g_TxN) -> float:
  """mean_t cos(u_t, −g_t) over the steps where both are non-zero."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return float(np.nanmean(_cos_rows(np.asarray(u_TxN, np.float64), -np.asarray(g_TxN, np.float64))))


def descent_ratio(u_TxN, g_outer_TxN, g_train_TxN) -> float:
  """Σ_t⟨u_t, ∇L_outer⟩ / Σ_t⟨u_t, ∇L_train⟩ (NaN when the denominator is 0)."""
  den = np.sum(np.asarray(u_TxN) * np.asarray(g_train_TxN))
  return float(np.sum(np.asarray(u_TxN) * np.asarray(g_outer_TxN)) / den) if den != 0 else np.nan


def alignment(u_TxN, g_train_TxN, g_outer_TxN, outer_T1, phi_T1, rel_tol: float = 0.01,
              tie_rtol: float = 1e-6) -> dict:
  """Alignment metrics of one trajectory (host numpy). ``outer_T1``, ``phi_T1``: the outer loss and
  the fitted implicit objective at θ_0..θ_T (T+1 values); the gradients at θ_0..θ_{T−1}."""
  u = np.asarray(u_TxN, np.float64)
  gt = np.asarray(g_train_TxN, np.float64)
  go = np.asarray(g_outer_TxN, np.float64)
  lo = np.asarray(outer_T1, np.float64)
  phi = np.asarray(phi_T1, np.float64)
  t = u.shape[0]
  late = slice(t - max(1, t // 4), t)
  dot_o = np.sum(u * go, axis=1)
  dot_t = np.sum(u * gt, axis=1)

  def ratio(sl):
    den = np.sum(dot_t[sl])
    return np.sum(dot_o[sl]) / den if den != 0 else np.nan

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # zero updates give NaN cosines, skipped
    cos_o, cos_t = _cos_rows(u, -go), _cos_rows(u, -gt)
    cos_o_mean, cos_t_mean = np.nanmean(cos_o), np.nanmean(cos_t)
    cos_o_late = np.nanmean(cos_o[late])
  t_div = int(np.argmin(lo)) if np.all(np.isfinite(lo)) else -1
  div = np.nan
  if t_div >= 0 and t_div < t:
    rises = lo[-1] > lo[t_div] + rel_tol * (lo[0] - lo[t_div])
    falls = phi[-1] < phi[t_div]
    if rises and falls:
      div = float(t_div)
  return {
      "cos_u_neg_outer_grad": cos_o_mean,
      "cos_u_neg_outer_grad_late": cos_o_late,
      "cos_u_neg_train_grad": cos_t_mean,
      "descent_ratio": ratio(slice(0, t)),
      "descent_ratio_late": ratio(late),
      # A step descends unless it raises L_outer by more than the tie tolerance: losses of converged
      # runs repeat (or jitter in the last float32 digits) and a strict < counted those as ascent.
      "frac_outer_descent": float(np.mean(lo[1:] <= lo[:-1] + tie_rtol * np.abs(lo[:-1]))),
      "divergence_step": div,
      "diverged": float(np.isfinite(div)),
  }
