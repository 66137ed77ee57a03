"""Matrix-free estimators for analyses at 10⁵ parameters: Krylov methods for the quasi-static state
map, a probe-fitted structured metric, and jackknife standard errors of probe estimators.

Everything here uses Jacobian-vector products only (``jax.jvp`` / ``jax.linearize``), never a dense
Jacobian; each estimator has a dense reference in ``nci`` / ``quasi_static`` and is checked against
it on small problems (tests/test_matfree.py).

* ``arnoldi`` / ``ritz_values``: up to m steps of the Arnoldi process on A = ∂F/∂s (one JVP each,
  full re-orthogonalisation) give the Hessenberg matrix H_m = Q_mᵀ A Q_m; its eigenvalues (Ritz
  values) approximate A's extreme eigenvalues (Saad 2011, "Numerical Methods for Large Eigenvalue
  Problems", ch. 6). When the Krylov space is invariant (an optimizer state map with a few distinct
  decays, e.g. Adam or the per-parameter MLP's momenta: A is diagonal with d distinct entries, so
  the space has dimension ≤ d) the process breaks down at step d and the Ritz values are exact.
* ``gmres`` / ``solve``: GMRES(m) with restarts (Saad & Schultz 1986) in plain jnp (no LAPACK, so
  it can be vmapped on CPU, see ``quasi_static._inverse``), wrapped in ``lax.custom_linear_solve``
  so that its derivative in the right-hand side is another solve (linear in the tangent) rather
  than a derivative through the Arnoldi process. Every loop stops once converged (relative
  residual ε^0.7, or an invariant Krylov space). At 10⁵ parameters the cost of a solve is memory
  traffic: each Arnoldi step re-reads the whole (m + 1)-vector basis of the 6 × 10⁵-float state.
* ``gmres_polynomial`` / ``apply_polynomial``: the GMRES polynomial p of one solve, p(A) ≈ A⁻¹,
  applied to other right-hand sides by the Arnoldi recurrence (m matvecs, no inner products); a
  solve started from p(A)b then only checks its residual when A has few distinct eigenvalues.
  ``krylov_start`` picks the start: b ⊘ (A 1) where ``is_diagonal`` found A diagonal (every
  per-coordinate optimizer's state map), else p(A)b.
* ``newton_krylov`` / ``implicit_fixed_point``: the quasi-static fixed point s* = F(s*) by Newton
  steps whose linear systems (I − ∂F/∂s + δI) x = F(s) − s are solved by GMRES, and the
  implicit-function-theorem tangent ṡ = (I − ∂F/∂s)⁻¹ ∂F/∂args · ȧ by one solve per tangent
  (both optionally started from a GMRES polynomial: ``fixed_point_polynomial``).
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
  """Up to m Arnoldi steps from v0: returns (H [m+1, m], Q [m+1, N]) with A Q[:m]ᵀ = Q[:m+1]ᵀ H.

  Classical Gram–Schmidt applied twice (full re-orthogonalisation). At a breakdown
  (h_{j+1,j} ≈ 0: the Krylov space is invariant) the process stops: the remaining basis vectors
  and columns of H stay 0 (``ritz_values`` truncates there; GMRES's solution is then exact in
  that space). A ``while_loop``, so an optimizer state map with d distinct decays costs d + 1
  matvecs, not m (under ``vmap`` it runs until every member has stopped).
  """
  h, qs, _ = _arnoldi(matvec, v0_N, m)
  return h, qs


def _cgs2_step(matvec: Callable, qs: Array, j) -> tuple[Array, Array, Array]:
  """One Arnoldi step against the basis rows ``qs`` (rows > j are 0): returns the next basis
  vector, column j of H, and whether the process continues (False: breakdown, the Krylov space is
  invariant; the next vector is then 0)."""
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
  return q_next, c.at[j + 1].set(jnp.where(ok, nw, 0.0)), ok


def _arnoldi(matvec: Callable, v0_N: Array, m: int) -> tuple[Array, Array, Array]:
  """``arnoldi`` plus whether it broke down (the Krylov space is invariant)."""
  n = v0_N.shape[0]
  dt = v0_N.dtype
  q0 = v0_N / jnp.maximum(jnp.linalg.norm(v0_N), 1e-300)
  qs = jnp.zeros((m + 1, n), dt).at[0].set(q0)
  h = jnp.zeros((m + 1, m), dt)

  def body(carry):
    j, qs, h, _ = carry
    q_next, col, ok = _cgs2_step(matvec, qs, j)
    return j + 1, qs.at[j + 1].set(q_next), h.at[:, j].set(col), ~ok

  cond = lambda carry: (carry[0] < m) & ~carry[3]
  _, qs, h, broke = jax.lax.while_loop(cond, body, (jnp.int32(0), qs, h, jnp.bool_(False)))
  return h, qs, broke


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

def _gmres_cycle(matvec: Callable, b_N: Array, x_N: Array, m: int, atol):
  """One GMRES(m) cycle from x: Arnoldi on the residual with the least-squares problem
  min_y ‖βe₁ − H y‖ kept in QR form by Givens rotations (Saad 2003, "Iterative Methods for Sparse
  Linear Systems", §6.5.3), so its residual |γ_{j+1}| is known after every step and the cycle
  stops (``while_loop``) once it is at most ``atol`` or the Krylov space is invariant. Returns the
  new x, whether it converged, and (H [m+1, m] unrotated, y [m], β) for ``gmres_polynomial``."""
  dt = b_N.dtype
  r = b_N - matvec(x_N)
  beta = jnp.linalg.norm(r)
  qs = jnp.zeros((m + 1,) + b_N.shape, dt).at[0].set(r / jnp.maximum(beta, 1e-300))
  rmat = jnp.zeros((m + 1, m), dt)
  gam = jnp.zeros(m + 1, dt).at[0].set(beta)

  def body(carry):
    j, qs, rmat, hmat, cs, sn, gam, _ = carry
    q_next, col, ok = _cgs2_step(matvec, qs, j)
    hmat = hmat.at[:, j].set(col)

    def rotate(i, col):  # the earlier rotations, applied to the new column
      a, b = col[i], col[i + 1]
      new = col.at[i].set(cs[i] * a + sn[i] * b).at[i + 1].set(-sn[i] * a + cs[i] * b)
      return jnp.where(i < j, new, col)

    col = jax.lax.fori_loop(0, m, rotate, col)
    a, b = col[j], col[j + 1]
    den = jnp.sqrt(a * a + b * b)
    c = jnp.where(den > 0, a / jnp.where(den > 0, den, 1.0), 1.0)
    s = jnp.where(den > 0, b / jnp.where(den > 0, den, 1.0), 0.0)
    col = col.at[j].set(den).at[j + 1].set(0.0)
    gj = gam[j]
    gam = gam.at[j].set(c * gj).at[j + 1].set(-s * gj)
    done = (~ok) | (jnp.abs(gam[j + 1]) <= atol)
    return (j + 1, qs.at[j + 1].set(q_next), rmat.at[:, j].set(col), hmat, cs.at[j].set(c),
            sn.at[j].set(s), gam, done)

  init = (jnp.int32(0), qs, rmat, rmat, jnp.ones(m, dt), jnp.zeros(m, dt), gam, beta <= atol)
  k, qs, rmat, hmat, _, _, gam, done = jax.lax.while_loop(lambda c: (c[0] < m) & ~c[7], body,
                                                          init)

  def back(t, y):  # R[:k, :k] y = γ[:k] by back substitution (entries ≥ k stay 0)
    i = m - 1 - t
    piv = rmat[i, i]
    val = (gam[i] - rmat[i, :m] @ y) / jnp.where(piv != 0, piv, 1.0)
    return y.at[i].set(jnp.where((i < k) & (piv != 0), val, 0.0))

  y = jax.lax.fori_loop(0, m, back, jnp.zeros(m, dt))
  return x_N + qs[:m].T @ y, done, (hmat, y, beta)


def _tol(dtype) -> float:
  """Relative residual at which the fixed-point iterations stop early: 100 ulp of the dtype."""
  return 100.0 * float(jnp.finfo(dtype).eps)


def _gmres_rtol(dtype) -> float:
  """Relative residual at which GMRES stops: ε^0.7 (1.1e-11 in float64, 1.4e-5 in float32). A
  residual ρ‖b‖ bounds the relative error of x by κ(A)·ρ; for the per-parameter MLP's momenta
  (decays up to 0.9999, κ ≈ 10⁴) that is ~1e-7, below the analyses' 1e-6 floors. 100 ulp is out of
  reach there: round-off in the Krylov basis stalls GMRES near 1e-13 (measured at 6·10⁵ state
  floats), and every further step reads the whole basis."""
  return float(jnp.finfo(dtype).eps) ** 0.7


def gmres(matvec: Callable, b_N: Array, m: int = 20, restarts: int = 2,
          x0: Array | None = None) -> Array:
  """x ≈ A⁻¹ b by GMRES(m) with at most ``restarts`` restarts (Saad & Schultz 1986), plain jnp
  ops (no LAPACK: it is vmapped on CPU, see ``quasi_static._inverse``), from ``x0`` if given (and
  finite, with a residual below ‖b‖; else from 0).

  Stops early (``while_loop``s) once the residual is at most ``_gmres_rtol`` · ‖b‖ or the
  Krylov space is invariant (an optimizer state map with d distinct decays: about d + 3 matvecs
  instead of m · (restarts + 1)); b = 0, or an ``x0`` that already solves, returns at once.
  """
  b_norm = jnp.linalg.norm(b_N)
  atol = _gmres_rtol(b_N.dtype) * b_norm
  x = jnp.zeros_like(b_N)
  res = b_norm
  if x0 is not None:
    r0 = jnp.linalg.norm(b_N - matvec(x0))
    good = jnp.isfinite(r0) & (r0 < b_norm)
    x, res = jnp.where(good, x0, x), jnp.where(good, r0, b_norm)

  def cycle(carry):
    i, x, _ = carry
    x, done, _ = _gmres_cycle(matvec, b_N, x, m, atol)
    return i + 1, x, done

  init = (jnp.int32(0), x, res <= atol)
  _, x, _ = jax.lax.while_loop(lambda c: (c[0] <= restarts) & ~c[2], cycle, init)
  return x


def gmres_polynomial(matvec: Callable, b0_N: Array, m: int = 20) -> tuple:
  """The GMRES polynomial of one solve, to reuse for other right-hand sides of the same A.

  One GMRES(m) cycle on b₀ gives x₀ = Σⱼ yⱼ qⱼ with qⱼ = πⱼ(A) b₀ / β₀, where the Arnoldi
  polynomials πⱼ follow the recurrence h_{j+1,j} π_{j+1}(z) = z πⱼ(z) − Σ_{i≤j} h_ij πᵢ(z) with
  π₀ = 1. Then p(A) = Σⱼ yⱼ πⱼ(A) / β₀ ≈ A⁻¹ on every vector, not only b₀, once b₀'s Krylov space
  has resolved A's spectrum: exactly so for a state map with d distinct decays and a generic b₀
  (A's minimal polynomial has degree d), the per-coordinate optimizers' case (polynomial
  preconditioning: Saad 2003, ch. 12; the GMRES polynomial as the preconditioner: Loe & Morgan
  2022, "Toward efficient polynomial preconditioning for GMRES"). Returns
  (H, y, β₀, diagonal) for ``krylov_start``: applying p costs m matvecs and m(m+1)/2 vector
  updates, no inner products, where a GMRES solve re-reads its whole basis 4 times per step.
  ``diagonal`` (``is_diagonal`` on b₀): A is diagonal to GMRES's tolerance, and ``krylov_start``
  divides by its diagonal instead of applying p.
  """
  return _polynomial(matvec, b0_N, m) + (is_diagonal(matvec, b0_N),)


def _polynomial(matvec: Callable, b0_N: Array, m: int) -> tuple[Array, Array, Array]:
  """(H, y, β₀) of one GMRES(m) cycle on b₀ from 0 (``gmres_polynomial``)."""
  return _gmres_cycle(matvec, b0_N, jnp.zeros_like(b0_N), m,
                      _gmres_rtol(b0_N.dtype) * jnp.linalg.norm(b0_N))[2]


def is_diagonal(matvec: Callable, v_N: Array) -> Array:
  """Whether A is diagonal, by two matvecs: ‖A v − (A 1) ⊙ v‖ ≤ ε^0.7 ‖A v‖ (``_gmres_rtol``;
  round-off alone gives ~1e-13 for the shifted state maps I − ∂F/∂s + δI with decays up to
  0.9999, whose 1 − β cancels) for a generic v: a Gaussian v with A v = (A 1) ⊙ v and A not
  diagonal has probability 0. The state map of every per-coordinate optimizer (momenta, Adam's
  moments, the per-parameter MLP's momenta) is elementwise in the state, so its A is diagonal; a
  recurrent optimizer's is not. A start from a wrongly flagged A only costs GMRES iterations (it
  checks the start's residual)."""
  av = matvec(v_N)
  err = jnp.linalg.norm(av - matvec(jnp.ones_like(v_N)) * v_N)
  return (err <= _gmres_rtol(v_N.dtype) * jnp.linalg.norm(av)) & jnp.all(jnp.isfinite(av))


def apply_polynomial(matvec: Callable, poly, b_N: Array) -> Array:
  """p(A) b for ``poly = gmres_polynomial(matvec, b0, m)`` (same A), by the Arnoldi recurrence
  with the stored H (columns past the cycle's last step are 0, so their terms vanish)."""
  h, y, beta0 = poly[:3]
  m = y.shape[0]
  z = [b_N / jnp.maximum(beta0, 1e-300)]
  x = y[0] * z[0]
  for j in range(m - 1):
    w = matvec(z[j]) - sum(h[i, j] * z[i] for i in range(j + 1))
    d = h[j + 1, j]
    z.append(jnp.where(d != 0, w / jnp.where(d != 0, d, 1.0), 0.0))
    x = x + y[j + 1] * z[j + 1]
  return x


def krylov_start(matvec: Callable, poly, b_N: Array) -> Array:
  """The start of a solve A x = b from ``poly = gmres_polynomial(...)`` of the same (or a nearby)
  A: b ⊘ (A 1) when ``poly`` found A diagonal (exact: one matvec), else p(A) b
  (``apply_polynomial``). The branch is a ``lax.cond``, so where ``poly`` is not batched (one per
  point, shared by that point's tangents) only one side runs. At 6 × 10⁵ state floats the
  polynomial costs ~70 ms a solve on CPU, the division ~2 ms: p's recurrence re-reads every earlier
  vector of the basis once the state's ravel (a concatenation) stops XLA fusing the steps."""
  def jacobi(_):
    d = matvec(jnp.ones_like(b_N))
    return jnp.where(d != 0, b_N / jnp.where(d != 0, d, 1.0), 0.0)
  return jax.lax.cond(poly[3], jacobi, lambda _: apply_polynomial(matvec, poly, b_N), None)


def solve(matvec: Callable, b_N: Array, m: int = 20, restarts: int = 2, poly=None) -> Array:
  """A⁻¹ b by ``gmres`` inside ``lax.custom_linear_solve`` (derivatives in b are solves too).
  ``poly``: a ``gmres_polynomial`` of the same A, whose ``krylov_start`` starts every solve (GMRES
  then only checks the residual when the start is accurate)."""
  def run(mv, r):
    x0 = None if poly is None else krylov_start(mv, poly, r)
    return gmres(mv, r, m, restarts, x0=x0)
  return jax.lax.custom_linear_solve(matvec, b_N, run)


# --- quasi-static fixed point ---------------------------------------------------------------------

def _shifted(F, s, args, shift):
  """v ↦ (I − ∂F/∂s(s) + δI) v, one JVP of F each (linearised once)."""
  _, lin = jax.linearize(lambda x: F(x, args), s)
  return lambda v: v - lin(v) + shift * v


def newton_krylov(F: Callable, s0: Array, args, shift: float, n_newton: int = 3,
                  n_plain: int = 10, m: int = 20, poly=None) -> Array:
  """s* = F(s*, args) by up to ``n_newton`` safeguarded Newton–Krylov steps (each falls back to a
  plain step s ← F(s) when it does not reduce the residual), then up to ``n_plain`` plain steps;
  the matrix-free counterpart of ``quasi_static.newton_solve``. Both loops stop once the residual
  ‖F(s) − s‖ is at most ``_tol`` · ‖s‖ (two Newton steps for a linear state map). ``poly``: a
  ``gmres_polynomial`` of a nearby operator (e.g. ``fixed_point_polynomial`` at another step of
  the same run; exact for a linear state map), whose ``krylov_start`` starts each Newton step's
  GMRES."""
  tol = _tol(s0.dtype)
  small = lambda r, s: r <= tol * jnp.linalg.norm(s)

  def newton(carry):
    i, s, _ = carry
    fs = F(s, args)
    r = fs - s
    op = _shifted(F, s, args, shift)
    cand = s + gmres(op, r, m, x0=None if poly is None else krylov_start(op, poly, r))
    r_cand = jnp.linalg.norm(F(cand, args) - cand)
    ok = (r_cand < jnp.linalg.norm(r)) & jnp.all(jnp.isfinite(cand))
    s_new = jnp.where(ok, cand, fs)
    return i + 1, s_new, ok & small(r_cand, cand)

  def plain(carry):
    i, s, _ = carry
    fs = F(s, args)
    return i + 1, fs, small(jnp.linalg.norm(fs - s), fs)

  first = lambda n: (lambda c: (c[0] < n) & ~c[2])
  start = (jnp.int32(0), s0, small(jnp.linalg.norm(F(s0, args) - s0), s0))
  _, s, done = jax.lax.while_loop(first(n_newton), newton, start)
  _, s, _ = jax.lax.while_loop(first(n_plain), plain, (jnp.int32(0), s, done))
  return s


def implicit_fixed_point(F: Callable, s_bar: Array, args, shift: float, m: int = 20,
                         poly=None) -> Array:
  """s̄ + (I − ∂F/∂s(s̄) + δI)⁻¹ (F(s̄, args) − s̄) with s̄ and the operator held constant: value s̄
  (plus a Newton correction), first derivative in ``args`` the implicit-function-theorem tangent
  (one GMRES solve per tangent, started from ``poly``'s p(A) b when given: a ``gmres_polynomial`` of
  the operator (I − ∂F/∂s(s̄) + δI), e.g. from ``fixed_point_polynomial``). Matrix-free counterpart
  of ``quasi_static.implicit_fixed_point``."""
  s_bar = jax.lax.stop_gradient(s_bar)
  frozen = jax.lax.stop_gradient(args)
  op = _shifted(F, s_bar, frozen, shift)
  r = F(s_bar, args) - s_bar
  # A converged s̄ leaves only round-off in r: its correction is dropped (GMRES on round-off would
  # run every iteration), while r's tangent, the part that matters, is kept.
  small = jnp.linalg.norm(r) <= _tol(r.dtype) * jnp.linalg.norm(s_bar)
  r = r - jax.lax.stop_gradient(jnp.where(small, r, 0.0))
  return s_bar + solve(op, r, m, poly=poly)


def fixed_point_polynomial(F: Callable, s_bar: Array, args, shift: float, b0: Array,
                           m: int = 20):
  """``gmres_polynomial`` of A = I − ∂F/∂s(s̄) + δI from the start vector ``b0``: built once per
  point, it serves every tangent of ``implicit_fixed_point`` there. ``is_diagonal`` runs first:
  where A is diagonal the polynomial is not built (its GMRES cycle, ~0.1 s at 6 × 10⁵ state floats
  on CPU, is skipped under ``lax.cond``; H and y are zeros) since ``krylov_start`` divides."""
  op = _shifted(F, s_bar, args, shift)
  diagonal = is_diagonal(op, b0)
  build = lambda _: _polynomial(op, b0, m)
  skip = lambda _: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(build, None))
  return jax.lax.cond(diagonal, skip, build, None) + (diagonal,)


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
