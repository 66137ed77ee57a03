"""Holding an in-context learner against reference algorithms: agreement metrics and the implied
inner objective. Pure functions over one task, vmapped over tasks (and seeds) and jitted.

For a model A₁ and a reference A₂ on a context D = (X, y) and queries x_q (von Oswald et al. 2023,
§3; Akyürek et al. 2022, §4):

* loss: ½ mean_q (A(D)(x_q) − y_q)² (the training loss; "loss ratio" = loss(model)/loss(ref)).
* pred_diff: mean_q |A₁(D)(x_q) − A₂(D)(x_q)|.
* sensitivities s_A = ∂A(D)(x_q)/∂x_q ∈ R^d: sens_cos = cos(s_A₁, s_A₂) and
  sens_diff = ‖s_A₁ − s_A₂‖ (mean over queries). A reference whose sensitivity is zero has no
  direction: its cosine is undefined (NaN per task, reported with a reason).
* SPD (squared prediction difference) = mean_q (A₁(D)(x_q) − A₂(D)(x_q))².
* ILWD (implicit linear weight difference) = ‖ŵ₁ − ŵ₂‖ where ŵ_A is the least-squares fit of
  A(D)(x_q) on the M probe queries x_q (defined when M ≥ d).
* implied ridge penalty λ̂ = argmin_λ E SPD(model, ridge_λ) over the grid ``references.ridge_grid``,
  beside the Bayes value λ* = σ²/τ² (Akyürek et al. find λ̂ ≈ λ* for trained transformers).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.icl import references as R

Predictor = Callable  # f(x_NxD, y_N, xq_MxD) -> yhat_M


def _sensitivities(f: Predictor, x_NxD, y_N, xq_MxD):
  """∂f/∂x_q at every query: ``[M, D]`` (each query's prediction depends on its own x_q only)."""
  return jax.vmap(jax.grad(lambda q: f(x_NxD, y_N, q[None])[0]))(xq_MxD)


def _cos(a_MxD, b_MxD):
  na, nb = jnp.linalg.norm(a_MxD, axis=-1), jnp.linalg.norm(b_MxD, axis=-1)
  ok = (na > 1e-12) & (nb > 1e-12)
  cos = jnp.sum(a_MxD * b_MxD, -1) / jnp.where(ok, na * nb, 1.0)
  return jnp.mean(jnp.where(ok, cos, jnp.nan))


def implied_weights(yhat_M, xq_MxD):
  """ŵ: least-squares linear fit of predictions on the probe queries (min-norm if M < d)."""
  return jnp.linalg.pinv(xq_MxD) @ yhat_M


def pair_metrics(f1: Predictor, f2: Predictor, x_NxD, y_N, xq_MxD) -> dict:
  """Agreement of two predictors on one task (module docstring)."""
  p1, p2 = f1(x_NxD, y_N, xq_MxD), f2(x_NxD, y_N, xq_MxD)
  s1, s2 = _sensitivities(f1, x_NxD, y_N, xq_MxD), _sensitivities(f2, x_NxD, y_N, xq_MxD)
  return {
      "pred_diff": jnp.mean(jnp.abs(p1 - p2)),
      "spd": jnp.mean(jnp.square(p1 - p2)),
      "sens_cos": _cos(s1, s2),
      "sens_diff": jnp.mean(jnp.linalg.norm(s1 - s2, axis=-1)),
      "ilwd": jnp.linalg.norm(implied_weights(p1, xq_MxD) - implied_weights(p2, xq_MxD)),
  }


def query_loss(f: Predictor, task) -> jax.Array:
  return 0.5 * jnp.mean(jnp.square(f(task["x_NxD"], task["y_N"], task["xq_MxD"]) - task["yq_M"]))


def rolled(f: Predictor) -> Predictor:
  """The shuffled-context null: ``f`` sees the context labels rolled by one (yᵢ paired with x_{i+1},
  a fixed derangement), so the x–y pairing it could use is destroyed."""
  return lambda x, y, q: f(x, jnp.roll(y, 1), q)


def evaluate_models(model_fn, params_S, refs: dict, tasks, lam_L, model_variants=None) -> dict:
  """Every metric for every (seed, task), as numpy arrays (``make_evaluator``, called once)."""
  return make_evaluator(model_fn, refs, lam_L, model_variants)(params_S, tasks)


def make_evaluator(model_fn, refs: dict, lam_L, model_variants=None):
  """``evaluate(params_S, tasks) -> dict``, jitted once (reuse it for several parameter sets of
  the same shapes, e.g. trained and untrained).

  ``model_fn(params, x, y, xq)``; ``params_S`` has a leading seed axis; ``refs`` maps names to
  predictors; ``model_variants`` maps names to wrappers of a predictor (e.g. ``rolled``).
  Returns ``{"loss": {who: [S, T]}, "pairs": {"who|ref": {metric: [S, T]}},
  "spd_grid": {who: [S, T, L]}, "ref_loss": {ref: [T]}}``; ``who`` is "model" or a variant.
  """
  variants = {"model": lambda f: f, **(model_variants or {})}
  lam_L = jnp.asarray(lam_L, jnp.float32)

  def per_seed(params, task):
    base = lambda x, y, q: model_fn(params, x, y, q)
    out = {"loss": {}, "pairs": {}, "spd_grid": {}}
    for who, wrap in variants.items():
      f = wrap(base)
      out["loss"][who] = query_loss(f, task)
      for name, g in refs.items():
        out["pairs"][f"{who}|{name}"] = pair_metrics(f, g, task["x_NxD"], task["y_N"],
                                                     task["xq_MxD"])
      pred_M = f(task["x_NxD"], task["y_N"], task["xq_MxD"])
      ridge_LxM = R.ridge_grid_predict(task["x_NxD"], task["y_N"], task["xq_MxD"], lam_L)
      out["spd_grid"][who] = jnp.mean(jnp.square(ridge_LxM - pred_M[None]), axis=1)
    return out

  def ref_losses(task):
    return {name: query_loss(g, task) for name, g in refs.items()}

  @jax.jit
  def run(params_S, tasks):
    per = jax.vmap(lambda p: jax.vmap(lambda t: per_seed(p, t))(tasks))(params_S)
    return per, jax.vmap(ref_losses)(tasks)

  def evaluate(params_S, tasks):
    per, ref_loss = jax.device_get(run(params_S, tasks))
    per["ref_loss"] = ref_loss
    return jax.tree.map(np.asarray, per)
  return evaluate


def lambda_hat(spd_SxTxL: np.ndarray, lam_L: np.ndarray, n_boot: int = 1000, seed: int = 0):
  """λ̂ = the grid λ minimising mean SPD(model, ridge_λ): pooled over seeds and tasks with a
  percentile-bootstrap CI over (seed, task) pairs, and per seed. Returns
  ``(value, lo, hi, per_seed_S, at_edge)``; ``at_edge`` flags an argmin at the grid's largest λ
  (the true minimiser may lie beyond the grid)."""
  s, t, l = spd_SxTxL.shape
  flat = spd_SxTxL.reshape(s * t, l)
  finite = np.all(np.isfinite(flat), axis=1)
  flat = flat[finite]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, flat.shape[0], size=(n_boot, flat.shape[0]))
  # Sum of resampled rows via counts (one matrix product).
  counts = np.zeros((n_boot, flat.shape[0]))
  np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
  boot = lam_L[np.argmin(counts @ flat, axis=1)]
  k = int(np.argmin(flat.mean(0)))
  per_seed = lam_L[np.argmin(np.nanmean(spd_SxTxL, axis=1), axis=1)]
  lo, hi = np.quantile(boot, [0.025, 0.975])
  return float(lam_L[k]), float(lo), float(hi), per_seed, k == l - 1
