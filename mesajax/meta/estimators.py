"""Meta-gradient estimators over a batch of truncated unrolls.

Each estimator is a pair of pure functions ``init(phi, key) -> est_state`` and
``estimate(phi, est_state, key) -> (est_state, meta_loss, grad, aux)`` with every per-task array
batched on a leading task axis (the axis that shards over devices). ``meta_loss`` is the mean
truncation loss over tasks at ``phi`` (for ES/PES, the mean of the antithetic pair).

* ``tbptt``: truncated backpropagation through the unroll, ∇_φ of the truncation loss with the
  starting state held fixed (biased toward short horizons: Wu et al. 2018; Metz et al. 2019).
* ``es``: antithetic evolution strategies on each truncation (Salimans et al. 2017):
  ĝ = mean_i (L(φ+ε_i) − L(φ−ε_i)) ε_i / (2σ²), ε_i ~ N(0, σ²I); the trajectory continues along
  the positive perturbation. Unbiased for the Gaussian-smoothed truncation loss only.
* ``pes``: Persistent ES (Vicol, Metz & Sohl-Dickstein 2021, ICML): particles keep their own
  antithetic inner states and the sum ξ_i of all perturbations since their trajectory started;
  ĝ = mean_i ξ_i (L(φ+ε_i; s⁺_i) − L(φ−ε_i; s⁻_i)) / (2σ²). Unbiased for the gradient of the
  smoothed loss of the whole trajectory across truncations.

Inner steps per estimate: tbptt and es count ``num_tasks × K`` forward steps (es: 2×, both
branches), pes ``2 × num_tasks × K``; see ``inner_steps_per_estimate``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mesajax.meta.truncation import TruncState, Unroller, mark_nonfinite_done

PyTree = Any
ESTIMATORS = ("tbptt", "es", "pes")


class PESState(NamedTuple):
  """PES particles. ``ts`` holds both antithetic branches stacked on the task axis — rows
  ``[0, N)`` are the positive branches, ``[N, 2N)`` the negative ones — so each outer step runs one
  vmapped unroll over 2N without concatenating or splitting states."""

  ts: TruncState  # leading axis 2N: positive branches, then negative branches
  xi: PyTree      # accumulated perturbations, phi-shaped leaves with a leading task axis N

  @property
  def num_tasks(self) -> int:
    return jax.tree.leaves(self.xi)[0].shape[0]

  @property
  def pos(self) -> TruncState:
    return jax.tree.map(lambda x: x[:self.num_tasks], self.ts)

  @property
  def neg(self) -> TruncState:
    return jax.tree.map(lambda x: x[self.num_tasks:], self.ts)


def _tree_normal(key, tree, sigma):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([sigma * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _add(a, b, sign=1.0):
  return jax.tree.map(lambda x, y: x + sign * y, a, b)


def _cat(a, b):
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def _weighted_mean(eps_batch, weights):
  """mean_i weights_i · eps_i over the leading task axis, leaf by leaf."""
  return jax.tree.map(lambda e: jnp.tensordot(weights, e, axes=1) / weights.shape[0], eps_batch)


class Estimator(NamedTuple):
  unroller: Unroller
  num_tasks: int
  kind: str = "tbptt"
  sigma: float = 0.01
  constrain: Any = None  # fn(pytree) -> pytree: shards the task axis (identity on one device)

  def _c(self, tree):
    return tree if self.constrain is None else self.constrain(tree)

  def init(self, phi, key):
    keys = jax.random.split(key, self.num_tasks)
    ts = self._c(jax.vmap(self.unroller.init, in_axes=(None, 0))(phi, keys))
    if self.kind != "pes":
      return ts
    xi = jax.tree.map(lambda x: jnp.zeros((self.num_tasks,) + x.shape, x.dtype), phi)
    return PESState(self._c(_cat(ts, ts)), self._c(xi))

  def inner_steps_per_estimate(self) -> int:
    k = self.unroller.unroll_length * self.num_tasks
    return k if self.kind == "tbptt" else 2 * k

  # -------------------------------------------------------------------------------------------
  def _reset(self, phi, ts):
    return jax.vmap(self.unroller.maybe_reset, in_axes=(None, 0))(phi, ts)

  def _finish(self, ts):
    return self._c(jax.vmap(mark_nonfinite_done, in_axes=(0, None))(ts, self.unroller.horizon))

  def _antithetic_unroll(self, phi_pos, phi_neg, ts_pos, ts_neg, data_keys):
    """Both branches as one vmapped unroll over 2 × num_tasks (wider, better-vectorised matmuls)."""
    half = lambda t, i: jax.tree.map(lambda x: x[i * self.num_tasks:(i + 1) * self.num_tasks], t)
    new, losses = self._unroll_2n(_cat(phi_pos, phi_neg), _cat(ts_pos, ts_neg), data_keys)
    return (half(new, 0), half(new, 1)), (losses[:self.num_tasks], losses[self.num_tasks:])

  def _unroll_2n(self, phi_2n, ts_2n, data_keys):
    unroll = jax.vmap(self.unroller.unroll, in_axes=(0, 0, 0))
    return unroll(phi_2n, ts_2n, jnp.concatenate([data_keys, data_keys]))

  def estimate(self, phi, state, key):
    k_data, k_eps = jax.random.split(key)
    data_keys = jax.random.split(k_data, self.num_tasks)
    if self.kind == "tbptt":
      ts, _ = self._reset(phi, state)

      def loss_fn(phi):
        new, losses = jax.vmap(self.unroller.unroll, in_axes=(None, 0, 0))(phi, ts, data_keys)
        return jnp.mean(losses), new

      (loss, new), grad = jax.value_and_grad(loss_fn, has_aux=True)(phi)
      return self._finish(new), loss, grad, {}

    eps = self._c(jax.vmap(lambda k: _tree_normal(k, phi, self.sigma))(
        jax.random.split(k_eps, self.num_tasks)))
    phi_b = jax.tree.map(lambda p: jnp.broadcast_to(p, (self.num_tasks,) + p.shape), phi)
    phi_pos, phi_neg = _add(phi_b, eps), _add(phi_b, eps, -1.0)

    if self.kind == "es":
      ts, _ = self._reset(phi, state)
      (new_pos, _), (l_pos, l_neg) = self._antithetic_unroll(phi_pos, phi_neg, ts, ts, data_keys)
      grad = _weighted_mean(eps, (l_pos - l_neg) / (2 * self.sigma ** 2))
      return self._finish(new_pos), jnp.mean(0.5 * (l_pos + l_neg)), grad, {}

    # PES: both branches of a particle share their key stream and step counter, so they reset
    # together to the same fresh task; the fresh state is computed once for the pair.
    n = self.num_tasks
    pos = state.pos
    done = pos.inner.step >= self.unroller.horizon
    fresh = jax.vmap(self.unroller.fresh, in_axes=(None, 0))(phi, pos.key)
    done_2n = jnp.concatenate([done, done])
    ts = jax.tree.map(lambda a, b: jnp.where(done_2n.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                      _cat(fresh, fresh), state.ts)
    xi = jax.tree.map(lambda x, e: jnp.where(done.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x) + e,
                      state.xi, eps)
    ts, losses = self._unroll_2n(_cat(phi_pos, phi_neg), ts, data_keys)
    l_pos, l_neg = losses[:n], losses[n:]
    grad = _weighted_mean(xi, (l_pos - l_neg) / (2 * self.sigma ** 2))
    ts = self._finish(ts)
    # A particle whose either branch went non-finite restarts both branches together.
    step = jnp.maximum(ts.inner.step[:n], ts.inner.step[n:])
    ts = ts._replace(inner=ts.inner._replace(step=jnp.concatenate([step, step])))
    return PESState(ts, self._c(xi)), jnp.mean(0.5 * (l_pos + l_neg)), grad, {}
