"""Matrix-free estimators for analyses at 10⁵ parameters: Krylov methods for the quasi-static state
map, a probe-fitted structured metric, and jackknife standard errors of probe estimators.

Everything here uses Jacobian-vector products only (``jax.jvp`` / ``jax.linearize``), never a dense
Jacobian; each estimator has a dense reference in ``nci`` / ``quasi_static`` and is checked against
it on small problems (tests/test_matfree.py).

* ``arnoldi`` / ``ritz_magnitudes``: m steps of the Arnoldi process on A = ∂F/∂s (one JVP each,
  full re-orthogonalisation) give the Hessenberg matrix H_m = Q_mᵀ A Q_m; its eigenvalues (Ritz
  values) approximate A's extreme eigenvalues (Saad 2011, "Numerical Methods for Large Eigenvalue
  Problems", ch. 6). When the Krylov space is invariant (an optimizer state map with a few distinct
  decays, e.g. Adam or the per-parameter MLP's momenta: A is diagonal with d distinct entries, so
  the space has dimension ≤ d) the process breaks down at step d and the Ritz values are exact.
* ``gmres`` / ``solve``: GMRES(m) with restarts (Saad & Schultz 1986) in plain jnp (no LAPACK, so
  it can be vmapped on CPU, see ``quasi_static._inverse``), wrapped in ``lax.custom_linear_solve``
  so that its derivative in the right-hand side is another solve (linear in the tangent) rather
  than a derivative through the Arnoldi process.
* ``newton_krylov`` / ``implicit_fixed_point``: the quasi-static fixed point s* = F(s*) by Newton
  steps whose linear systems (I − ∂F/∂s + δI) x = F(s) − s are solved by GMRES, and the
  implicit-function-theorem tangent ṡ = (I − ∂F/∂s)⁻¹ ∂F/∂args · ȧ by one solve per tangent.
* ``block_metric_*``: the metric M = diag(Σ_a c_a b_a) over a small basis {b_a} (one indicator per
  parameter tensor, and the optimizer's own diagonal metric restricted to each tensor) that
  minimises the NCI of M J. With B_a = diag(b_a),
    ‖M J‖²_F = cᵀ R c,  R_ab = tr(B_a B_b J Jᵀ) = E_v[(Jv)ᵀ B_a B_b (Jv)],
    tr((M J)²) = cᵀ C c, C_ab = tr(B_a J B_b J) = E_v[vᵀ B_a J B_b J v]    (v ~ N(0, I)),
  and NCI²(M) = ½(1 − cᵀCc / cᵀRc) (as in ``nci.fit_diag_metric``), a generalised Rayleigh
  quotient in L = dim c unknowns. Hutchinson (1990) estimates of R and C need, per probe v, Jv and
  J(B_b Jv) for every b: K(L + 1) JVPs. The full per-coordinate diagonal (L = n) is the dense
  ``fit_diag_metric``; this is its structured, matrix-free restriction.
* ``jackknife_nci``: the leave-one-pair-out jackknife standard error of the probe NCI estimator
  (a ratio of sums over K independent probe pairs; Efron & Stein 1981).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --- Arnoldi --------------------------------------------------------------------------------------

def arnoldi(matvec: Callable, v0_N: Array, m: int) -> tuple[Array, Array]:
  """m Arnoldi steps from v0: returns (H [m+1, m], Q [m+1, N]) with A Q[:m]ᵀ = Q[:m+1]ᵀ H.

  Classical Gram–Schmidt applied twice (full re-orthogonalisation). After a breakdown
  (h_{j+1,j} ≈ 0: the Krylov space is invariant) the next basis vectors are 0 and so are the
  corresponding columns of H; ``ritz_magnitudes`` truncates there.
  """
  n = v0_N.shape[0]
  dt = v0_N.dtype
  q0 = v0_N / jnp.maximum(jnp.linalg.norm(v0_N), 1e-300)
  qs = jnp.zeros((m + 1, n), dt).at[0].set(q0)
  h = jnp.zeros((m + 1, m), dt)

  def body(j, carry):
    qs, h = carry
    w = matvec(qs[j])
    c1 = qs @ w
    w = w - qs.T @ c1
    c2 = qs @ w
    w = w - qs.T @ c2
    c = c1 + c2
    nw = jnp.linalg.norm(w)
    scale = jnp.maximum(jnp.linalg.norm(c), nw)
    ok = nw > 1e-12 * jnp.maximum(scale, 1e-300)
    q_next = jnp.where(ok, w / jnp.where(ok, nw, 1.0), 0.0)
    h = h.at[:, j].set(c.at[j + 1].set(jnp.where(ok, nw, 0.0)))
    return qs.at[j + 1].set(q_next), h

  qs, h = jax.lax.fori_loop(0, m, body, (qs, h))
  return h, qs


def ritz_values(h_M1xM, rtol: float = 1e-10) -> np.ndarray:
  """Host numpy: eigenvalues of the Hessenberg matrix up to the first breakdown."""
  h = np.asarray(h_M1xM, np.float64)
  if not np.all(np.isfinite(h)):
    return np.full(0, np.nan)
  m = h.shape[1]
  scale = max(np.max(np.abs(h)), 1e-300)
  k = m
  for j in range(m):
    if abs(h[j + 1, j]) <= rtol * scale:
      k = j + 1
      break
  return np.linalg.eigvals(h[:k, :k])


# --- GMRES ----------------------------------------------------------------------------------------

def gmres(matvec: Callable, b_N: Array, m: int = 20, restarts: int = 2) -> Array:
  """x ≈ A⁻¹ b by GMRES(m) with ``restarts`` restarts, fixed iteration count, plain jnp ops.

  Each cycle: Arnoldi on the residual, then the small least-squares problem
  min_y ‖βe₁ − H y‖ solved through the normal equations with a tiny ridge (m ≤ a few tens, float64).
  """
  x = jnp.zeros_like(b_N)
  for _ in range(restarts + 1):
    r = b_N - matvec(x)
    beta = jnp.linalg.norm(r)
    h, q = arnoldi(matvec, r, m)
    e1 = jnp.zeros(m + 1, b_N.dtype).at[0].set(beta)
    g = h.T @ h
    tr = jnp.trace(g)
    y = _spd_solve(g + (1e-14 * tr + 1e-300) * jnp.eye(m, dtype=g.dtype), h.T @ e1)
    x = x + jnp.where(beta > 0, q[:m].T @ y, 0.0)
  return x


def _spd_solve(a_MxM: Array, b_M: Array) -> Array:
  """a⁻¹ b for a small SPD a by Gauss–Jordan without pivoting (plain jnp; see module docstring)."""
  m = a_MxM.shape[0]
  aug = jnp.concatenate([a_MxM, b_M[:, None]], axis=1)

  def body(k, a):
    piv = a[k, k]
    row = a[k] / jnp.where(piv != 0, piv, 1.0)
    a = a - jnp.outer(a[:, k], row)
    return a.at[k].set(row)

  return jax.lax.fori_loop(0, m, body, aug)[:, m]


def solve(matvec: Callable, b_N: Array, m: int = 20, restarts: int = 2) -> Array:
  """A⁻¹ b by ``gmres`` inside ``lax.custom_linear_solve`` (derivatives in b are solves too)."""
  return jax.lax.custom_linear_solve(matvec, b_N, lambda mv, r: gmres(mv, r, m, restarts))


# --- quasi-static fixed point ---------------------------------------------------------------------

def _shifted(F, s, args, shift):
  """v ↦ (I − ∂F/∂s(s) + δI) v, one JVP of F each (linearised once)."""
  _, lin = jax.linearize(lambda x: F(x, args), s)
  return lambda v: v - lin(v) + shift * v


def newton_krylov(F: Callable, s0: Array, args, shift: float, n_newton: int = 3,
                  n_plain: int = 10, m: int = 20) -> Array:
  """s* = F(s*, args) by ``n_newton`` safeguarded Newton–Krylov steps (each falls back to a plain
  step s ← F(s) when it does not reduce the residual), then ``n_plain`` plain steps; the matrix-free
  counterpart of ``quasi_static.newton_solve``."""
  def newton(_, s):
    fs = F(s, args)
    r = fs - s
    cand = s + gmres(_shifted(F, s, args, shift), r, m)
    ok = jnp.linalg.norm(F(cand, args) - cand) < jnp.linalg.norm(r)
    return jnp.where(ok & jnp.all(jnp.isfinite(cand)), cand, fs)

  s = jax.lax.fori_loop(0, n_newton, newton, s0)
  return jax.lax.fori_loop(0, n_plain, lambda _, s: F(s, args), s)


def implicit_fixed_point(F: Callable, s_bar: Array, args, shift: float, m: int = 20) -> Array:
  """s̄ + (I − ∂F/∂s(s̄) + δI)⁻¹ (F(s̄, args) − s̄) with s̄ and the operator held constant: value s̄
  (plus a Newton correction), first derivative in ``args`` the implicit-function-theorem tangent
  (one GMRES solve per tangent). Matrix-free counterpart of ``quasi_static.implicit_fixed_point``."""
  s_bar = jax.lax.stop_gradient(s_bar)
  frozen = jax.lax.stop_gradient(args)
  op = _shifted(F, s_bar, frozen, shift)
  return s_bar + solve(op, F(s_bar, args) - s_bar, m)


# --- structured (block) metric fit ----------------------------------------------------------------

def leaf_basis(sizes: tuple[int, ...], own_metric_N: Array | None = None) -> Array:
  """[L, n] basis: one indicator per parameter tensor (``sizes``: their flat sizes, in ravel order)
  and, with ``own_metric_N``, |own metric| restricted to each tensor."""
  n = int(sum(sizes))
  seg = np.repeat(np.arange(len(sizes)), sizes)
  ind = jnp.asarray((seg[None, :] == np.arange(len(sizes))[:, None]).astype(np.float64))
  if own_metric_N is None:
    return ind.astype(jnp.result_type(float))
  ind = ind.astype(own_metric_N.dtype)
  return jnp.concatenate([ind, ind * jnp.abs(own_metric_N)[None, :]], axis=0)


def block_metric_products(lin: Callable, v_KxN: Array, basis_LxN: Array) -> tuple[Array, Array]:
  """Per-probe samples of C and R (``module docstring``): ([K, L, L], [K, L, L]).
  Cost: K (L + 1) JVPs of the linearised field ``lin``."""
  def one(v):
    jv = lin(v)
    jbjv = jax.vmap(lambda b: lin(b * jv))(basis_LxN)          # [L, n]: J B_b J v
    c = (basis_LxN * v[None, :]) @ jbjv.T                       # c_ab = vᵀ B_a J B_b J v
    r = (basis_LxN * jv[None, :]) @ (basis_LxN * jv[None, :]).T  # (Jv)ᵀ B_a B_b (Jv)
    return c, r
  return jax.lax.map(one, v_KxN)  # one probe at a time: L JVPs in flight, not K·L (memory)


def block_metric_exact(j_NxN: Array, basis_LxN: Array) -> tuple[Array, Array]:
  """The exact C and R for a dense Jacobian (reference for ``block_metric_products``)."""
  c = jnp.einsum("ai,ij,bj,ji->ab", basis_LxN, j_NxN, basis_LxN, j_NxN)
  r = (basis_LxN * jnp.sum(j_NxN * j_NxN, axis=1)[None, :]) @ basis_LxN.T
  return c, r


def fit_block_metric(c_LxL: Array, r_LxL: Array, basis_LxN: Array,
                     floor: float = 1e-6) -> tuple[Array, Array]:
  """The metric d = basisᵀ c maximising cᵀCc / cᵀRc, with its sign chosen so Σd > 0 and entries
  clipped to ≥ ``floor``·max(d) (as ``nci.fit_diag_metric``). Returns ``(d normalised to mean 1,
  min NCI of the unclipped fit)``; NaNs when R is 0 (J = 0)."""
  c_sym = 0.5 * (c_LxL + c_LxL.T)
  r_sym = 0.5 * (r_LxL + r_LxL.T)
  dg = jnp.sqrt(jnp.maximum(jnp.diagonal(r_sym), 1e-300))
  rn = r_sym / (dg[:, None] * dg[None, :])                    # unit diagonal
  cn = c_sym / (dg[:, None] * dg[None, :])
  w, vecs = jnp.linalg.eigh(rn)
  keep = w > 1e-10 * jnp.max(w)        # a degenerate basis (e.g. a constant own metric): drop
  isq = (vecs * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0)[None, :]) @ vecs.T
  null = (vecs * jnp.where(keep, 0.0, 1.0)[None, :]) @ vecs.T  # its null directions score −2 < −1
  evals, evecs = jnp.linalg.eigh(isq @ cn @ isq - 2.0 * null)
  coef = (isq @ evecs[:, -1]) / dg
  d = coef @ basis_LxN
  d = d * jnp.where(jnp.sum(d) < 0, -1.0, 1.0)
  d = jnp.maximum(d, floor * jnp.max(d))
  nci_min = jnp.sqrt(jnp.clip(0.5 * (1.0 - evals[-1]), 0.0, 1.0))
  return d / jnp.mean(d), nci_min


# --- standard errors ------------------------------------------------------------------------------

def jackknife_nci(s_K: Array, t_K: Array) -> Array:
  """Jackknife standard error of NCI = √(Σs² / (Σs² + Σt²)) over K probe pairs (s = 2vᵀAw,
  t = 2vᵀSw as in ``nci``): √((K−1)/K · Σ_k (NCI₍₋ₖ₎ − mean)²)."""
  k = s_K.shape[0]
  ss, tt = s_K * s_K, t_K * t_K
  s_loo = jnp.sum(ss) - ss
  t_loo = jnp.sum(tt) - tt
  loo = jnp.sqrt(s_loo / jnp.maximum(s_loo + t_loo, 1e-300))
  return jnp.sqrt((k - 1) / k * jnp.sum((loo - jnp.mean(loo)) ** 2))


def probe_se_of_mean(se_BxP) -> tuple[float, float]:
  """Host: (Monte-Carlo standard error of the mean over tasks of per-task point means, median
  per-point standard error). Probes are independent across points, so the variances add:
  se = √(Σ_b (Σ_p se²_bp / P_b²)) / B over the finite entries."""
  se = np.asarray(se_BxP, np.float64)
  ok = np.isfinite(se)
  if not np.any(ok):
    return float("nan"), float("nan")
  p_b = np.maximum(ok.sum(1), 1)
  per_task_var = np.where(ok, se, 0.0) ** 2 / p_b[:, None] ** 2
  tasks = ok.any(1)
  total = np.sqrt(per_task_var.sum()) / max(int(tasks.sum()), 1)
  return float(total), float(np.median(se[ok]))
