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

Schedules (``mesajax/optimizers/schedule.py``: K pieces of T / K steps, rate η_k on piece k): the
second moments advance piece by piece with the same formula, so R_T of a schedule is exact too.
``greedy_schedule`` picks each η_k to minimise the expected loss at the end of its own piece given
the state the earlier pieces reached: the fixed point of meta-training with truncations of one piece
and truncated backpropagation (Wu et al.'s short-horizon meta-objective). ``optimal_schedule``
minimises R_T over all K rates jointly (full unrolls). Wu et al. show the greedy schedule decays
too fast: its middle rates are far below the optimal schedule's, and its final loss is higher.
"""
from __future__ import annotations

import math

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


def advance(m_sq, lr, steps: int, h, noise: float):
    """E[z²] after ``steps`` SGD steps at rate ``lr`` from second moments ``m_sq`` (per coordinate)."""
    r = (1.0 - lr * h) ** 2
    rt = r ** steps
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(np.abs(1.0 - r) > 1e-12, (1.0 - rt) / (1.0 - r), float(steps))
    return rt * m_sq + lr ** 2 * noise ** 2 * geo


def _ratio(m_sq, h, z0_sq):
    return float(np.mean(np.sum(h * m_sq, axis=-1) / np.sum(h * z0_sq, axis=-1)))


def schedule_ratio(lrs, horizon: int, h, z0_sq, noise: float) -> float:
    """R_T of the piecewise-constant schedule ``lrs`` [K] (T divisible by K)."""
    k = len(lrs)
    if horizon % k:
        raise ValueError(f"horizon {horizon} is not a multiple of {k} pieces")
    m = z0_sq
    for lr in lrs:
        m = advance(m, float(lr), horizon // k, h, noise)
    return _ratio(m, h, z0_sq)


def greedy_schedule(num_pieces: int, horizon: int, h, z0_sq, noise: float, lo: float = 1e-4,
                    num: int = 200) -> np.ndarray:
    """Each η_k minimises the expected loss at the end of piece k from the state pieces < k reached:
    a log grid of ``num`` rates up to the stability edge 2 / max h brackets the minimum, bounded
    Brent refines it (the piece's expected loss is convex in η: a sum of even powers of 1 − ηh_i
    and η²)."""
    import scipy.optimize
    grid = np.exp(np.linspace(np.log(lo), np.log(2.0 / float(np.max(h))), num))
    steps, m, out = horizon // num_pieces, z0_sq, []
    den = np.sum(h * z0_sq, axis=-1)

    def piece(lr, m):
        return float(np.mean(np.sum(h * advance(m, lr, steps, h, noise), axis=-1) / den))

    for _ in range(num_pieces):
        vals = [piece(g, m) for g in grid]
        i = int(np.nanargmin(vals))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, num - 1)]
        best = scipy.optimize.minimize_scalar(lambda lr, m=m: piece(lr, m), bounds=(a, b),
                                              method="bounded", options=dict(xatol=1e-10)).x
        out.append(float(best) if piece(best, m) <= vals[i] else float(grid[i]))
        m = advance(m, out[-1], steps, h, noise)
    return np.asarray(out)


def optimal_schedule(num_pieces: int, horizon: int, h, z0_sq, noise: float) -> np.ndarray:
    """The K rates minimising R_T jointly: L-BFGS-B on the log-rates (bounded below the stability
    edge 2 / max h) from the greedy schedule, with exact float64 gradients (jax)."""
    import jax
    import jax.numpy as jnp
    import scipy.optimize
    steps = horizon // num_pieces
    edge = math.log(2.0 / float(np.max(h))) - 1e-6

    with jax.enable_x64(True):
        hj, zj = jnp.asarray(h, jnp.float64), jnp.asarray(z0_sq, jnp.float64)

        def log_ratio(x):
            m = zj
            for k in range(num_pieces):
                lr = jnp.exp(x[k])
                r = (1.0 - lr * hj) ** 2
                rt = r ** steps
                geo = jnp.where(jnp.abs(1.0 - r) > 1e-12,
                                (1.0 - rt) / jnp.where(jnp.abs(1.0 - r) > 1e-12, 1.0 - r, 1.0),
                                float(steps))
                m = rt * m + lr ** 2 * noise ** 2 * geo
            return jnp.log(jnp.mean(jnp.sum(hj * m, -1) / jnp.sum(hj * zj, -1)))

        fg = jax.jit(jax.value_and_grad(log_ratio))

        def obj(x):
            v, g = fg(jnp.asarray(x, jnp.float64))
            return float(v), np.asarray(g, np.float64)

        x0 = np.log(greedy_schedule(num_pieces, horizon, h, z0_sq, noise))
        res = scipy.optimize.minimize(obj, x0, jac=True, method="L-BFGS-B",
                                      bounds=[(math.log(1e-6), edge)] * num_pieces,
                                      options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12))
    return np.exp(res.x)
