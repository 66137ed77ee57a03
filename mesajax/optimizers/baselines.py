"""Hand-designed baseline optimizers with a learnable log learning rate.

Each baseline reproduces the optax optimizer of the same name step for step (the tests check
it), and keeps its learning rate in the meta-parameters ``phi = {"log_lr": log(lr)}`` so that a
learning-rate grid is a ``vmap`` over ``phi`` and the rate itself can be meta-trained (Wu et al.
2018, short-horizon bias). Decay rates and epsilons are static options.

Updates are added to the parameters (optax's sign convention): ``params_new = params + updates``.

State layouts (NamedTuples; the analyses read these fields):

* ``SGD``: ``SGDState()``, empty.
* ``SGDM``: ``SGDMState(m)``, ``m`` the trace of gradients (float, params-shaped).
* ``Adam``: ``AdamState(m, v, count)``, first and second moment EMAs (float, params-shaped) and the
  int32 step count used for bias correction.
* ``RMSProp``: ``RMSPropState(v)``, the EMA of squared gradients (float, params-shaped).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mesajax.optimizers.base import Optimizer, PyTree, StepContext
from mesajax.optimizers.common import LogLearningRate, check, zeros_like_tree


def clip_by_global_norm(grads: PyTree, max_norm: float) -> PyTree:
  """g · min(1, c / ‖g‖) with ‖g‖ the global l2 norm (Pascanu et al. 2013; optax semantics)."""
  g_norm = optax.tree.norm(grads)
  keep = g_norm < max_norm
  return jax.tree.map(lambda g: jnp.where(keep, g, g / g_norm.astype(g.dtype) * max_norm), grads)


class SGDState(NamedTuple):
  """Plain SGD keeps no state."""


@dataclasses.dataclass(frozen=True)
class SGD(LogLearningRate, Optimizer):
  """Gradient descent with optional global-norm clipping and weight decay.

  u = −η · (clip_c(g) + λ θ), with clip_c(g) = g · min(1, c/‖g‖) applied to the gradient before the
  weight decay term is added (``clip_norm = 0`` turns clipping off). Matches
  ``optax.chain(optax.clip_by_global_norm(c), optax.add_decayed_weights(λ), optax.sgd(η))``.
  """

  learning_rate: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 0.0

  name = "sgd"

  def validate(self) -> None:
    check(self.learning_rate > 0, f"sgd: learning_rate must be > 0, got {self.learning_rate}")
    check(self.weight_decay >= 0, f"sgd: weight_decay must be >= 0, got {self.weight_decay}")
    check(self.clip_norm >= 0, f"sgd: clip_norm must be >= 0 (0 = off), got {self.clip_norm}")

  def init(self, phi, params):
    return SGDState()

  def update(self, phi, state, grads, params, ctx: StepContext):
    if self.clip_norm > 0:
      grads = clip_by_global_norm(grads, self.clip_norm)
    if self.weight_decay > 0:
      grads = jax.tree.map(lambda g, p: g + self.weight_decay * p, grads, params)
    lr = self.learning_rate_of(phi)
    return jax.tree.map(lambda g: -lr.astype(g.dtype) * g, grads), state


class SGDMState(NamedTuple):
  m: PyTree  # trace of gradients, m_t = g_t + β m_{t−1}


@dataclasses.dataclass(frozen=True)
class SGDM(LogLearningRate, Optimizer):
  """Heavy-ball momentum (Polyak 1964) in optax's trace form.

  m_t = g_t + β m_{t−1};  u = −η m_t, or u = −η (g_t + β m_t) with ``nesterov`` (Sutskever et al.
  2013). Matches ``optax.sgd(η, momentum=β, nesterov=...)``.
  """

  learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False

  name = "sgdm"

  def validate(self) -> None:
    check(self.learning_rate > 0, f"sgdm: learning_rate must be > 0, got {self.learning_rate}")
    check(0 <= self.momentum < 1, f"sgdm: momentum must be in [0, 1), got {self.momentum}")

  def init(self, phi, params):
    return SGDMState(zeros_like_tree(params))

  def update(self, phi, state, grads, params, ctx: StepContext):
    beta = self.momentum
    m = jax.tree.map(lambda g, t: g + beta * t, grads, state.m)
    direction = jax.tree.map(lambda g, t: g + beta * t, grads, m) if self.nesterov else m
    lr = self.learning_rate_of(phi)
    return jax.tree.map(lambda d: -lr.astype(d.dtype) * d, direction), SGDMState(m)


class AdamState(NamedTuple):
  m: PyTree  # EMA of gradients, m_t = β₁ m_{t−1} + (1 − β₁) g_t
  v: PyTree  # EMA of squared gradients, v_t = β₂ v_{t−1} + (1 − β₂) g_t²
  count: jax.Array  # int32 scalar, number of updates applied so far


@dataclasses.dataclass(frozen=True)
class Adam(LogLearningRate, Optimizer):
  """Adam (Kingma & Ba 2015) with bias correction.

  m_t = β₁ m + (1−β₁) g,  v_t = β₂ v + (1−β₂) g²,  m̂ = m_t / (1−β₁ᵗ),  v̂ = v_t / (1−β₂ᵗ),
  u = −η m̂ / (√v̂ + ε). Matches ``optax.adam(η, b1, b2, eps)``.
  """

  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  name = "adam"

  def validate(self) -> None:
    check(self.learning_rate > 0, f"adam: learning_rate must be > 0, got {self.learning_rate}")
    check(0 <= self.b1 < 1, f"adam: b1 must be in [0, 1), got {self.b1}")
    check(0 <= self.b2 < 1, f"adam: b2 must be in [0, 1), got {self.b2}")
    check(self.eps >= 0, f"adam: eps must be >= 0, got {self.eps}")

  def init(self, phi, params):
    return AdamState(zeros_like_tree(params), zeros_like_tree(params), jnp.zeros([], jnp.int32))

  def update(self, phi, state, grads, params, ctx: StepContext):
    b1, b2 = self.b1, self.b2
    m = jax.tree.map(lambda g, t: (1 - b1) * g + b1 * t, grads, state.m)
    v = jax.tree.map(lambda g, t: (1 - b2) * g * g + b2 * t, grads, state.v)
    count = state.count + 1
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    lr = self.learning_rate_of(phi)
    updates = jax.tree.map(
        lambda a, b: -lr.astype(a.dtype) * (a / c1.astype(a.dtype))
        / (jnp.sqrt(b / c2.astype(b.dtype)) + self.eps), m, v)
    return updates, AdamState(m, v, count)


class RMSPropState(NamedTuple):
  v: PyTree  # EMA of squared gradients, v_t = ρ v_{t−1} + (1 − ρ) g_t², starting at 0


@dataclasses.dataclass(frozen=True)
class RMSProp(LogLearningRate, Optimizer):
  """RMSProp (Tieleman & Hinton 2012) in optax's default form.

  v_t = ρ v_{t−1} + (1−ρ) g²  (v_0 = 0),  u = −η g / √(v_t + ε)  (ε inside the square root, no
  bias correction). Matches ``optax.rmsprop(η, decay=ρ, eps=ε)``.
  """

  learning_rate: float = 1e-2
  decay: float = 0.9
  eps: float = 1e-8

  name = "rmsprop"

  def validate(self) -> None:
    check(self.learning_rate > 0, f"rmsprop: learning_rate must be > 0, got {self.learning_rate}")
    check(0 <= self.decay < 1, f"rmsprop: decay must be in [0, 1), got {self.decay}")
    check(self.eps > 0, f"rmsprop: eps must be > 0, got {self.eps}")

  def init(self, phi, params):
    return RMSPropState(zeros_like_tree(params))

  def update(self, phi, state, grads, params, ctx: StepContext):
    rho = self.decay
    v = jax.tree.map(lambda g, t: (1 - rho) * g * g + rho * t, grads, state.v)
    lr = self.learning_rate_of(phi)
    updates = jax.tree.map(lambda g, b: -lr.astype(g.dtype) * g * jax.lax.rsqrt(b + self.eps),
                           grads, v)
    return updates, RMSPropState(v)
