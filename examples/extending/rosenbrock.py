"""Example task family (docs/extending.md): shifted, scaled Rosenbrock valleys.

  f(θ) = Σ_{i<d} [ a·(z_{i+1} − z_i²)² + (1 − z_i)² ],   z = θ − c,

with a per-task valley steepness ``a`` log-uniform in ``[a_min, a_max]`` and offset
``c ~ N(0, offset_scale² I)``; the minimiser is θ* = c + 1. Training gradients carry additive
Gaussian noise of standard deviation ``noise``; the outer loss is the noiseless f. Initial point
θ₀ = c + (−1.2, 1, −1.2, 1, ...) (the classic start) plus ``init_jitter``·N(0, I).

This file is the whole family: register it with one line in ``mesajax/registry.py``::

    "rosenbrock": "examples.extending.rosenbrock:Rosenbrock",

or name it in a config without touching the registry:
``--config.task.name=examples.extending.rosenbrock:Rosenbrock``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mesajax.tasks import data
from mesajax.tasks.base import TaskFamily, check, is_int


@dataclasses.dataclass(frozen=True)
class Rosenbrock(TaskFamily):
  """Random Rosenbrock valleys; knobs: ``dim``, ``a_min``, ``a_max``, ``offset_scale``,
  ``init_jitter``, ``noise``."""

  name = "rosenbrock"
  # Declarations the shared tests, configs and CLI read (see mesajax/tasks/base.py).
  test_shift = dict(dim=3, a_min=1.0, a_max=10.0, offset_scale=0.5, init_jitter=0.0, noise=0.1)
  gd_lr = 1e-3
  default_shifts = {"steep": {"task": {"a_min": 50.0, "a_max": 100.0}},
                    "dim_x2": {"task": {"dim": 8}}}

  dim: int = 4
  a_min: float = 5.0
  a_max: float = 20.0
  offset_scale: float = 1.0
  init_jitter: float = 0.1
  noise: float = 0.0

  def validate(self) -> None:
    check(is_int(self.dim) and self.dim >= 2, f"rosenbrock: dim must be an int >= 2, got {self.dim!r}")
    check(0 < self.a_min <= self.a_max, f"rosenbrock: need 0 < a_min <= a_max, got "
          f"{self.a_min!r}, {self.a_max!r}")
    check(self.offset_scale >= 0, f"rosenbrock: offset_scale must be >= 0, got {self.offset_scale!r}")
    check(self.init_jitter >= 0, f"rosenbrock: init_jitter must be >= 0, got {self.init_jitter!r}")
    check(self.noise >= 0, f"rosenbrock: noise must be >= 0, got {self.noise!r}")

  def sample(self, key):
    z_a, offset = data.normals(key, (), (self.dim,))
    return {"a": data.log_uniform_from_normal(z_a, self.a_min, self.a_max),
            "c": self.offset_scale * offset}

  def init(self, key, task):
    start = jnp.where(jnp.arange(self.dim) % 2 == 0, -1.2, 1.0)
    return {"theta": task["c"] + start + self.init_jitter * jax.random.normal(key, (self.dim,))}

  def outer_loss_full(self, params, task):
    z = params["theta"] - task["c"]
    return jnp.sum(task["a"] * (z[1:] - z[:-1] ** 2) ** 2 + (1.0 - z[:-1]) ** 2)

  def train_loss_full(self, params, task):
    return self.outer_loss_full(params, task)

  def train_loss(self, params, task, key):
    loss = self.outer_loss_full(params, task)
    if self.noise > 0:
      loss = loss + self.noise * jax.random.normal(key, (self.dim,)) @ params["theta"]
    return loss

  def oracle(self, task):
    """The minimiser θ* = c + 1 (outer loss 0)."""
    return {"theta": task["c"] + 1.0}
