"""Truncated inner unrolls with staggered starts (the meta-training inner loop).

Each task in the batch runs its own trajectory of ``horizon`` inner steps; meta-training sees it in
truncations of ``unroll_length`` steps (Metz et al. 2019, "Understanding and correcting pathologies
in the training of learned optimizers"; learned_optimization's ``TruncatedStep``). Trajectories start
at staggered steps so the batch covers the whole horizon at every outer step; when a trajectory ends,
the next truncation starts a fresh task. Starts and horizons are multiples of the truncation length,
so a reset only ever happens at the start of a truncation (which keeps PES's perturbation
bookkeeping exact).

Per-step outer objective (``outer_objective``):
  * ``mean_train``: mean over the truncation of the minibatch training loss at each visited point;
  * ``mean_outer``: mean over the truncation of the outer (validation) loss after each step;
  * ``final_outer``: the outer loss at the end of the truncation.
Each loss is divided by the task's loss at initialisation (a per-task normaliser, so families and
tasks of different scales mix) and transformed (``loss_transform``): ``clip`` caps it at 1 (the
initial value; Metz et al. 2019), ``log`` takes its log, ``none`` leaves it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mesajax.rollout import InnerState, init_inner, inner_step

PyTree = Any

OBJECTIVES = ("mean_train", "mean_outer", "final_outer")
TRANSFORMS = ("clip", "log", "none")


class TruncState(NamedTuple):
  """One task's trajectory (batched over tasks by a leading axis)."""

  inner: InnerState
  task: PyTree
  norm: jax.Array  # the task's loss at initialisation (normaliser)
  key: jax.Array   # this trajectory's key stream (task resampling, init)


class Unroller(NamedTuple):
  """The static pieces of an unroll: optimizer, family and sizes (closed over by jit)."""

  opt: Any
  family: Any
  horizon: int
  unroll_length: int
  outer_objective: str = "mean_outer"
  loss_transform: str = "clip"

  # --- trajectories --------------------------------------------------------------------------
  def fresh(self, phi, key) -> TruncState:
    """A new task and its initial inner state, at step 0."""
    k_task, k_init, k_next = jax.random.split(key, 3)
    task = self.family.sample(k_task)
    inner = init_inner(self.opt, phi, self.family, task, k_init)
    norm = self._normaliser(inner.params, task)
    return TruncState(inner, task, norm, k_next)

  def _normaliser(self, params, task):
    if self.outer_objective == "mean_train":
      loss = self.family.train_loss_full(params, task)
    else:
      loss = self.family.outer_loss_full(params, task)
    return jnp.maximum(jnp.abs(loss), 1e-12)

  def init(self, phi, key) -> TruncState:
    """A fresh trajectory advanced to a random multiple of the truncation length (staggering)."""
    k_fresh, k_start = jax.random.split(key)
    ts = self.fresh(phi, k_fresh)
    num_truncations = self.horizon // self.unroll_length
    start = jax.random.randint(k_start, [], 0, num_truncations) * self.unroll_length
    # Staggering starts the step counter mid-horizon on a freshly initialised task (as
    # learned_optimization does); the first trajectory of each slot is therefore shorter.
    return ts._replace(inner=ts.inner._replace(step=start.astype(jnp.int32)))

  def maybe_reset(self, phi, ts: TruncState) -> TruncState:
    """Starts a fresh task where the trajectory has reached the horizon (or went non-finite)."""
    done = ts.inner.step >= self.horizon
    new = self.fresh(phi, ts.key)
    return jax.tree.map(lambda a, b: jnp.where(done, a, b), new, ts)

  # --- the objective -------------------------------------------------------------------------
  def transform(self, loss, norm):
    x = loss / norm
    if self.loss_transform == "clip":
      return jnp.minimum(x, 1.0)
    if self.loss_transform == "log":
      return jnp.log(jnp.maximum(x, 1e-8))
    return x

  def unroll(self, phi, ts: TruncState, key) -> tuple[TruncState, jax.Array]:
    """``unroll_length`` inner steps of one task from ``ts`` (which must not be at its horizon).

    Returns the new state and the scalar truncation loss (differentiable w.r.t. ``phi``).
    ``key`` drives the minibatches; antithetic pairs share it (common random numbers).
    """
    keys = jax.random.split(key, self.unroll_length)

    def body(inner, k):
      k_train, k_outer = jax.random.split(k)
      new, train_loss = inner_step(self.opt, phi, self.family, ts.task, inner, k_train,
                                   self.horizon)
      if self.outer_objective == "mean_train":
        loss = train_loss
      elif self.outer_objective == "mean_outer":
        loss = self.family.outer_loss(new.params, ts.task, k_outer)
      else:
        loss = jnp.zeros([])
      return new, self.transform(loss, ts.norm)

    inner, losses = jax.lax.scan(body, ts.inner, keys)
    if self.outer_objective == "final_outer":
      final = self.family.outer_loss(inner.params, ts.task, keys[-1])
      truncation_loss = self.transform(final, ts.norm)
    else:
      truncation_loss = jnp.mean(losses)
    return ts._replace(inner=inner), truncation_loss


def mark_nonfinite_done(ts: TruncState, horizon: int) -> TruncState:
  """Sends tasks whose inner state went non-finite to their horizon, so they restart fresh."""
  leaves = jax.tree.leaves((ts.inner.params, ts.inner.opt_state))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.floating)]))
  step = jnp.where(finite, ts.inner.step, jnp.int32(horizon))
  return ts._replace(inner=ts.inner._replace(step=step))
