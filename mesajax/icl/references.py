"""Reference in-context algorithms: what a trained sequence model may implement.

Every predictor maps one task's context and queries to query predictions,
``f(x_NxD, y_N, xq_MxD) -> yhat_M``, is pure, and is vmapped over tasks by the caller.

* K-step GD from w₀ = 0 on L(w) = 1/(2N) Σᵢ (wᵀxᵢ − yᵢ)² with step η:
  w_{k+1} = w_k + (η/N) Σᵢ (yᵢ − w_kᵀxᵢ) xᵢ, ŷ = w_Kᵀ x_q. One step: ŷ = (η/N) Σᵢ yᵢ xᵢᵀx_q.
* GD++ (von Oswald et al. 2023, §4): each step also preconditions every input,
  x ← (I − γ_k XᵀX/N) x (context and query alike, with the current X), then takes the GD step on
  the residuals. Written in token form exactly as a K-layer linear self-attention computes it:
  residual rᵢ ← rᵢ − (η_k/N) Σⱼ rⱼ xⱼᵀxᵢ and query entry q ← q − (η_k/N) Σⱼ rⱼ xⱼᵀx_q,
  ŷ = −q. With γ = 0 this is K-step GD.
* Ridge: ŵ_λ = (XᵀX + λI)⁻¹Xᵀy, by Householder QR of [X; √λ I] (``linalg.lstsq``), which at
  λ = 0 is the least-squares solution (OLS when N ≥ d; minimum-norm when N < d).
* Bayes-optimal predictor of the Gaussian prior: ridge with λ* = σ²/τ² (``data.ICLRegression``).

The GD step size is line-searched: the η minimising the mean query loss ½(ŷ − y_q)² over a fixed
sample of training tasks (a log grid, then a linear grid around its best point). GD++'s per-step
(η_k, γ_k) are fitted by Adam on fresh training tasks, starting from line-searched GD.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesajax.icl import linalg as L


def gd_pp_predict(x_NxD, y_N, xq_MxD, eta_K, gamma_K):
  """K steps of GD++ from zero (GD when ``gamma_K`` is zero); ``eta_K``, ``gamma_K``: ``[K]``."""
  n = x_NxD.shape[0]
  def layer(carry, eg):
    x, r, xq, q = carry
    eta, gamma = eg
    gram_NxN = x @ x.T
    cross_MxN = xq @ x.T
    r_new = r - (eta / n) * gram_NxN @ r
    q_new = q - (eta / n) * cross_MxN @ r
    precond_DxD = jnp.eye(x.shape[1]) - (gamma / n) * x.T @ x
    return (x @ precond_DxD.T, r_new, xq @ precond_DxD.T, q_new), None
  carry = (x_NxD, y_N, xq_MxD, jnp.zeros(xq_MxD.shape[0], x_NxD.dtype))
  (_, _, _, q), _ = jax.lax.scan(layer, carry, (jnp.asarray(eta_K), jnp.asarray(gamma_K)))
  return -q


def gd_predict(x_NxD, y_N, xq_MxD, eta, num_steps: int = 1):
  """``num_steps`` of GD from zero with step ``eta`` (module docstring)."""
  eta_K = jnp.full((num_steps,), eta, x_NxD.dtype)
  return gd_pp_predict(x_NxD, y_N, xq_MxD, eta_K, jnp.zeros_like(eta_K))


def ridge_weights(x_NxD, y_N, lam_L):
  """Ridge weights for every λ in ``lam_L``: ``[L, D]`` (λ = 0: least squares, minimum-norm when
  N < d). Householder QR in plain XLA operations (``linalg.lstsq``), not LAPACK: see
  ``mesajax.icl.linalg`` for the XLA:CPU deadlock that batched LAPACK calls cause in jaxlib 0.10."""
  lam_L = jnp.atleast_1d(jnp.asarray(lam_L, x_NxD.dtype))
  return jax.vmap(lambda lam: L.lstsq(x_NxD, y_N, lam))(lam_L)


def ridge_predict(x_NxD, y_N, xq_MxD, lam):
  """Ridge prediction with penalty ``lam`` (scalar): ``[M]``."""
  return xq_MxD @ ridge_weights(x_NxD, y_N, jnp.asarray(lam, x_NxD.dtype))[0]


def ridge_grid_predict(x_NxD, y_N, xq_MxD, lam_L):
  """Ridge predictions for every λ of a grid: ``[L, M]``."""
  return ridge_weights(x_NxD, y_N, lam_L) @ xq_MxD.T


def ols_predict(x_NxD, y_N, xq_MxD):
  """Ordinary (minimum-norm) least squares: ridge at λ = 0."""
  return ridge_predict(x_NxD, y_N, xq_MxD, 0.0)


def ridge_grid(lo: float = 1e-3, hi: float = 1e3, num: int = 61) -> np.ndarray:
  """The λ grid of the analyses: 0 followed by ``num`` log-spaced values in [lo, hi]."""
  return np.concatenate([[0.0], np.logspace(np.log10(lo), np.log10(hi), num)])


# --- fitting the step sizes --------------------------------------------------------------------
def _query_loss(pred_fn, tasks):
  yhat_BxM = jax.vmap(pred_fn)(tasks["x_NxD"], tasks["y_N"], tasks["xq_MxD"])
  return 0.5 * jnp.mean(jnp.square(yhat_BxM - tasks["yq_M"]))


@functools.partial(jax.jit, static_argnums=(1,))
def _gd_losses(tasks, num_steps, eta_G):
  return jax.vmap(lambda eta: _query_loss(
      lambda x, y, q: gd_predict(x, y, q, eta, num_steps), tasks))(eta_G)


def line_search_gd(family, num_steps: int = 1, key=None, num_tasks: int = 4096) -> float:
  """The step size of K-step GD from zero minimising the mean query loss on ``num_tasks`` tasks of
  ``family`` (log grid 1e-3..1e2, then 101 points within ±20% of its best). Deterministic."""
  key = jax.random.PRNGKey(12345) if key is None else key
  tasks = family.sample_batch(key, num_tasks)
  coarse = np.logspace(-3, 2, 101)
  loss = np.asarray(_gd_losses(tasks, num_steps, jnp.asarray(coarse, jnp.float32)))
  loss = np.where(np.isfinite(loss), loss, np.inf)
  best = coarse[int(np.argmin(loss))]
  fine = np.linspace(best / 1.2, best * 1.2, 101)
  loss = np.asarray(_gd_losses(tasks, num_steps, jnp.asarray(fine, jnp.float32)))
  loss = np.where(np.isfinite(loss), loss, np.inf)
  return float(fine[int(np.argmin(loss))])


def fit_gd_pp(family, num_steps: int, key=None, iters: int = 400, batch: int = 1024,
              lr: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
  """Per-step (η_k, γ_k) of K-step GD++ fitted by Adam on fresh tasks of ``family`` (query loss),
  starting from line-searched GD (γ = 0). Returns ``(eta_K, gamma_K)``; deterministic in ``key``."""
  key = jax.random.PRNGKey(54321) if key is None else key
  eta0 = line_search_gd(family, num_steps, key)
  params = {"log_eta": jnp.full((num_steps,), np.log(eta0), jnp.float32),
            "gamma": jnp.zeros((num_steps,), jnp.float32)}
  opt = optax.adam(lr)

  def loss(p, tasks):
    return _query_loss(lambda x, y, q: gd_pp_predict(x, y, q, jnp.exp(p["log_eta"]), p["gamma"]),
                       tasks)

  @jax.jit
  def run(params, key):
    def step(carry, k):
      p, s = carry
      l, g = jax.value_and_grad(loss)(p, family.sample_batch(k, batch))
      g = jax.tree.map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0), g)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), l
    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, iters))
    return p

  p = run(params, jax.random.fold_in(key, 1))
  return np.exp(np.asarray(p["log_eta"])), np.asarray(p["gamma"])
