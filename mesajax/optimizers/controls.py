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


@functools.lru_cache(maxsize=32)
def spd_preconditioner(n: int, seed: int, cond: float) -> np.ndarray:
  """The dense SPD P of ``PrecondSGD``: eigenvalues log-spaced in [1/cond, 1], Haar eigenvectors."""
  rng = np.random.default_rng([seed, n, 2])
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  q = q * np.sign(np.diag(r))[None, :]
  lam = np.logspace(-math.log10(cond), 0.0, n) if n > 1 else np.ones(1)
  return (q * lam[None, :]) @ q.T


def _noise(n: int, seed: int, step) -> jax.Array:
  # A fixed table of noise vectors indexed by the step (no threefry inside jit).
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
    w, b = random_field_params(int(th.shape[0]), self.seed, float(self.scale))
    u = self.learning_rate_of(phi).astype(th.dtype) * jnp.sin(jnp.asarray(w, th.dtype) @ th
                                            + jnp.asarray(b, th.dtype))
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
