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
import numpy as np

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
  u_N, aux, p, _ = linearized_probes(field, theta_N, v_KxN, w_KxN)
  return u_N, aux, p


def linearized_probes(field: Callable, theta_N: Array, v_KxN: Array, w_KxN: Array):
  """``probe_products`` that also returns the linearised field ``lin: v ↦ Jv`` (for further JVPs
  at the same point, e.g. ``matfree.block_metric_products``)."""
  u_N, lin, aux = jax.linearize(field, theta_N, has_aux=True)
  jv = jax.vmap(lin)(v_KxN)
  jw = jax.vmap(lin)(w_KxN)
  norm = jnp.linalg.norm(u_N)
  u_hat = jnp.where(norm > 0, u_N / jnp.where(norm > 0, norm, 1.0), 0.0)
  return u_N, aux, Probes(v_KxN, w_KxN, jv, jw, u_hat, lin(u_hat)), lin


def st_from_probes(p: Probes, metric_N: Array | None = None,
                   transverse: bool = False) -> tuple[Array, Array]:
  """The per-pair samples (s_k, t_k) behind ``nci_from_probes`` (or ``transverse_from_probes``),
  for standard errors (``matfree.jackknife_nci``)."""
  if transverse:
    cv, cw = p.v_KxN @ p.u_hat_N, p.w_KxN @ p.u_hat_N
    pv = p.v_KxN - cv[:, None] * p.u_hat_N
    pw = p.w_KxN - cw[:, None] * p.u_hat_N
    a = jnp.sum(pv * (p.jw_KxN - cw[:, None] * p.ju_N), axis=1)
    b = jnp.sum(pw * (p.jv_KxN - cv[:, None] * p.ju_N), axis=1)
    return a - b, a + b
  m = jnp.ones_like(p.u_hat_N) if metric_N is None else metric_N
  a = jnp.sum(p.v_KxN * m * p.jw_KxN, axis=1)
  b = jnp.sum(p.w_KxN * m * p.jv_KxN, axis=1)
  return a - b, a + b


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


def own_diag_metric(diag_dudg_N: Array, floor: float | None = None) -> tuple[Array, Array]:
  """M = diag(−∂u_i/∂g_i)⁻¹ from the optimizer's diagonal sensitivity (signed).

  For u = −P g with P diagonal and J = −P H (H symmetric), M J = −H: exactly symmetric, so the
  own-metric NCI of any per-coordinate rule with frozen state (GD, momentum, Adam/RMSProp with v
  frozen) is 0. Entries with |∂u_i/∂g_i| below ``floor``·max are floored (keeping the sign).
  Returns ``(m normalised to mean |m| = 1, fraction of negative entries)``; a negative entry means
  the rule moves *up* the gradient in that coordinate, so M is not positive definite.
  """
  if floor is None:  # float64 keeps the 1e8 range of Adam's ε/(|g|+ε)² at ε = 1e-8
    floor = 1e-14 if diag_dudg_N.dtype == jnp.float64 else 1e-8
  p = -diag_dudg_N
  scale = jnp.max(jnp.abs(p))
  mag = jnp.maximum(jnp.abs(p), floor * scale + 1e-30)
  m = jnp.where(p < 0, -1.0, 1.0) / mag
  return m / jnp.mean(jnp.abs(m)), jnp.mean(p < 0)


def transverse_exact(j_NxN: Array, u_N: Array) -> tuple[Array, Array]:
  """(NCI, ratio) of P J P, P = I − ûûᵀ, from the dense Jacobian (exact transverse index)."""
  norm = jnp.linalg.norm(u_N)
  u_hat = jnp.where(norm > 0, u_N / jnp.where(norm > 0, norm, 1.0), 0.0)
  p = jnp.eye(j_NxN.shape[0], dtype=j_NxN.dtype) - jnp.outer(u_hat, u_hat)
  return nci_exact(p @ j_NxN @ p)


def metric_cond(m_N: Array) -> Array:
  """Condition number max|m| / min|m| of a diagonal metric."""
  a = jnp.abs(m_N)
  return jnp.max(a) / jnp.min(a)


# --- dense SPD metric test (host numpy, float64) ---------------------------------------------------

def _sym_basis(n: int) -> np.ndarray:
  """Orthonormal (Frobenius) basis of symmetric n×n matrices, [n(n+1)/2, n, n]."""
  iu = np.triu_indices(n)
  basis = np.zeros((iu[0].size, n, n))
  k = np.arange(iu[0].size)
  off = iu[0] != iu[1]
  val = np.where(off, 1.0 / np.sqrt(2.0), 1.0)
  basis[k, iu[0], iu[1]] = val
  basis[k, iu[1], iu[0]] = val
  return basis


def _from_coords(c, basis):
  n = basis.shape[1]
  return (c @ basis.reshape(basis.shape[0], -1)).reshape(n, n)


def _to_coords(mat, basis):
  return basis.reshape(basis.shape[0], -1) @ mat.reshape(-1)


def dense_spd_metric(jacs_PxNxN, null_tol: float = 1e-4, deltas=(1e-3, 1e-2, 0.1, 0.3, 0.6, 0.9),
                     n_iter: int = 100) -> dict:
  """Is there one constant SPD M with M J_p symmetric at every analysed point p?

  The symmetric M with M J_p − J_pᵀ M = 0 for all p form a linear subspace (the null space of
  M ↦ (anti(M J_p))_p on symmetric M). In an orthonormal basis of symmetric matrices, with
  A = Σ_p L_pᵀL_p (L_p: M ↦ antisymmetric part of M J_p) and B = Σ_p K_pᵀK_p (K_p: M ↦ M J_p),
  NCI_M² = mᵀAm / mᵀBm pooled over the points, a generalised Rayleigh quotient: the eigenvectors of
  (A, B) with NCI_M < ``null_tol`` span the (numerical) null space. Within it, alternating
  projections between the subspace and the cone {M ⪰ δ·tr(M)/n · I} look for an SPD element, for
  increasing δ (a larger δ: a better-conditioned M); the best SPD M found is kept. With an empty
  null space the smallest-NCI direction is projected to the SPD cone instead (its NCI, then, says
  how far from symmetrisable the points are).

  Returns ``{"nci": NCI of the best SPD M (pooled over points), "cond": its condition number,
  "null_dim": dimension of the null space, "spd": whether an SPD element was found in it,
  "nci_min": the smallest NCI_M over all symmetric M (SPD or not), "metric": M}``; NaNs when every
  J_p is 0 (no constraint: undefined). Known answer: J_p = −ηPH_p with P SPD is symmetrised by
  M = P⁻¹ at every point at once (on a quadratic, H P H is symmetric too, so M is not unique and
  the best condition number can be below cond(P)). Cost: O(P·n⁵) for the operator and an eigen-
  decomposition of size n(n+1)/2: small n only (``spd_max``).
  """
  import scipy.linalg
  j = np.asarray(jacs_PxNxN, np.float64)
  j = j[np.all(np.isfinite(j), axis=(1, 2))]
  nan = {"nci": np.nan, "cond": np.nan, "null_dim": np.nan, "spd": np.nan, "nci_min": np.nan,
         "metric": None}
  if j.shape[0] == 0 or not np.any(j):
    return nan
  n = j.shape[1]
  basis = _sym_basis(n)
  m = basis.shape[0]
  iu = np.triu_indices(n, 1)
  a_mat = np.zeros((m, m))
  b_mat = np.zeros((m, m))
  for jp in j:
    mj = np.einsum("kij,jl->kil", basis, jp)            # E_k J
    anti = 0.5 * (mj - np.transpose(mj, (0, 2, 1)))     # antisymmetric part
    lvec = anti[:, iu[0], iu[1]] * np.sqrt(2.0)         # Frobenius coordinates
    kvec = mj.reshape(m, -1)
    a_mat += lvec @ lvec.T
    b_mat += kvec @ kvec.T
  scale = np.trace(b_mat) / m
  b_reg = b_mat + 1e-12 * scale * np.eye(m)
  evals, evecs = scipy.linalg.eigh(a_mat / scale, b_reg / scale)
  nci2 = np.clip(evals, 0.0, 1.0)
  null = np.flatnonzero(nci2 < null_tol ** 2)
  null_dim = int(null.size)
  span = evecs[:, null] if null_dim else evecs[:, :1]
  q, _ = np.linalg.qr(span)                              # Euclidean-orthonormal span (coords)

  def nci_of(c):
    return float(np.sqrt(max(c @ a_mat @ c, 0.0) / max(c @ b_mat @ c, 1e-300)))

  def project_span(c):
    return q @ (q.T @ c)

  best = None
  c0 = span[:, 0]
  mat0 = _from_coords(c0, basis)
  c0 = c0 * (1.0 if np.trace(mat0) >= 0 else -1.0)
  starts = [c0]
  if null_dim:  # also start from the identity's projection (M = I when J is already symmetric)
    c_eye = project_span(_to_coords(np.eye(n), basis))
    if np.trace(_from_coords(c_eye, basis)) > 0:
      starts.append(c_eye)
  # Every (start, δ) candidate iterates at once (stacked eigendecompositions); each stops at its
  # own convergence, so the sequence of each is that of a one-candidate loop.
  pairs = [(c, d) for c in starts for d in deltas]
  iu0, iu1 = np.triu_indices(n)
  off = iu0 != iu1
  val = np.where(off, 1.0 / np.sqrt(2.0), 1.0)

  def mats_of(c_CxM):  # Σ_k c_k E_k without the [m, n²] basis product (E_k has ≤ 2 entries)
    out = np.zeros((c_CxM.shape[0], n, n))
    out[:, iu0, iu1] = c_CxM * val
    out[:, iu1, iu0] = c_CxM * val
    return out

  def coords_of(mat_CxNxN):  # ⟨E_k, M⟩ for every k
    return np.where(off, (mat_CxNxN[:, iu0, iu1] + mat_CxNxN[:, iu1, iu0]) * val,
                    mat_CxNxN[:, iu0, iu1])

  cs = np.stack([c / max(np.linalg.norm(c), 1e-300) for c, _ in pairs])
  ds = np.array([d for _, d in pairs])
  active = np.ones(len(pairs), bool)
  for _ in range(n_iter):
    idx = np.flatnonzero(active)
    if idx.size == 0:
      break
    c = cs[idx]
    w, v = np.linalg.eigh(mats_of(c))
    tr = np.maximum(np.sum(w, axis=1), 1e-300)
    w_clip = np.maximum(w, (ds[idx] * tr / n)[:, None])
    cone = np.einsum("cij,cj,ckj->cik", v, w_clip, v)
    c_new = coords_of(cone)
    if null_dim:
      c_new = (c_new @ q) @ q.T
    conv = np.linalg.norm(c_new - c, axis=1) < 1e-10 * np.linalg.norm(c, axis=1)
    cs[idx] = c_new
    active[idx[conv]] = False
  for c in cs:
    mat = _from_coords(c, basis)
    w = np.linalg.eigvalsh(mat)
    if w[0] <= 0:
      continue
    cand = {"nci": nci_of(c), "cond": float(w[-1] / w[0]), "metric": mat}
    # Keep the best conditioned M that still symmetrises (or, without a null space, the least NCI).
    if best is None:
      best = cand
    elif null_dim and cand["nci"] < max(null_tol, 10 * best["nci"]) and cand["cond"] < best["cond"]:
      best = cand
    elif not null_dim and cand["nci"] < best["nci"]:
      best = cand
  fallback = best is None
  if fallback:  # no SPD element found: report the projection of the minimiser to the cone
    mat = _from_coords(c0, basis)
    w, v = np.linalg.eigh(mat)
    w = np.maximum(w, 1e-6 * max(w[-1], 1e-300))
    mat = (v * w) @ v.T
    c = _to_coords(mat, basis)
    best = {"nci": nci_of(c), "cond": float(w[-1] / w[0]), "metric": mat}
  spd = bool(null_dim and not fallback and best["nci"] < null_tol)
  return {"nci": best["nci"], "cond": best["cond"], "null_dim": null_dim, "spd": spd,
          "nci_min": float(np.sqrt(nci2[0])), "metric": best["metric"]}
