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
  Undefined when the SPD curve is flat in λ (its range at most ``FLAT_RTOL`` of its maximum).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.icl import references as R
from mesajax.icl.linalg import lstsq

Predictor = Callable  # f(x_NxD, y_N, xq_MxD) -> yhat_M


def _sensitivities(f: Predictor, x_NxD, y_N, xq_MxD):
  """∂f/∂x_q at every query: ``[M, D]`` (each query's prediction depends on its own x_q only)."""
  return jax.vmap(jax.grad(lambda q: f(x_NxD, y_N, q[None])[0]))(xq_MxD)


def _cos(a_MxD, b_MxD):
  na, nb = jnp.linalg.norm(a_MxD, axis=-1), jnp.linalg.norm(b_MxD, axis=-1)
  ok = (na > 1e-12) & (nb > 1e-12)
  cos = jnp.sum(a_MxD * b_MxD, -1) / jnp.where(ok, na * nb, 1.0)
  return jnp.mean(jnp.where(ok, cos, jnp.nan))


def query_pinv(xq_MxD):
  """pinv(x_q) ``[D, M]`` (least squares; minimum-norm when M < d), by ``linalg.lstsq``."""
  return lstsq(xq_MxD, jnp.eye(xq_MxD.shape[0], dtype=xq_MxD.dtype))


def implied_weights(yhat_M, xq_MxD):
  """ŵ: least-squares linear fit of predictions on the probe queries (min-norm if M < d)."""
  return query_pinv(xq_MxD) @ yhat_M


def outputs(f: Predictor, x_NxD, y_N, xq_MxD, pinv_DxM=None):
  """``(predictions [M], sensitivities [M, D], implied weights ŵ [D])`` of one predictor on one
  task; ``pinv_DxM`` = pinv(x_q) may be passed in to share it between predictors."""
  pinv_DxM = query_pinv(xq_MxD) if pinv_DxM is None else pinv_DxM
  pred_M = f(x_NxD, y_N, xq_MxD)
  return pred_M, _sensitivities(f, x_NxD, y_N, xq_MxD), pinv_DxM @ pred_M


def compare(out1, out2) -> dict:
  """Agreement (module docstring) of two predictors' ``outputs`` on the same task."""
  (p1, s1, w1), (p2, s2, w2) = out1, out2
  return {
      "pred_diff": jnp.mean(jnp.abs(p1 - p2)),
      "spd": jnp.mean(jnp.square(p1 - p2)),
      "sens_cos": _cos(s1, s2),
      "sens_diff": jnp.mean(jnp.linalg.norm(s1 - s2, axis=-1)),
      "ilwd": jnp.linalg.norm(w1 - w2),
  }


def pair_metrics(f1: Predictor, f2: Predictor, x_NxD, y_N, xq_MxD) -> dict:
  """Agreement of two predictors on one task (module docstring)."""
  return compare(outputs(f1, x_NxD, y_N, xq_MxD), outputs(f2, x_NxD, y_N, xq_MxD))


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

  # Each predictor's outputs are computed once per task (not once per pair): the program holds
  # one copy of the model's forward and backward pass per variant and one per reference.
  def ref_outputs(task):
    x, y, q = task["x_NxD"], task["y_N"], task["xq_MxD"]
    pinv_DxM = query_pinv(q)
    outs = {name: outputs(g, x, y, q, pinv_DxM) for name, g in refs.items()}
    ridge_LxM = R.ridge_grid_predict(x, y, q, lam_L)
    loss = {name: 0.5 * jnp.mean(jnp.square(o[0] - task["yq_M"])) for name, o in outs.items()}
    return outs, ridge_LxM, loss, pinv_DxM

  def per_seed(params, task, ref_out):
    outs_ref, ridge_LxM, _, pinv_DxM = ref_out
    x, y, q = task["x_NxD"], task["y_N"], task["xq_MxD"]
    base = lambda x, y, q: model_fn(params, x, y, q)
    out = {"loss": {}, "pairs": {}, "spd_grid": {}}
    for who, wrap in variants.items():
      o = outputs(wrap(base), x, y, q, pinv_DxM)
      out["loss"][who] = 0.5 * jnp.mean(jnp.square(o[0] - task["yq_M"]))
      for name, o_ref in outs_ref.items():
        out["pairs"][f"{who}|{name}"] = compare(o, o_ref)
      out["spd_grid"][who] = jnp.mean(jnp.square(ridge_LxM - o[0][None]), axis=1)
    return out

  @jax.jit
  def run(params_S, tasks):
    ref_out = jax.vmap(ref_outputs)(tasks)
    per = jax.vmap(lambda p: jax.vmap(lambda t, r: per_seed(p, t, r))(tasks, ref_out))(params_S)
    return per, ref_out[2]

  def evaluate(params_S, tasks):
    per, ref_loss = jax.device_get(run(params_S, tasks))
    per["ref_loss"] = ref_loss
    return jax.tree.map(np.asarray, per)
  evaluate.run = run  # the jitted program (for inspection, e.g. ``run.lower(...)``)
  return evaluate


# λ̂ is undefined when the SPD curve is flat in λ: every ridge_λ predicts (almost) the same, e.g.
# queries orthogonal to the context, where every ridge predicts 0, so no λ is closer to the model.
FLAT_RTOL = 1e-3


def spd_flat(curve_L, rtol: float = FLAT_RTOL) -> bool:
  """True when the mean SPD curve varies by at most ``rtol`` of its own scale over the grid:
  max_λ SPD − min_λ SPD ≤ rtol · max_λ SPD (a curve that is 0 everywhere is flat)."""
  c = np.asarray(curve_L, np.float64)
  if not np.all(np.isfinite(c)):
    return False
  return bool(np.max(c) - np.min(c) <= rtol * np.max(c))


class LambdaHat(NamedTuple):
  value: float | None       # pooled λ̂ (None when undefined)
  lo: float | None          # percentile-bootstrap CI over (seed, task) pairs
  hi: float | None
  per_seed: list            # per-seed λ̂ (None where that seed's curve is flat)
  at_edge: bool             # argmin at the grid's largest λ (the minimiser may lie beyond)
  undefined: str | None     # why λ̂ is undefined, else None


def lambda_hat(spd_SxTxL: np.ndarray, lam_L: np.ndarray, n_boot: int = 1000, seed: int = 0,
               rtol: float = FLAT_RTOL) -> LambdaHat:
  """λ̂ = the grid λ minimising mean SPD(model, ridge_λ): pooled over seeds and tasks with a
  percentile-bootstrap CI over (seed, task) pairs, and per seed.

  Undefined (value None, with a reason) when the pooled curve is flat in λ (``spd_flat``: its
  range over the grid is at most ``rtol`` = 10⁻³ of its maximum), or when no task has a finite
  curve; a seed whose own curve is flat gets None in ``per_seed``."""
  s, t, l = spd_SxTxL.shape
  flat = spd_SxTxL.reshape(s * t, l)
  flat = flat[np.all(np.isfinite(flat), axis=1)]
  if flat.shape[0] == 0:
    return LambdaHat(None, None, None, [None] * s, False, "no task has a finite SPD curve")
  curve = flat.mean(0)
  seed_curves = np.nanmean(spd_SxTxL, axis=1)
  per_seed = [None if spd_flat(c, rtol) else float(lam_L[int(np.argmin(c))]) for c in seed_curves]
  if spd_flat(curve, rtol):
    rel = (curve.max() - curve.min()) / curve.max() if curve.max() > 0 else 0.0
    return LambdaHat(None, None, None, per_seed, False,
                     f"SPD(model, ridge_λ) is flat in λ (range/max = {rel:.1e} <= {rtol:g}): no "
                     f"ridge_λ is measurably closer to the model than another (all ridges "
                     f"predict alike here, or the model is far from every one)")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, flat.shape[0], size=(n_boot, flat.shape[0]))
  # Sum of resampled rows via counts (one matrix product).
  counts = np.zeros((n_boot, flat.shape[0]))
  np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
  boot = lam_L[np.argmin(counts @ flat, axis=1)]
  k = int(np.argmin(curve))
  lo, hi = np.quantile(boot, [0.025, 0.975])
  return LambdaHat(float(lam_L[k]), float(lo), float(hi), per_seed, k == l - 1, None)
