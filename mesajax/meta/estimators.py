"""Meta-gradient estimators over a batch of truncated unrolls: one class per estimator.

Every estimator has the same interface (:class:`Estimator`): ``init(phi, key) -> est_state`` and
``estimate(phi, est_state, key) -> (est_state, meta_loss, grad)``, pure functions with every
per-task array batched on a leading task axis (the axis that shards over devices).
``meta_loss`` is the mean truncation loss over tasks at ``phi`` (for ES/PES, the mean of the
antithetic pair). Estimators are picked by name (``mesajax.registry.ESTIMATORS``).

* :class:`TBPTT` (``tbptt``): truncated backpropagation through the unroll, ∇_φ of the truncation
  loss with the starting state held fixed (biased toward short horizons: Wu et al. 2018; Metz et
  al. 2019).
* :class:`ES` (``es``): antithetic evolution strategies on each truncation (Salimans et al. 2017):
  ĝ = mean_i (L(φ+ε_i) − L(φ−ε_i)) ε_i / (2σ²), ε_i ~ N(0, σ²I); the trajectory continues along
  the positive perturbation. Unbiased for the Gaussian-smoothed truncation loss only.
* :class:`PES` (``pes``): Persistent ES (Vicol, Metz & Sohl-Dickstein 2021, ICML): particles keep
  their own antithetic inner states and the sum ξ_i of all perturbations since their trajectory
  started; ĝ = mean_i ξ_i (L(φ+ε_i; s⁺_i) − L(φ−ε_i; s⁻_i)) / (2σ²). Unbiased for the gradient of
  the smoothed loss of the whole trajectory across truncations.

Inner steps per estimate: tbptt counts ``num_tasks × K`` forward steps, es and pes
``2 × num_tasks × K`` (both branches); see ``inner_steps_per_estimate``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mesajax.meta.truncation import TruncState, Unroller, mark_nonfinite_done

PyTree = Any


class PESState(NamedTuple):
  """PES particles. ``ts`` holds both antithetic branches stacked on the task axis — rows
  ``[0, N)`` are the positive branches, ``[N, 2N)`` the negative ones — so each outer step runs one
  vmapped unroll over 2N without concatenating or splitting states."""

  ts: TruncState  # leading axis 2N: positive branches, then negative branches
  xi: PyTree      # accumulated perturbations, phi-shaped leaves with a leading task axis N


def _tree_normal(key, tree, sigma):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([sigma * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _add(a, b, sign=1.0):
  return jax.tree.map(lambda x, y: x + sign * y, a, b)


def _cat(a, b):
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def _rows(tree, lo, hi):
  return jax.tree.map(lambda x: x[lo:hi], tree)


def _weighted_mean(eps_batch, weights):
  """mean_i weights_i · eps_i over the leading task axis, leaf by leaf."""
  return jax.tree.map(lambda e: jnp.tensordot(weights, e, axes=1) / weights.shape[0], eps_batch)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """The shared part: the unroller, the task batch, and the task-axis sharding constraint."""

  unroller: Unroller
  num_tasks: int
  sigma: float = 0.01
  constrain: Callable | None = None  # pytree -> pytree: shards the task axis (None: identity)

  branches = 1  # inner unrolls per task per estimate

  def _c(self, tree):
    return tree if self.constrain is None else self.constrain(tree)

  def _fresh_batch(self, phi, key) -> TruncState:
    keys = jax.random.split(key, self.num_tasks)
    return self._c(jax.vmap(self.unroller.init, in_axes=(None, 0))(phi, keys))

  def _reset(self, phi, ts: TruncState) -> TruncState:
    return jax.vmap(self.unroller.maybe_reset, in_axes=(None, 0))(phi, ts)

  def _finish(self, ts: TruncState) -> TruncState:
    return self._c(jax.vmap(mark_nonfinite_done, in_axes=(0, None))(ts, self.unroller.horizon))

  def _data_keys(self, key):
    return jax.random.split(key, self.num_tasks)

  def _perturbations(self, phi, key):
    """ε_i ~ N(0, σ²I) per task, and φ ± ε_i broadcast over tasks."""
    eps = self._c(jax.vmap(lambda k: _tree_normal(k, phi, self.sigma))(
        jax.random.split(key, self.num_tasks)))
    phi_b = jax.tree.map(lambda p: jnp.broadcast_to(p, (self.num_tasks,) + p.shape), phi)
    return eps, _add(phi_b, eps), _add(phi_b, eps, -1.0)

  def _unroll_2n(self, phi_2n, ts_2n, data_keys):
    """Both antithetic branches as one vmapped unroll over 2N (wider, better-vectorised matmuls);
    both branches of a task share its minibatch keys (common random numbers)."""
    unroll = jax.vmap(self.unroller.unroll, in_axes=(0, 0, 0))
    return unroll(phi_2n, ts_2n, jnp.concatenate([data_keys, data_keys]))

  # --- the interface ---------------------------------------------------------------------------
  def init(self, phi, key) -> PyTree:
    return self._fresh_batch(phi, key)

  def estimate(self, phi, state, key) -> tuple[PyTree, jax.Array, PyTree]:
    raise NotImplementedError

  def trajectories(self, state) -> TruncState:
    """The (positive-branch) trajectories of the batch, ``[num_tasks, ...]``."""
    return state

  def inner_steps_per_estimate(self) -> int:
    return self.branches * self.unroller.unroll_length * self.num_tasks


class TBPTT(Estimator):
  """Truncated backpropagation through each truncation (module docstring)."""

  def estimate(self, phi, state, key):
    data_keys = self._data_keys(key)
    ts = self._reset(phi, state)

    def loss_fn(phi):
      new, losses = jax.vmap(self.unroller.unroll, in_axes=(None, 0, 0))(phi, ts, data_keys)
      return jnp.mean(losses), new

    (loss, new), grad = jax.value_and_grad(loss_fn, has_aux=True)(phi)
    return self._finish(new), loss, grad


class ES(Estimator):
  """Antithetic evolution strategies on each truncation (module docstring)."""

  branches = 2

  def estimate(self, phi, state, key):
    k_data, k_eps = jax.random.split(key)
    data_keys = self._data_keys(k_data)
    eps, phi_pos, phi_neg = self._perturbations(phi, k_eps)
    ts = self._reset(phi, state)
    new, losses = self._unroll_2n(_cat(phi_pos, phi_neg), _cat(ts, ts), data_keys)
    n = self.num_tasks
    l_pos, l_neg = losses[:n], losses[n:]
    grad = _weighted_mean(eps, (l_pos - l_neg) / (2 * self.sigma ** 2))
    return self._finish(_rows(new, 0, n)), jnp.mean(0.5 * (l_pos + l_neg)), grad


class PES(Estimator):
  """Persistent evolution strategies (module docstring)."""

  branches = 2

  def init(self, phi, key) -> PESState:
    ts = self._fresh_batch(phi, key)
    xi = jax.tree.map(lambda x: jnp.zeros((self.num_tasks,) + x.shape, x.dtype), phi)
    return PESState(self._c(_cat(ts, ts)), self._c(xi))

  def trajectories(self, state: PESState) -> TruncState:
    return _rows(state.ts, 0, self.num_tasks)

  def estimate(self, phi, state: PESState, key):
    k_data, k_eps = jax.random.split(key)
    data_keys = self._data_keys(k_data)
    eps, phi_pos, phi_neg = self._perturbations(phi, k_eps)
    n = self.num_tasks
    # Both branches of a particle share their key stream and step counter, so they reset
    # together to the same fresh task; the fresh state is computed once for the pair.
    pos = self.trajectories(state)
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
    return PESState(ts, self._c(xi)), jnp.mean(0.5 * (l_pos + l_neg)), grad


def make_estimator(name: str, unroller: Unroller, num_tasks: int, sigma: float = 0.01,
                   constrain: Callable | None = None) -> Estimator:
  """The estimator registered as ``name`` (``mesajax.registry.ESTIMATORS``)."""
  from mesajax.registry import estimator_class
  return estimator_class(name)(unroller, num_tasks, sigma, constrain)
