"""Example optimizer (docs/extending.md): Lion (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms"), with a tunable (and meta-trainable) learning rate.

  c_t = β₁ m_{t−1} + (1 − β₁) g_t,   u_t = −η (sign(c_t) + λ θ_t),   m_t = β₂ m_{t−1} + (1 − β₂) g_t.

Matches ``optax.lion(η, b1=β₁, b2=β₂, weight_decay=λ)`` step for step (tests/test_extending.py).
This file is the whole optimizer: register it with one line in ``mesajax/registry.py``::

    "lion": "examples.extending.lion:Lion",

or name it directly: ``--config.eval.baselines='("sgd", "examples.extending.lion:Lion")'``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mesajax.optimizers.base import Optimizer, PyTree
from mesajax.optimizers.common import LogLearningRate, check, zeros_like_tree


class LionState(NamedTuple):
  m: PyTree  # EMA of gradients at β₂


@dataclasses.dataclass(frozen=True)
class Lion(LogLearningRate, Optimizer):
  """Lion; the learning rate lives in ``phi = {"log_lr": ...}`` (``LogLearningRate``)."""

  name = "lion"
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 0.0

  def validate(self) -> None:
    check(self.learning_rate > 0, f"lion: learning_rate must be > 0, got {self.learning_rate}")
    check(0 <= self.b1 < 1, f"lion: b1 must be in [0, 1), got {self.b1}")
    check(0 <= self.b2 < 1, f"lion: b2 must be in [0, 1), got {self.b2}")
    check(self.weight_decay >= 0, f"lion: weight_decay must be >= 0, got {self.weight_decay}")

  def init(self, phi, params):
    return LionState(zeros_like_tree(params))

  def update(self, phi, state, grads, params, ctx):
    lr = self.learning_rate_of(phi)
    c = jax.tree.map(lambda g, m: self.b1 * m + (1 - self.b1) * g, grads, state.m)
    u = jax.tree.map(lambda ci, p: -lr.astype(p.dtype) * (jnp.sign(ci) + self.weight_decay * p),
                     c, params)
    m = jax.tree.map(lambda g, m: self.b2 * m + (1 - self.b2) * g, grads, state.m)
    return u, LionState(m)
