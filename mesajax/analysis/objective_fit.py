"""Implicit objective fit: which combination of candidate objectives do the updates descend?

Along a trajectory θ_0, …, θ_T with updates u_t = θ_{t+1} − θ_t, fit

  u_t ≈ −η_t · M · Σ_k w_k ∇φ_k(θ_t)        (φ_k from ``dictionary``; η_t > 0 on average)

with a per-step scale η_t, a constant positive diagonal metric M (mean 1) and weights w, by
alternating least squares (each block in closed form): η_t = −⟨u_t, M g_t⟩ / ‖M g_t‖² with
g_t = Σ_k w_k ∇φ_k(θ_t); M_i = −Σ_t η_t u_ti g_ti / Σ_t η_t² g_ti² (floored at 1e-3·max, rescaled
to mean 1); w by ridge-stabilised least squares on the stacked (t, i) rows. Columns are scaled to
unit RMS for the solve. Fixed iteration count (jittable, vmappable over tasks), run from two
starts — w = e_train_loss, and a rank-1 initialisation (per-step least squares c_t with
u_t ≈ −G_t c_t, then the top right singular vector of [c_t]) — keeping the better R².

Reported: normalised weights w / |w_train_loss| (so w:train_loss = ±1; sign convention η̄ > 0, so
−1 means the updates *ascend* the training loss) when |w_train_loss| is not negligible (≥ 1e-3 of
the largest scaled weight), else w divided by the largest-magnitude weight; the raw weights
w / ‖w‖₂ (same sign convention); each term's share of the fitted gradient,
|w_k|·RMS_t‖∇φ_k‖ / Σ_j |w_j|·RMS_t‖∇φ_j‖ (weights of terms with tiny gradients can be huge and
still matter little); R² = 1 − Σ‖u_t − û_t‖² / Σ‖u_t‖² (uncentred: the model has no
intercept); R² of the training-loss-only model (same η_t and M) as the baseline any extra term
must beat; and the condition number of the dictionary's Gram matrix G_kl = Σ_t ⟨∇φ_k, ∇φ_l⟩ in
correlation form (unit diagonal) over the included terms.

Terms whose gradients are (numerically) linear combinations of earlier terms over the pooled
trajectories — e.g. ``outer_loss`` when the family's outer loss *is* its training loss, or
``l2_init`` when θ₀ = 0 — are not identifiable: ``alias_mask`` drops them (reported as aliased)
instead of splitting the weight arbitrarily.

Known answers: gradient descent gives w = (1, 0, …) with R² = 1; gradient descent with weight decay
λ gives w:l2 = λ. With the central-difference velocity (θ_{t+1} − θ_{t−1})/2 instead of u_t,
gradient descent with step h picks up w:grad_norm_sq ≈ h/2, i.e. the implicit regulariser
(h/4)‖∇L‖² of Barrett & Dherin (2021, "Implicit Gradient Regularization"), with higher-order bias at
larger h. Identifiability caveats: Cao, Cohen & Szpruch (2021); Keshavarz, Wang & Boyd (2011).

Cost: the dictionary gradients at every trajectory point (K gradients + 1 HVP per point); the fit
itself is O(iters · T · n · K²).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def displacements(thetas_T1xN: Array, scheme: str = "forward") -> tuple[Array, Array]:
  """(velocity rows, index of the point they belong to): ``forward`` u_t = θ_{t+1} − θ_t at
  t = 0..T−1; ``central`` (θ_{t+1} − θ_{t−1}) / 2 at t = 1..T−1."""
  if scheme == "forward":
    return thetas_T1xN[1:] - thetas_T1xN[:-1], jnp.arange(thetas_T1xN.shape[0] - 1)
  if scheme == "central":
    return 0.5 * (thetas_T1xN[2:] - thetas_T1xN[:-2]), jnp.arange(1, thetas_T1xN.shape[0] - 1)
  raise ValueError(f"unknown velocity scheme {scheme!r}; use 'forward' or 'central'")


def gram(g_TxKxN: Array) -> tuple[Array, Array]:
  """(correlation-form Gram matrix [K, K], RMS norm of each term's gradient [K])."""
  g_kk = jnp.einsum("tkn,tln->kl", g_TxKxN, g_TxKxN)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g_kk), 0.0))
  safe = jnp.where(norms > 0, norms, 1.0)
  return g_kk / (safe[:, None] * safe[None, :]), norms / jnp.sqrt(g_TxKxN.shape[0])


def alias_mask(corr_KxK, norms_K, names, tol: float = 1e-4, vanish: float = 1e-6):
  """Host-side greedy selection of identifiable terms, in dictionary order.

  ``corr_KxK`` is the task-averaged correlation Gram matrix, ``norms_K`` the task-averaged gradient
  RMS. A term is ``vanishing`` when its RMS is below ``vanish``·max, ``aliased`` with an earlier
  included term when 1 − c_Sᵀ C_SS⁻¹ c_S < ``tol`` (its gradient is, to that precision, in the span
  of the included ones). Returns ``(include bool[K], {name: reason})``.
  """
  c = np.asarray(corr_KxK, np.float64)
  nrm = np.asarray(norms_K, np.float64)
  include, excluded, chosen = np.zeros(len(names), bool), {}, []
  top = np.max(nrm) if nrm.size else 0.0
  for k, name in enumerate(names):
    if not np.isfinite(nrm[k]) or nrm[k] <= vanish * top:
      excluded[name] = "vanishing"
      continue
    if chosen:
      c_ss = c[np.ix_(chosen, chosen)]
      c_s = c[chosen, k]
      resid = 1.0 - c_s @ np.linalg.lstsq(c_ss, c_s, rcond=None)[0]
      if resid < tol:
        j = chosen[int(np.argmax(np.abs(c_s)))]
        excluded[name] = f"aliased:{names[j]}"
        continue
    chosen.append(k)
    include[k] = True
  return include, excluded


def _init_weights(u_TxN, gs_TxKxN, inc, ridge):
  """Rank-1 initialisation: per-step least squares c_t = argmin ‖u_t + G_tᵀc‖² (c_t = η_t w for an
  exact model), then w = the top right singular vector of C = [c_t] (sign: mean η > 0)."""
  k = gs_TxKxN.shape[1]
  g = gs_TxKxN * inc[None, :, None]
  a = jnp.einsum("tkn,tln->tkl", g, g)
  reg = (ridge + 1e-6) * jnp.trace(a, axis1=1, axis2=2)[:, None, None] / k + 1e-30
  a = a + reg * jnp.eye(k)[None] + jnp.diag(1.0 - inc)[None]
  c_TxK = -jnp.linalg.solve(a, jnp.einsum("tkn,tn->tk", g, u_TxN)[..., None])[..., 0]
  _, _, vt = jnp.linalg.svd(c_TxK, full_matrices=False)
  w = vt[0] * inc
  return w * jnp.where(jnp.sum(c_TxK @ w) < 0, -1.0, 1.0)


def _als(u_TxN, gs_TxKxN, inc, n_iter, fit_metric, ridge, w):
  t, k, n = gs_TxKxN.shape
  m = jnp.ones((n,), u_TxN.dtype)
  tiny = 1e-30

  def eta_of(w, m):
    mg = m * jnp.einsum("k,tkn->tn", w, gs_TxKxN)
    return -jnp.sum(u_TxN * mg, axis=1) / (jnp.sum(mg * mg, axis=1) + tiny), mg

  def body(_, carry):
    w, m = carry
    eta, _ = eta_of(w, m)
    if fit_metric:
      g = jnp.einsum("k,tkn->tn", w, gs_TxKxN)
      num = -jnp.sum(eta[:, None] * u_TxN * g, axis=0)
      den = jnp.sum((eta[:, None] * g) ** 2, axis=0) + tiny
      m = num / den
      m = jnp.maximum(m, 1e-3 * jnp.max(m))
      m = m / jnp.mean(m)
      m = jnp.where(jnp.all(jnp.isfinite(m)) & (jnp.max(m) > 0), m, jnp.ones_like(m))
      eta, _ = eta_of(w, m)
    x = -(eta[:, None, None] * m[None, None, :]) * gs_TxKxN  # [T, K, N]
    xtx = jnp.einsum("tkn,tln->kl", x, x)
    xtu = jnp.einsum("tkn,tn->k", x, u_TxN)
    reg = ridge * jnp.trace(xtx) / k + tiny
    a = xtx * inc[:, None] * inc[None, :] + jnp.diag(reg + (1.0 - inc))
    w = jnp.linalg.solve(a, xtu * inc)
    w = w / jnp.maximum(jnp.linalg.norm(w), tiny)
    return w, m

  w, m = jax.lax.fori_loop(0, n_iter, body, (w, m))
  eta, mg = eta_of(w, m)
  sign = jnp.where(jnp.mean(eta) < 0, -1.0, 1.0)
  pred = -eta[:, None] * mg
  r2 = 1.0 - jnp.sum((u_TxN - pred) ** 2) / jnp.maximum(jnp.sum(u_TxN ** 2), tiny)
  return w * sign, eta * sign, m, r2


def fit_objective(u_TxN: Array, g_TxKxN: Array, include_K: Array, train_index: int = 0,
                  n_iter: int = 100, fit_metric: bool = True, ridge: float = 1e-8) -> dict:
  """ALS fit of u_t ≈ −η_t M Σ_k w_k ∇φ_k(θ_t) for one task (see module docstring).

  Args: updates ``[T, n]``, dictionary gradients ``[T, K, n]`` at the same points, the boolean mask
  of identifiable terms ``[K]``, the index of ``train_loss``. Returns a dict of arrays: ``w`` (raw,
  unit norm), ``w_norm`` (normalised), ``normalised_by_train``, ``eta`` [T] (the step scale for
  ``w_norm``: u_t ≈ −η_t M Σ_k w_norm_k ∇φ_k), ``share`` (each term's share |w_k|·RMS‖∇φ_k‖ / Σ of
  the fitted gradient: readable when terms have very different scales), ``metric`` [n],
  ``metric_cond``, ``r2``, ``r2_train_only``, ``gram_cond``.
  """
  include_K = jnp.asarray(include_K, bool)
  corr, norms = gram(g_TxKxN)
  scale = jnp.where(norms > 0, norms, 1.0)
  gs = g_TxKxN / scale[None, :, None]
  k = g_TxKxN.shape[1]
  init_k = jnp.where(include_K[train_index], train_index, jnp.argmax(include_K))
  inc = include_K.astype(u_TxN.dtype)
  w_one = jax.nn.one_hot(init_k, k, dtype=u_TxN.dtype)
  w_svd = _init_weights(u_TxN, gs, inc, ridge)
  w_svd = jnp.where(jnp.all(jnp.isfinite(w_svd)) & (jnp.linalg.norm(w_svd) > 0), w_svd, w_one)
  # One vmapped ALS over three runs: (full dictionary, start e_train), (full, rank-1 start),
  # (training loss only, start e_train); the full fit keeps the better of its two starts.
  incs = jnp.stack([inc, inc, w_one])
  starts = jnp.stack([w_one, w_svd, w_one])
  ws3, eta3, m3, r23 = jax.vmap(
      lambda i, w0: _als(u_TxN, gs, i, n_iter, fit_metric, ridge, w0))(incs, starts)
  r2_ok = jnp.nan_to_num(r23, nan=-jnp.inf)
  best = jnp.where(r2_ok[1] > r2_ok[0], 1, 0)
  ws, eta, m, r2, r2_train = ws3[best], eta3[best], m3[best], r23[best], r23[2]
  w = ws / scale
  w_raw = w / jnp.maximum(jnp.linalg.norm(w), 1e-30)
  by_train = include_K[train_index] & (jnp.abs(ws[train_index]) >= 1e-3 * jnp.max(jnp.abs(ws)))
  ref = jnp.where(by_train, jnp.abs(w[train_index]), w[jnp.argmax(jnp.abs(ws))])
  inc = include_K.astype(corr.dtype)
  c_inc = corr * inc[:, None] * inc[None, :] + jnp.diag(1.0 - inc)
  ev = jnp.linalg.eigvalsh(c_inc)
  return {"w": w_raw, "w_norm": w / ref, "normalised_by_train": by_train, "eta": eta * ref,
          "share": jnp.abs(ws) / jnp.maximum(jnp.sum(jnp.abs(ws)), 1e-30),
          "metric": m, "metric_cond": jnp.max(m) / jnp.min(m), "r2": r2, "r2_train_only": r2_train,
          "gram_cond": ev[-1] / jnp.maximum(ev[0], 1e-30)}
