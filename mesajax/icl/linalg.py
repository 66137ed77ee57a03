"""Small dense linear algebra in plain XLA operations (no LAPACK custom calls).

Why: jaxlib 0.10's CPU LAPACK kernels (``lapack_sgesdd_ffi``, ``sgetrf``, ``spotrf``, ``strsm``, …)
split a batched call into chunks on XLA's intra-op thread pool and block the calling pool thread
until the chunks finish. When the thunk executor runs as many independent batched LAPACK calls at
once as the pool has threads (2 on a 2-core machine), every pool thread waits for chunks that no
thread is left to run: the program never finishes. We saw exactly this in the ICL evaluator (SVDs
of the ridge references and the pinv of the probe queries, LU solves of the mesa-layer in two
variants): a ``gdb`` backtrace showed both ``tf_XLAEigen`` threads in ``BlockingCounter::Wait``
under ``jax::ParallelBatchMap`` / ``lapack_sgesdd_ffi`` and the main thread waiting on the result.
It is intermittent (it depends on scheduling; heavy machine load makes it likelier). jaxlib 0.11
compiles that parallel path out, but mesajax supports 0.10, so the in-context-learning programs do
their linear algebra here instead: the matrices are small ((d+1)² and N×d with d, N ≲ 100), loops
are ``lax.fori_loop`` with vectorised bodies, and every function vmaps.

* ``lstsq(A, B, lam)``: W minimising ‖AW − B‖² + λ‖W‖² (λ ≥ 0; at λ = 0 the least-squares solution,
  minimum-norm when A is wide), by Householder QR of [A; √λ I] (tall A) or of [Aᵀ; √λ I] (wide A,
  the dual form W = Aᵀ(AAᵀ + λI)⁻¹B). Its accuracy is that of QR (error ∝ cond(A), not cond(A)²).
  A rank-deficient tall A at λ = 0 gets 0 in the directions whose pivot |R_ii| is below
  ``eps · max(M, N) · max|R_jj|`` (a basic, not the minimum-norm, solution there).
* ``spd_solve(G, B)``: G⁻¹B for symmetric positive-definite G by Cholesky; differentiable (the
  mesa-layer's (KᵀK + λI)⁻¹ with λ > 0, trained through).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _householder_r(a_MxN, b_MxK):
  """Householder QR of a tall ``a`` (M ≥ N) applied to ``b``: returns (R [N, N], (Qᵀb)[:N])."""
  m, n = a_MxN.shape
  rows_M = jnp.arange(m)

  def step(j, carry):
    a, b = carry
    x_M = jnp.where(rows_M >= j, a[:, j], 0.0)
    alpha = jnp.where(x_M[j] >= 0, -1.0, 1.0) * jnp.sqrt(jnp.sum(x_M * x_M))
    v_M = x_M - alpha * (rows_M == j)
    vv = jnp.sum(v_M * v_M)
    scale = jnp.where(vv > 0, 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)  # H = I when x is 0
    a = a - scale * jnp.outer(v_M, v_M @ a)
    b = b - scale * jnp.outer(v_M, v_M @ b)
    return a, b

  a, b = jax.lax.fori_loop(0, n, step, (a_MxN, b_MxK))
  return jnp.triu(a[:n]), b[:n]


def _back_substitute(r_NxN, c_NxK, lower: bool = False):
  """Solves R W = C for upper-triangular R (or Rᵀ W = C with ``lower``: forward substitution);
  a pivot below eps · N · max|R_jj| gives 0 in that row."""
  n = r_NxN.shape[0]
  diag_N = jnp.diagonal(r_NxN)
  tol = jnp.finfo(r_NxN.dtype).eps * n * jnp.max(jnp.abs(diag_N))
  mat = r_NxN.T if lower else r_NxN

  def step(k, w):
    i = k if lower else n - 1 - k
    piv = diag_N[i]
    ok = jnp.abs(piv) > tol
    wi = (c_NxK[i] - mat[i] @ w) / jnp.where(ok, piv, 1.0)
    return w.at[i].set(jnp.where(ok, wi, 0.0))

  return jax.lax.fori_loop(0, n, step, jnp.zeros_like(c_NxK))


def lstsq(a_MxN, b_MxK, lam=0.0):
  """argmin_W ‖A W − B‖² + λ‖W‖² (module docstring); ``b`` may be a vector."""
  vec = b_MxK.ndim == 1
  b = b_MxK[:, None] if vec else b_MxK
  m, n = a_MxN.shape
  root = jnp.sqrt(jnp.asarray(lam, a_MxN.dtype))
  if m >= n:
    a_aug = jnp.concatenate([a_MxN, root * jnp.eye(n, dtype=a_MxN.dtype)])
    b_aug = jnp.concatenate([b, jnp.zeros((n, b.shape[1]), b.dtype)])
    r, c = _householder_r(a_aug, b_aug)
    w = _back_substitute(r, c)
  else:
    # Dual: W = Aᵀ α with (AAᵀ + λI) α = B and AAᵀ + λI = RᵀR, R from the QR of [Aᵀ; √λ I].
    a_aug = jnp.concatenate([a_MxN.T, root * jnp.eye(m, dtype=a_MxN.dtype)])
    r, _ = _householder_r(a_aug, jnp.zeros((n + m, 1), a_MxN.dtype))
    alpha = _back_substitute(r, _back_substitute(r, b, lower=True))
    w = a_MxN.T @ alpha
  return w[:, 0] if vec else w


def cholesky(g_NxN):
  """Lower-triangular L with L Lᵀ = G (G symmetric positive definite)."""
  n = g_NxN.shape[0]
  idx = jnp.arange(n)

  def step(j, l):
    v = g_NxN[:, j] - l @ l[j]            # columns ≥ j of l are still 0
    piv = jnp.sqrt(jnp.maximum(v[j], jnp.finfo(g_NxN.dtype).tiny))
    return l.at[:, j].set(jnp.where(idx >= j, v / piv, 0.0))

  return jax.lax.fori_loop(0, n, step, jnp.zeros_like(g_NxN))


def spd_solve(g_NxN, b_NxK):
  """G⁻¹ B for symmetric positive-definite G (Cholesky, then two triangular solves)."""
  vec = b_NxK.ndim == 1
  b = b_NxK[:, None] if vec else b_NxK
  l = cholesky(g_NxN)
  n = l.shape[0]

  def fwd(i, z):
    return z.at[i].set((b[i] - l[i] @ z) / l[i, i])

  def bwd(k, w):
    i = n - 1 - k
    return w.at[i].set((z[i] - l[:, i] @ w) / l[i, i])

  z = jax.lax.fori_loop(0, n, fwd, jnp.zeros_like(b))
  w = jax.lax.fori_loop(0, n, bwd, jnp.zeros_like(b))
  return w[:, 0] if vec else w
