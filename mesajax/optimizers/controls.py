"""Control update rules for the analyses: rules with no objective, and one with a known metric.

Each is an ``Optimizer`` (``learned = False``) usable wherever a baseline is, e.g.
``python run.py analyze --config CONFIG --optimizer noise_update --workdir DIR``. They are the
no-objective nulls of the mesa-objective analyses (``docs/analyses.md``, "Nulls"):

* :class:`NoiseUpdate` (``noise_update``): u_t = η ξ_t with ξ_t ~ N(0, I) drawn from a static seed
  and the step index only: no dependence on θ (J = ∂u/∂θ = 0, so NCI is undefined), nothing to fit.
* :class:`RandomField` (``random_field``): u(θ) = η sin(Wθ + b) with W (entries N(0, scale²/n))
  and b (uniform in [0, 2π)) fixed random from a static seed and the parameter count n: a smooth
  vector field with no objective (its Jacobian η diag(cos(Wθ + b)) W is far from symmetric).
* :class:`PrecondSGD` (``precond_sgd``): u = −η P g with a fixed dense SPD P = Q diag(λ) Qᵀ,
  λ log-spaced in [1/cond, 1], Q Haar-random, from a static seed and n. An exact gradient flow in
  the metric P⁻¹: J = −ηPH is not symmetric, but P⁻¹J = −ηH is (the dense SPD metric test's known
  answer).

W, b, P, ξ are numpy constants built at trace time from the static seed and the (static) parameter
count, so they are identical for every task, cost nothing to compile, and the state stays empty.
Above ``DENSE_MAX`` = 4096 parameters, where the dense W (n² floats: 83 GB at 10⁵) and the noise
table (4096 × n floats: 1.7 GB) no longer fit, both switch to a structured form with the same
properties (up to 4096 the values are unchanged): W = (scale/√k) Σ_{j<k} S_j Π_j, a sum of k = 8
random signed permutation matrices (rows of norm ``scale``, as the dense W's on average;
``random_field_perms``), and ξ_t from a counter-based hash of (seed, t, i) through Box–Muller
(``hash_normal``; no threefry inside jit). ``precond_sgd`` stays dense (a small-n known answer).
``phi = {"log_lr": log η}`` as for the baselines.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mesajax.optimizers.base import Optimizer, StepContext
from mesajax.optimizers.common import LogLearningRate, check


class EmptyState(NamedTuple):
  """Control rules keep no state."""


@functools.lru_cache(maxsize=32)
def random_field_params(n: int, seed: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """(W [n, n], b [n]) of ``RandomField`` (float64 numpy)."""
  rng = np.random.default_rng([seed, n, 1])
  return rng.standard_normal((n, n)) * scale / math.sqrt(n), rng.uniform(0, 2 * math.pi, n)


DENSE_MAX = 4096   # above this many parameters the controls use their structured forms
_NUM_PERMS = 8


@functools.lru_cache(maxsize=32)
def random_field_perms(n: int, seed: int, k: int = _NUM_PERMS) -> tuple[np.ndarray, np.ndarray,
                                                                           np.ndarray]:
  """(Π [k, n] int32, S [k, n] ±1, b [n]) of ``RandomField`` above ``DENSE_MAX``:
  (Wθ)_i = (scale/√k) Σ_j S_ji θ_{Π_ji}."""
  rng = np.random.default_rng([seed, n, 4])
  perm = np.stack([rng.permutation(n) for _ in range(k)]).astype(np.int32)
  sign = rng.choice(np.array([-1.0, 1.0]), (k, n))
  return perm, sign, rng.uniform(0, 2 * math.pi, n)


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (the "lowbias32" mixer of C. Wellons): uint32 → uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_normal(n: int, seed: int, step) -> jax.Array:
  """n standard normals from (seed, step, index) alone: two hashed uniforms per coordinate,
  Box–Muller (float32)."""
  key = _mix32(jnp.uint32(seed * 2654435761 % 2 ** 32) ^ _mix32(jnp.asarray(step, jnp.uint32)))
  i = jnp.arange(n, dtype=jnp.uint32)
  unif = lambda h: ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2 ** 24)   # in (0, 1)
  u1 = unif(_mix32(key ^ _mix32(2 * i)))
  u2 = unif(_mix32(key ^ _mix32(2 * i + 1)))
  return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2 * math.pi * u2)


@functools.lru_cache(maxsize=32)
def spd_preconditioner(n: int, seed: int, cond: float) -> np.ndarray:
  """The dense SPD P of ``PrecondSGD``: eigenvalues log-spaced in [1/cond, 1], Haar eigenvectors."""
  rng = np.random.default_rng([seed, n, 2])
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  q = q * np.sign(np.diag(r))[None, :]
  lam = np.logspace(-math.log10(cond), 0.0, n) if n > 1 else np.ones(1)
  return (q * lam[None, :]) @ q.T


def _noise(n: int, seed: int, step) -> jax.Array:
  # A fixed table of noise vectors indexed by the step (no threefry inside jit); a hash above
  # DENSE_MAX parameters (the table would be 4096 × n floats).
  if n > DENSE_MAX:
    return hash_normal(n, seed, step)
  table = np.random.default_rng([seed, n, 3]).standard_normal((_NOISE_STEPS, n)).astype(np.float32)
  return jnp.asarray(table)[jnp.mod(step, _NOISE_STEPS)]


_NOISE_STEPS = 4096


class _Control(LogLearningRate, Optimizer):
  learned = False
  #: True for a rule that follows no objective (a no-objective control): it need not descend.
  objective_free = True

  def init(self, phi, params):
    return EmptyState()

  def _flat(self, tree):
    return ravel_pytree(tree)


@dataclasses.dataclass(frozen=True)
class NoiseUpdate(_Control):
  """u_t = η ξ_t, ξ_t ~ N(0, I) from (seed, n, t): a pure-noise update independent of θ."""

  learning_rate: float = 0.01
  seed: int = 0
  name = "noise_update"

  def validate(self) -> None:
    check(self.learning_rate > 0, f"noise_update: learning_rate must be > 0, got "
           f"{self.learning_rate}")

  def update(self, phi, state, grads, params, ctx: StepContext):
    g, unravel = ravel_pytree(grads)
    xi = _noise(int(g.shape[0]), self.seed, ctx.step).astype(g.dtype)
    return unravel(self.learning_rate_of(phi).astype(g.dtype) * xi), state


@dataclasses.dataclass(frozen=True)
class RandomField(_Control):
  """u(θ) = η sin(Wθ + b) with W, b fixed random (static seed, sized from the parameter count)."""

  learning_rate: float = 0.01
  scale: float = 1.0
  seed: int = 0
  name = "random_field"

  def validate(self) -> None:
    check(self.learning_rate > 0, f"random_field: learning_rate must be > 0, got "
           f"{self.learning_rate}")
    check(self.scale > 0, f"random_field: scale must be > 0, got {self.scale}")

  def update(self, phi, state, grads, params, ctx: StepContext):
    th, unravel = ravel_pytree(params)
    n = int(th.shape[0])
    if n > DENSE_MAX:  # W as a sum of signed permutations (module docstring)
      perm, sign, b = random_field_perms(n, self.seed)
      wth = jnp.sum(jnp.asarray(sign, th.dtype) * th[jnp.asarray(perm)], axis=0) * (
          float(self.scale) / math.sqrt(perm.shape[0]))
    else:
      w, b = random_field_params(n, self.seed, float(self.scale))
      wth = jnp.asarray(w, th.dtype) @ th
    u = self.learning_rate_of(phi).astype(th.dtype) * jnp.sin(wth + jnp.asarray(b, th.dtype))
    return unravel(u), state


@dataclasses.dataclass(frozen=True)
class PrecondSGD(_Control):
  """u = −η P g with a fixed dense SPD P of condition number ``cond`` (static seed, size n)."""

  learning_rate: float = 0.1
  cond: float = 10.0
  seed: int = 0
  name = "precond_sgd"
  objective_free = False  # an exact gradient flow in the metric P⁻¹

  def validate(self) -> None:
    check(self.learning_rate > 0, f"precond_sgd: learning_rate must be > 0, got "
           f"{self.learning_rate}")
    check(self.cond >= 1, f"precond_sgd: cond must be >= 1, got {self.cond}")

  def preconditioner(self, n: int) -> np.ndarray:
    return spd_preconditioner(n, self.seed, float(self.cond))

  def update(self, phi, state, grads, params, ctx: StepContext):
    g, unravel = ravel_pytree(grads)
    p = jnp.asarray(self.preconditioner(int(g.shape[0])), g.dtype)
    return unravel(-self.learning_rate_of(phi).astype(g.dtype) * (p @ g)), state
