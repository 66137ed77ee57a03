"""Non-conservativeness of an update field: NCI, the transverse index, and metric-restricted NCI.

A field u(θ) is the gradient of a scalar (locally) iff its Jacobian J = ∂u/∂θ is symmetric. With
S = (J+Jᵀ)/2, A = (J−Jᵀ)/2 and ‖J‖²_F = ‖S‖²_F + ‖A‖²_F,

  NCI = ‖A‖_F / ‖J‖_F ∈ [0, 1]        (0: locally a gradient field; 1: a pure rotation),
  ratio = ‖A‖_F / ‖S‖_F ∈ [0, ∞]      (the unbounded form, infinite for a rotation).

Estimator (forward mode only). For independent v, w ~ N(0, I), s = vᵀJw − wᵀJv = 2vᵀAw and
t = vᵀJw + wᵀJv = 2vᵀSw have E[s²] = 4‖A‖², E[t²] = 4‖S‖² (E(vᵀBw)² = ‖B‖²_F), so

  NCI² ≈ Σ_k s_k² / (Σ_k s_k² + Σ_k t_k²)   over K probe pairs.

The field is linearised once per point (``jax.linearize``) and the 2K JVPs are vmapped. An exactly
symmetric J gives s_k = 0 up to round-off for *any* probes, so the estimate of a conservative field
is ~1e-7 in float32 however few probes are used; for a non-conservative one the relative Monte-Carlo
error is O(1/√K).

Transverse index: the NCI of P J P with P = I − ûûᵀ (probes projected orthogonal to u). If
u = c(θ)∇φ then J = c∇²φ + ∇φ∇cᵀ and P J P = c P∇²φP is symmetric: the index is zero iff u is
locally *parallel* to a gradient field (a step-size schedule or global-norm clipping leaves it at 0,
a rotation of the update does not). Needs n ≥ 3. With J(Pv) = Jv − (ûᵀv) Jû, one extra JVP (Jû)
gives all projected products: cost 2K + 1 JVPs per point for NCI, transverse and every diagonal
metric below.

Metric-restricted NCI: NCI_M = NCI of MJ for a diagonal M (antisymmetric part (MJ − JᵀM)/2),
estimated from the same products (vᵀMJw = Σ_i v_i m_i (Jw)_i). Any update that improves a scalar
is −M∇L for *some* SPD M (Shoji, Suzuki & Kozachkov 2024), so only restricted metric classes are
informative; report each metric's condition number. Metrics: the identity; a fitted constant
diagonal (``fit_diag_metric``, from the dense J, n JVPs per point); the optimizer's own diagonal
sensitivity M = diag(−∂u_i/∂g_i)⁻¹ (``own_diag_metric``).

Reference for the decomposition: the Helmholtz/Hodge split of a linear vector field into its
gradient (symmetric) and rotational (antisymmetric) parts; for game dynamics see Balduzzi et al.
2018, "The Mechanics of n-Player Differentiable Games".
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Probes(NamedTuple):
  """Probe vectors and their Jacobian products at one point (K pairs, dimension n)."""

  v_KxN: Array
  w_KxN: Array
  jv_KxN: Array
  jw_KxN: Array
  u_hat_N: Array  # u / ‖u‖
  ju_N: Array     # J û


def gaussian_probes(key: Array, num_probes: int, dim: int,
                    dtype=jnp.float32) -> tuple[Array, Array]:
  """K independent standard Gaussian pairs (v, w), each ``[K, n]``."""
  kv, kw = jax.random.split(key)
  return (jax.random.normal(kv, (num_probes, dim), dtype),
          jax.random.normal(kw, (num_probes, dim), dtype))


def probe_products(field: Callable, theta_N: Array, v_KxN: Array, w_KxN: Array):
  """Linearises ``field`` (θ ↦ (u, aux)) at θ and applies J to the K probe pairs and to û.

  Returns ``(u_N, aux, Probes)``. Cost: 2K + 1 JVPs of the field. (Probes are inputs, so callers
  can draw them outside ``jit``: the threefry sampler is slow to compile on CPU.)
  """
  u_N, lin, aux = jax.linearize(field, theta_N, has_aux=True)
  jv = jax.vmap(lin)(v_KxN)
  jw = jax.vmap(lin)(w_KxN)
  norm = jnp.linalg.norm(u_N)
  u_hat = jnp.where(norm > 0, u_N / jnp.where(norm > 0, norm, 1.0), 0.0)
  return u_N, aux, Probes(v_KxN, w_KxN, jv, jw, u_hat, lin(u_hat))


def _nci_from_st(s_K: Array, t_K: Array) -> tuple[Array, Array]:
  ss, tt = jnp.sum(s_K * s_K), jnp.sum(t_K * t_K)
  return jnp.sqrt(ss / (ss + tt)), jnp.sqrt(ss / tt)


def nci_from_probes(p: Probes, metric_N: Array | None = None) -> tuple[Array, Array]:
  """(NCI, ratio) of M J with M = diag(``metric_N``) (identity when None)."""
  m = jnp.ones_like(p.u_hat_N) if metric_N is None else metric_N
  a = jnp.sum(p.v_KxN * m * p.jw_KxN, axis=1)  # vᵀ M J w
  b = jnp.sum(p.w_KxN * m * p.jv_KxN, axis=1)  # wᵀ M J v
  return _nci_from_st(a - b, a + b)


def transverse_from_probes(p: Probes) -> tuple[Array, Array]:
  """(NCI, ratio) of P J P, P = I − ûûᵀ, from the same products (no extra JVPs but Jû)."""
  cv = p.v_KxN @ p.u_hat_N
  cw = p.w_KxN @ p.u_hat_N
  pv = p.v_KxN - cv[:, None] * p.u_hat_N
  pw = p.w_KxN - cw[:, None] * p.u_hat_N
  jpv = p.jv_KxN - cv[:, None] * p.ju_N
  jpw = p.jw_KxN - cw[:, None] * p.ju_N
  a = jnp.sum(pv * jpw, axis=1)
  b = jnp.sum(pw * jpv, axis=1)
  return _nci_from_st(a - b, a + b)


def nci_exact(j_NxN: Array, metric_N: Array | None = None) -> tuple[Array, Array]:
  """(NCI, ratio) of diag(metric) J from a dense Jacobian (reference for the estimator)."""
  mj = j_NxN if metric_N is None else metric_N[:, None] * j_NxN
  a = 0.5 * (mj - mj.T)
  s = 0.5 * (mj + mj.T)
  na, ns = jnp.sum(a * a), jnp.sum(s * s)
  return jnp.sqrt(na / (na + ns)), jnp.sqrt(na / ns)


def fit_diag_metric(j_NxN: Array, floor: float = 1e-6) -> tuple[Array, Array]:
  """The constant diagonal d ≥ 0 minimising the NCI of diag(d) J, from the dense Jacobian.

  With r_i = Σ_j J_ij² and C = J ∘ Jᵀ (C_ij = J_ij J_ji, symmetric),
    ‖A‖² = ½(dᵀRd − dᵀCd),  ‖DJ‖² = dᵀRd   (R = diag r),  so  NCI²(d) = ½(1 − dᵀCd / dᵀRd),
  a generalised Rayleigh quotient: the minimiser is d = R^{-1/2} e with e the top eigenvector of
  B = R^{-1/2} C R^{-1/2}, and min NCI² = ½(1 − λ_max(B)). The sign is chosen so Σd > 0 and
  entries are clipped to ≥ ``floor``·max(d) to keep M positive definite (when e has mixed signs
  no positive diagonal symmetrises J; the clipped metric's NCI, measured afterwards, says so).
  Returns ``(d normalised to mean 1, min NCI before clipping)``. Cost: the dense Jacobian (n JVPs,
  ``jax.jacfwd``) plus one n×n symmetric eigendecomposition; use for n up to a few thousand.
  """
  r = jnp.sum(j_NxN * j_NxN, axis=1)
  r = jnp.maximum(r, 1e-30 + 1e-12 * jnp.max(r))
  rs = jnp.sqrt(r)
  b = (j_NxN * j_NxN.T) / (rs[:, None] * rs[None, :])
  evals, evecs = jnp.linalg.eigh(0.5 * (b + b.T))
  d = evecs[:, -1] / rs
  d = d * jnp.where(jnp.sum(d) < 0, -1.0, 1.0)
  d = jnp.maximum(d, floor * jnp.max(d))
  nci_min = jnp.sqrt(jnp.clip(0.5 * (1.0 - evals[-1]), 0.0, 1.0))
  return d / jnp.mean(d), nci_min


def own_diag_metric(diag_dudg_N: Array, floor: float = 1e-8) -> tuple[Array, Array]:
  """M = diag(−∂u_i/∂g_i)⁻¹ from the optimizer's diagonal sensitivity (signed).

  For u = −P g with P diagonal and J = −P H (H symmetric), M J = −H: exactly symmetric, so the
  own-metric NCI of any per-coordinate rule with frozen state (GD, momentum, Adam/RMSProp with v
  frozen) is 0. Entries with |∂u_i/∂g_i| below ``floor``·max are floored (keeping the sign).
  Returns ``(m normalised to mean |m| = 1, fraction of negative entries)``; a negative entry means
  the rule moves *up* the gradient in that coordinate, so M is not positive definite.
  """
  p = -diag_dudg_N
  scale = jnp.max(jnp.abs(p))
  mag = jnp.maximum(jnp.abs(p), floor * scale + 1e-30)
  m = jnp.where(p < 0, -1.0, 1.0) / mag
  return m / jnp.mean(jnp.abs(m)), jnp.mean(p < 0)


def metric_cond(m_N: Array) -> Array:
  """Condition number max|m| / min|m| of a diagonal metric."""
  a = jnp.abs(m_N)
  return jnp.max(a) / jnp.min(a)
