"""Inner runs: apply an optimizer to one task for a fixed number of steps with ``lax.scan``.

Shared by evaluation (loss curves), baseline tuning and the analyses (trajectories). Everything is a
pure function of pytrees: vmap over tasks (and over ``phi`` for a learning-rate grid) from outside.

``InnerDtype(family, "bfloat16")`` is the family whose minibatch losses (``train_loss``,
``outer_loss``) compute their forward and backward pass in bfloat16 — the parameters and the
task's floating arrays are cast on entry, the loss is returned in float32, and the gradient
reaching the optimizer is float32 again (the cast's transpose) — while parameters, optimizer
state, meta-parameters and the full-batch losses (normalisers, evaluation) stay float32
(``meta.inner_dtype``; its effect on the meta-gradient is measured in docs/performance.md).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mesajax.optimizers.base import make_context

PyTree = Any


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


class InnerDtype:
  """A task-family view computing ``train_loss`` / ``outer_loss`` in ``dtype`` (module docstring);
  every other attribute is the wrapped family's."""

  def __init__(self, family, dtype: str):
    self.family, self.dtype = family, jnp.dtype(dtype)

  def train_loss(self, params, task, key):
    loss = self.family.train_loss(_cast(params, self.dtype), _cast(task, self.dtype), key)
    return loss.astype(jnp.float32)

  def outer_loss(self, params, task, key):
    loss = self.family.outer_loss(_cast(params, self.dtype), _cast(task, self.dtype), key)
    return loss.astype(jnp.float32)

  def __getattr__(self, name):
    return getattr(self.family, name)

  def __hash__(self):
    return hash(("InnerDtype", self.family, str(self.dtype)))

  def __eq__(self, other):
    return (isinstance(other, InnerDtype) and other.family == self.family
            and other.dtype == self.dtype)


def with_inner_dtype(family, dtype: str):
  """``family`` itself for float32, else its ``InnerDtype`` view."""
  return family if jnp.dtype(dtype) == jnp.float32 else InnerDtype(family, dtype)


class InnerState(NamedTuple):
  params: PyTree
  opt_state: PyTree
  step: jax.Array  # int32 scalar


def init_inner(opt, phi, family, task, key) -> InnerState:
  params = family.init(key, task)
  return InnerState(params, opt.init(phi, params), jnp.zeros([], jnp.int32))


def inner_step(opt, phi, family, task, state: InnerState, key, horizon):
  """One inner step on the minibatch training loss. Returns (new_state, train_loss)."""
  loss, grads = jax.value_and_grad(family.train_loss)(state.params, task, key)
  ctx = make_context(state.step, horizon, loss)
  updates, opt_state = opt.update(phi, state.opt_state, grads, state.params, ctx)
  params = jax.tree.map(jnp.add, state.params, updates)
  return InnerState(params, opt_state, state.step + 1), loss


def run_curve(opt, phi, family, task, key, num_steps: int, horizon: int | None = None,
              every: int = 1):
  """Runs ``num_steps`` inner steps from ``family.init``; returns a dict of curves.

  ``outer_loss[i]`` / ``train_loss_full[i]`` are the deterministic full-batch losses after
  ``i * every`` steps (index 0 is the initial point), so each has ``num_steps // every + 1`` entries.
  """
  if num_steps % every:
    raise ValueError(f"num_steps={num_steps} must be a multiple of every={every}")
  horizon = num_steps if horizon is None else horizon
  k_init, k_run = jax.random.split(key)
  state = init_inner(opt, phi, family, task, k_init)

  def measure(params):
    return family.outer_loss_full(params, task), family.train_loss_full(params, task)

  def block(state, keys):
    def body(s, k):
      s, _ = inner_step(opt, phi, family, task, s, k, horizon)
      return s, None
    state, _ = jax.lax.scan(body, state, keys)
    return state, measure(state.params)

  o0, t0 = measure(state.params)
  keys = jax.random.split(k_run, num_steps).reshape(num_steps // every, every, -1)
  state, (outer, train) = jax.lax.scan(block, state, keys)
  return {
      "outer_loss": jnp.concatenate([o0[None], outer]),
      "train_loss_full": jnp.concatenate([t0[None], train]),
      "final_state": state,
  }


def run_trajectory(opt, phi, family, task, key, num_steps: int, horizon: int | None = None):
  """Runs ``num_steps`` steps and records every visited point and optimizer state.

  Returns ``(states, keys)`` where ``states`` is an ``InnerState`` whose leaves have a leading axis
  of length ``num_steps + 1`` (the state *before* step t, and the final state), and ``keys`` are the
  minibatch keys used at each step. For analyses (small problems): memory is O(num_steps * state).
  """
  horizon = num_steps if horizon is None else horizon
  k_init, k_run = jax.random.split(key)
  state = init_inner(opt, phi, family, task, k_init)
  keys = jax.random.split(k_run, num_steps)

  def body(s, k):
    s2, _ = inner_step(opt, phi, family, task, s, k, horizon)
    return s2, s

  final, states = jax.lax.scan(body, state, keys)
  states = jax.tree.map(lambda xs, x: jnp.concatenate([xs, x[None]]), states, final)
  return states, keys
