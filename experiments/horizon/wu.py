"""Closed-form expected loss of constant-learning-rate SGD on a noisy quadratic (Wu et al. 2018,
"Understanding short-horizon bias in stochastic meta-optimization", ICLR, §3), the independent
reference of the horizon experiment's known answer.

Task (``mesajax/tasks/quadratic.py``): f(θ) = ½(θ − θ*)ᵀA(θ − θ*), A = Q diag(h) Qᵀ, gradient
A(θ − θ*) + σξ with ξ ~ N(0, I) fresh each step. In the eigenbasis, z = Qᵀ(θ − θ*) evolves per
coordinate as z_{t+1} = (1 − ηh_i) z_t − ησξ'_i (isotropic noise stays isotropic under Q), so with
r_i = (1 − ηh_i)²

  E[z_{T,i}²] = r_iᵀ z_{0,i}² + η²σ² (1 − r_iᵀ) / (1 − r_i)       (η²σ²T when r_i = 1),
  E[f(θ_T)]  = ½ Σ_i h_i E[z_{T,i}²].

The meta-objective of ``configs/proxy_horizon.py``'s ``wu_config`` is the outer loss at the end of
the horizon divided by the task's loss at initialisation (``meta.outer_objective = final_outer``,
``loss_transform = none``), so its expectation over tasks is

  R_T(η) = mean over tasks of E[f(θ_T)] / f(θ₀),

computed here exactly in the gradient noise and by Monte Carlo over tasks drawn with the family's
own sampler (float64). ``best_lr(T)`` minimises R_T over a fine log grid.
"""
from __future__ import annotations

import numpy as np


def task_moments(family, key, num_tasks: int):
    """``(h [M, D], z0_sq [M, D])``: eigenvalues and squared initial eigen-coordinates of
    ``num_tasks`` tasks of the quadratic ``family`` (θ₀ = 0 needs ``init_scale = 0``)."""
    if family.init_scale != 0.0:
        raise ValueError("wu.task_moments needs init_scale = 0 (θ₀ = 0)")
    tasks = family.sample_batch(key, num_tasks)
    h = np.asarray(tasks["eigs"], np.float64)
    q = np.asarray(tasks["Q"], np.float64)
    theta_star = np.asarray(tasks["theta_star"], np.float64)
    z0 = np.einsum("mdk,md->mk", q, -theta_star)  # Qᵀ(θ₀ − θ*)
    return h, z0 ** 2


def expected_ratio(lrs, horizon: int, h, z0_sq, noise: float) -> np.ndarray:
    """R_T(η) for every η of ``lrs`` (module docstring): ``[len(lrs)]``."""
    eta = np.asarray(lrs, np.float64).reshape(-1, 1, 1)
    r = (1.0 - eta * h[None]) ** 2
    rt = r ** horizon
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(np.abs(1.0 - r) > 1e-12, (1.0 - rt) / (1.0 - r), float(horizon))
    ez2 = rt * z0_sq[None] + eta ** 2 * noise ** 2 * geo
    loss_t = 0.5 * np.sum(h[None] * ez2, axis=-1)
    loss_0 = 0.5 * np.sum(h * z0_sq, axis=-1)
    return np.mean(loss_t / loss_0[None], axis=-1)


def best_lr(horizon: int, h, z0_sq, noise: float, lo: float = 1e-4, hi: float | None = None,
            num: int = 4000) -> tuple[float, np.ndarray, np.ndarray]:
    """``(η*, grid, R_T(grid))``: the grid minimiser of R_T on ``num`` log-spaced rates in
    ``[lo, hi]`` (``hi`` defaults to 2 / max h, the stability edge)."""
    hi = hi if hi is not None else 2.0 / float(np.max(h))
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), num))
    vals = expected_ratio(grid, horizon, h, z0_sq, noise)
    return float(grid[int(np.nanargmin(vals))]), grid, vals


def simulate_ratio(lr: float, horizon: int, h, z0_sq, noise: float, num_runs: int,
                   seed: int = 0) -> float:
    """Monte Carlo R_T(η) by running the eigen-coordinate recursion with sampled noise (float64):
    the check of ``expected_ratio``."""
    rng = np.random.default_rng(seed)
    z = np.broadcast_to(np.sqrt(z0_sq), (num_runs,) + h.shape).copy()
    for _ in range(horizon):
        z = (1.0 - lr * h) * z - lr * noise * rng.standard_normal(z.shape)
    loss_t = 0.5 * np.sum(h * z ** 2, axis=-1).mean(axis=0)
    return float(np.mean(loss_t / (0.5 * np.sum(h * z0_sq, axis=-1))))
