"""Quasi-static reduction of a stateful optimizer: fixed point of the state map, memory timescales,
and the effective (memoryless) update.

For a fixed gradient g (and parameters θ) one optimizer step is a map of its float state,

  s ← F(s; g, θ) = opt.update(φ, s, g, θ, ctx)[1]   (float leaves, raveled),

with integer leaves (step counters) held at ``count_value`` = 2²⁰ so that bias corrections have
vanished. Its fixed point s*(g) is the state the optimizer settles into when the gradient is held
still; the eigenvalues λ of ∂F/∂s at s* are its memory: a perturbation of the state decays like
|λ|ᵗ, timescale 1/(1 − |λ|) steps. The effective update is

  ū(θ) = opt.update(φ, s*(∇L(θ)), ∇L(θ), θ, ctx)[0],

the update of an optimizer that has fully adapted to the current gradient (Maheswaranathan et al.
2020 linearise learned optimizers around such fixed points). Known answers: heavy-ball momentum
(trace form m ← g + βm) has eigenvalue β and ū = −η/(1−β) ∇L; Adam has eigenvalues β₁ and β₂ and
ū = −η g/(|g| + ε) (sign descent).

Solver: safeguarded Newton steps s ← s + (I − ∂F/∂s + δI)⁻¹ (F(s) − s) (δ = 1e-6, plus one
refinement step; exact in one step for the linear state maps of momentum/Adam/RMSProp, whatever
the decay), each falling back to a plain step s ← F(s) when it does not reduce the residual, then a
few plain steps. Derivatives of s* (for the Jacobian of ū) use the implicit function theorem,
ṡ = (I − ∂F/∂s)⁻¹ ∂F/∂(g,θ)·(ġ, θ̇) (``implicit_fixed_point``); the shift δ leaves conserved
components (eigenvalue exactly 1, e.g. a stored initial loss, whose residual and tangent are 0) at
rest. Cost per point: each Newton step d_s JVPs of ``opt.update`` (dense ∂F/∂s, ``jax.jacfwd``) and
a Gauss–Jordan inverse of a d_s × d_s matrix (d_s = float state size; plain jnp, see ``_inverse``);
each JVP of ū then costs one JVP of F and two matrix-vector products on top of the field's own
cost. Intended for states up to about a thousand floats.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
Array = jax.Array
COUNT_VALUE = 2 ** 20


class StateMap:
  """Splits an optimizer state into its float part (raveled) and the rest (held fixed).

  ``F(s_flat, args)`` and ``u(s_flat, args)`` with ``args = (g_flat, params, phi, ctx, others)``
  are pure functions of their arguments (everything differentiable is explicit).
  """

  def __init__(self, opt, state_like: PyTree, params_like: PyTree, count_value: int = COUNT_VALUE):
    self.opt = opt
    leaves, self.treedef = jax.tree.flatten(state_like)
    self.is_float = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves]
    s0, self._unravel_s = ravel_pytree([x for x, f in zip(leaves, self.is_float) if f])
    self.dim = int(s0.shape[0])
    _, self._unravel_p = ravel_pytree(params_like)

    def fix(x):
      is_count = jnp.issubdtype(jnp.result_type(x), jnp.integer) and jnp.ndim(x) == 0
      return jnp.full_like(x, count_value) if (is_count and count_value is not None) else x

    self._fix = fix
    p_leaves, p_def = jax.tree.flatten(params_like)
    self._key = (opt, self.treedef, tuple(self.is_float), self.dim, count_value, p_def,
                 tuple((jnp.shape(x), str(jnp.result_type(x))) for x in leaves + p_leaves))

  def __hash__(self):  # structural, so jitted functions built for one StateMap can be cached
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, StateMap) and self._key == other._key

  def split(self, state: PyTree) -> tuple[Array, list]:
    leaves = jax.tree.leaves(state)
    fl = [x for x, f in zip(leaves, self.is_float) if f]
    others = [self._fix(x) for x, f in zip(leaves, self.is_float) if not f]
    return (ravel_pytree(fl)[0] if fl else jnp.zeros([0], jnp.float32)), others

  def build(self, s_flat: Array, others: list) -> PyTree:
    fl = iter(self._unravel_s(s_flat) if self.dim else [])
    ot = iter(others)
    return self.treedef.unflatten([next(fl) if f else next(ot) for f in self.is_float])

  def _step(self, s_flat, args):
    g_flat, params, phi, ctx, others = args
    return self.opt.update(phi, self.build(s_flat, others), self._unravel_p(g_flat), params, ctx)

  def F(self, s_flat: Array, args) -> Array:
    new = self._step(s_flat, args)[1]
    fl = [x for x, f in zip(jax.tree.leaves(new), self.is_float) if f]
    return ravel_pytree(fl)[0]

  def u(self, s_flat: Array, args) -> Array:
    return ravel_pytree(self._step(s_flat, args)[0])[0]


REG = 1e-6  # Tikhonov shift of I − ∂F/∂s (float32): conserved components (eigenvalue 1) get no update
REG64 = 1e-13  # the same in float64: Adam's ū cancels to relative ε/|g|, so δ must be far below it


def _reg(dtype) -> float:
  return REG64 if jnp.dtype(dtype) == jnp.float64 else REG


LAPACK_MIN = 129  # state sizes from which inverses use LAPACK (callers must then not batch them)


def batchable(state_dim: int) -> bool:
  """Whether solves for this state size may be vmapped (see ``_inverse``)."""
  return state_dim < LAPACK_MIN


def _inverse(a_DxD: Array) -> Array:
  """a⁻¹: Gauss–Jordan elimination with partial pivoting in plain jnp ops for d < ``LAPACK_MIN``,
  LAPACK (``jnp.linalg.inv``) above.

  Small inverses avoid LAPACK because batched LAPACK solves that run concurrently deadlock the CPU
  thread pool in jaxlib 0.10 (two concurrent batched ``lu_solve`` of 64×64 matrices suffice) and
  these solves sit inside vmaps over tasks and points; unbatched LAPACK calls are safe, so for
  large states (where Gauss–Jordan's 2d³ flops in a d-step loop are slow) callers map over points
  sequentially (``jax.lax.map``) instead of vmapping.
  """
  d = a_DxD.shape[0]
  if d >= LAPACK_MIN:
    return jnp.linalg.inv(a_DxD)
  rows = jnp.arange(d)

  def body(k, m):
    p = jnp.argmax(jnp.where(rows >= k, jnp.abs(m[:, k]), -1.0))
    rk, rp = m[k], m[p]
    m = m.at[k].set(rp).at[p].set(rk)
    row = m[k] / m[k, k]
    m = m - jnp.outer(m[:, k], row)
    return m.at[k].set(row)

  aug = jnp.concatenate([a_DxD, jnp.eye(d, dtype=a_DxD.dtype)], axis=1)
  return jax.lax.fori_loop(0, d, body, aug)[:, d:]


def _shifted_inverse(jac_DxD: Array) -> Array:
  eye = jnp.eye(jac_DxD.shape[0], dtype=jac_DxD.dtype)
  return _inverse(eye - jac_DxD + _reg(jac_DxD.dtype) * eye)


def _refined_solve(jac_DxD: Array, inv_DxD: Array, b_D: Array) -> Array:
  """(I − J)⁻¹ b via the shifted inverse plus one step of iterative refinement (error (δ/λ)²
  instead of δ/λ for an eigenvalue gap λ of I − J; matters when ū involves cancellations, as
  Adam's does)."""
  x = inv_DxD @ b_D
  return x + inv_DxD @ (b_D - (x - jac_DxD @ x))


def newton_solve(F: Callable, s0: Array, args, n_newton: int = 3, n_plain: int = 10) -> Array:
  """The fixed point s* = F(s*, args) by ``n_newton`` safeguarded Newton steps (each falls back to a
  plain step s ← F(s) when it does not reduce the residual), then ``n_plain`` plain steps. Not
  differentiable through the solve (use ``implicit_fixed_point`` for derivatives). Run it in float64
  (``with jax.enable_x64(True)`` and float64 inputs) when ū involves cancellations (Adam)."""
  def newton(_, s):
    fs = F(s, args)
    r = fs - s
    jac = jax.jacfwd(lambda x: F(x, args))(s)
    cand = s + _refined_solve(jac, _shifted_inverse(jac), r)
    ok = jnp.linalg.norm(F(cand, args) - cand) < jnp.linalg.norm(r)
    return jnp.where(ok & jnp.all(jnp.isfinite(cand)), cand, fs)

  s = jax.lax.fori_loop(0, n_newton, newton, s0)
  return jax.lax.fori_loop(0, n_plain, lambda _, s: F(s, args), s)



def implicit_fixed_point(F: Callable, s0: Array, args, n_newton: int = 3, n_plain: int = 10,
                         solution: tuple[Array, Array] | None = None) -> Array:
  """s* with F(s*, args) = s*, differentiable in ``args`` by the implicit function theorem.

  With s̄ = the solver's fixed point and P ≈ (I − ∂F/∂s(s̄))⁻¹ (shifted inverse with δ = ``REG``
  plus one refinement step), both held constant (``stop_gradient``), returns
  s̄ + P (F(s̄, args) − s̄):
  its value is s̄ (plus a Newton correction of the solver's residual) and its first derivative is
  P ∂F/∂args, the implicit-function-theorem tangent. Equivalent to a ``custom_jvp`` rule for first
  derivatives, with the solver traced once. The tangent of s0 is ignored (locally the fixed point
  does not depend on where the solver started). ``solution = (s̄, ∂F/∂s(s̄))`` from ``solve_point``
  at the same ``args`` skips the solve (one Newton solve per point, however many derivatives).
  """
  frozen = jax.lax.stop_gradient(args)
  if solution is None:
    s_bar = newton_solve(F, jax.lax.stop_gradient(s0), frozen, n_newton, n_plain)
    jac = jax.jacfwd(lambda x: F(x, frozen))(jax.lax.stop_gradient(s_bar))
  else:
    s_bar, jac = solution
  s_bar, jac = jax.lax.stop_gradient(s_bar), jax.lax.stop_gradient(jac)
  return s_bar + _refined_solve(jac, _shifted_inverse(jac), F(s_bar, args) - s_bar)


def solve_point(sm: StateMap, state: PyTree, g_flat: Array, params: PyTree, phi, ctx,
                n_newton: int = 3, n_plain: int = 10) -> dict:
  """Fixed point, state Jacobian and effective update at one (g, θ).

  Returns ``{"s_star", "jac" [d_s, d_s] (∂F/∂s at s*), "u_bar", "residual"}`` where ``residual`` is
  ‖F(s*) − s*‖ / max(‖s*‖, tiny).
  """
  s0, others = sm.split(state)
  args = (g_flat, params, phi, ctx, others)
  s = newton_solve(sm.F, s0, args, n_newton, n_plain)
  res = jnp.linalg.norm(sm.F(s, args) - s) / jnp.maximum(jnp.linalg.norm(s), 1e-30)
  jac = jax.jacfwd(lambda x: sm.F(x, args))(s)
  return {"s_star": s, "jac": jac, "u_bar": sm.u(s, args), "residual": res}


def effective_state_fn(sm: StateMap, state: PyTree, phi, n_newton: int = 3, n_plain: int = 10,
                       solution: tuple[Array, Array] | None = None):
  """``state_fn(grads, params, ctx) -> s*(g)`` for ``fields.update_field``: plugging it in turns the
  frozen-state field u into the effective field ū, differentiable in θ through s*(∇L(θ)).
  ``solution``: ``(s_star, jac)`` of ``solve_point`` at the point where the field is linearised."""
  s0, others = sm.split(state)

  def state_fn(grads, params, ctx):
    args = (ravel_pytree(grads)[0], params, phi, ctx, others)
    return sm.build(implicit_fixed_point(sm.F, s0, args, n_newton, n_plain, solution), others)

  return state_fn


def effective_update(sm: StateMap, state: PyTree, g_flat: Array, params: PyTree, phi, ctx,
                     n_newton: int = 3, n_plain: int = 10) -> Array:
  """ū = u(s*(g), g, θ): the update at the fixed point of the state map for gradient ``g_flat``."""
  s0, others = sm.split(state)
  args = (g_flat, params, phi, ctx, others)
  return sm.u(newton_solve(sm.F, s0, args, n_newton, n_plain), args)


UNIT_TOL = 1e-6  # |λ| within this of 1: a conserved component (e.g. a stored θ₀ or initial loss)


def classify_magnitudes(mags, tol: float = UNIT_TOL) -> dict:
  """Host numpy: of eigenvalue magnitudes ``mags``, which are conserved (|λ| = 1 within ``tol``:
  a stored quantity the map copies forward, F(s) = s in that direction; neither memory nor
  instability) and which are unstable (|λ| > 1 + tol)."""
  m = np.asarray(mags, np.float64)
  return {"conserved": np.abs(m - 1.0) <= tol, "unstable": m > 1.0 + tol}


def distinct_magnitudes(eigs, k: int, tol: float = 0.05) -> np.ndarray:
  """The k largest *distinct* eigenvalue magnitudes (host numpy), NaN-padded to length k.

  Magnitudes are clustered on the timescale axis: two are the same when their log-timescales
  log(1/(1 − |λ|)) differ by less than ``tol`` (1 − |λ| floored at 1e-9), so 0.999 and 0.9999 stay
  distinct while the n copies of a per-coordinate decay merge.
  """
  mags = np.sort(np.abs(np.asarray(eigs)).reshape(-1))[::-1]
  out, kept = [], []
  for m in mags:
    ls = -np.log(max(1.0 - m, 1e-9))
    if all(abs(ls - x) >= tol for x in kept):
      kept.append(ls)
      out.append(m)
    if len(out) == k:
      break
  return np.asarray(out + [np.nan] * (k - len(out)), np.float64)
