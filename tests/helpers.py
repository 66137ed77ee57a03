"""Small shared pieces for tests (not a test module)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from mesajax.optimizers.base import Optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(optimizer=None, **meta):
  """The quickstart config at smoke size, resolved, with ``meta`` overrides (and optionally another
  optimizer, by registry name, with its default options)."""
  import ml_collections
  from configs.quickstart import get_config
  from mesajax.config import resolve
  from mesajax.registry import optimizer_kwargs
  c = get_config("smoke")
  if optimizer is not None:
    c.optimizer.name = optimizer
    c.optimizer.kwargs = ml_collections.ConfigDict(optimizer_kwargs(optimizer))
  for k, v in meta.items():
    c.meta[k] = v
  return resolve(c)


@dataclasses.dataclass(frozen=True)
class DiagSGD(Optimizer):
  """Test optimizer with a vector of meta-parameters: u = −exp(φ) ⊙ g (per-coordinate rates)."""

  dim: int = 4
  learning_rate: float = 0.1
  name = "diag_sgd"
  learned = True

  def init_phi(self, key):
    return {"log_lr": jnp.full([self.dim], jnp.log(self.learning_rate))
            + 0.3 * jax.random.normal(key, [self.dim])}

  def init(self, phi, params):
    return ()

  def update(self, phi, state, grads, params, ctx):
    lr = jnp.exp(phi["log_lr"])
    return jax.tree.map(lambda g: -lr * g, grads), state


def run_cli(*args, env=None, timeout=300):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=full_env)
