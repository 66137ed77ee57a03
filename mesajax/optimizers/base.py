"""The optimizer interface shared by hand-designed and learned optimizers.

An optimizer is a frozen dataclass of *static* options (network width, feature decays, ...) plus a
pytree of *meta-parameters* ``phi`` (network weights, or a log learning rate for a baseline). All
methods are pure functions of pytrees:

* ``init_phi(key) -> phi``: meta-parameters at initialisation (for baselines: from the config's
  hyperparameters, e.g. ``{"log_lr": log(0.1)}``);
* ``init(phi, params) -> state``: per-task optimizer state (a pytree; for recurrent optimizers it
  holds the hidden state, so analyses can read and probe it);
* ``update(phi, state, grads, params, ctx) -> (updates, new_state)``: one step; ``params + updates``
  is the new point (optax's sign convention). ``ctx`` carries the per-step context explicitly.

The learning-rate contract: an optimizer whose ``phi`` holds a learning rate declares
``tunable_lr = True`` and implements ``with_learning_rate(phi, lr)`` (vmappable over ``lr``);
evaluation tunes baselines through it and never looks inside ``phi``. ``learned = True`` marks
optimizers whose ``phi`` is meant to be meta-trained; reports and figures take that label from
the rows (``role``), which take it from here: the class is the one place that knows.
Helpers for writing an optimizer (options checks, a log-learning-rate ``phi``) are in
``mesajax.optimizers.common``.

``as_optax(phi, horizon)`` wraps any optimizer into an ``optax.GradientTransformationExtraArgs`` so a
meta-trained optimizer drops into any Flax/optax training loop (pass ``loss=`` to ``update`` if the
optimizer uses it). This mirrors learned_optimization's ``opt_fn(theta)`` closure (Metz et al. 2022).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mesajax.checks import check_finite_fields

PyTree = Any
Array = jax.Array


class StepContext(NamedTuple):
  """Per-step context passed explicitly to ``Optimizer.update``.

  Attributes:
    step: int32 scalar, the inner step index t = 0, 1, ... of the current task.
    horizon: int32 scalar, the inner horizon T (total number of steps of the task's run).
    loss: float scalar, the training loss at the current parameters (minibatch).
  """

  step: Array
  horizon: Array
  loss: Array


def make_context(step, horizon, loss=0.0) -> StepContext:
  return StepContext(jnp.asarray(step, jnp.int32), jnp.asarray(horizon, jnp.int32),
                     jnp.asarray(loss, jnp.float32))


class OptaxState(NamedTuple):
  step: Array
  inner: PyTree


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Base class; subclasses are frozen dataclasses whose fields are static options."""

  name = "base"
  learned: ClassVar[bool] = False  # True when phi is meant to be meta-trained (neural optimizers)
  tunable_lr: ClassVar[bool] = False  # True when ``with_learning_rate`` is implemented
  #: Options for the registry-wide shared tests (small and quick).
  test_kwargs: ClassVar[dict] = {}

  def init_phi(self, key: Array) -> PyTree:
    raise NotImplementedError

  def init(self, phi: PyTree, params: PyTree) -> PyTree:
    raise NotImplementedError

  def update(self, phi: PyTree, state: PyTree, grads: PyTree, params: PyTree,
             ctx: StepContext) -> tuple[PyTree, PyTree]:
    raise NotImplementedError

  def hidden_state(self, state: PyTree) -> Array | None:
    """Per-parameter hidden state ``[n_params, hidden]`` (params raveled in ``ravel_pytree``
    order) for probing recurrent optimizers; ``None`` for optimizers without one."""
    return None

  def validate(self) -> None:
    """Raises ``ValueError`` with a one-line message when an option is out of range (non-finite
    float options are rejected before this is called, by ``check_finite``)."""

  def check_finite(self) -> None:
    check_finite_fields(self, self.name)

  def with_learning_rate(self, phi: PyTree, learning_rate: Array) -> PyTree:
    """``phi`` with its learning rate set to ``learning_rate`` (a scalar; vmappable over it).

    Only for ``tunable_lr`` optimizers; learning-rate tuning of baselines goes through this."""
    raise ValueError(f"optimizer {self.name!r} has no tunable learning rate")

  def as_optax(self, phi: PyTree, horizon: int = 1000) -> optax.GradientTransformationExtraArgs:
    """This optimizer, with meta-parameters ``phi``, as an optax gradient transformation."""

    def init_fn(params):
      return OptaxState(jnp.zeros([], jnp.int32), self.init(phi, params))

    def update_fn(updates, state, params=None, *, loss=0.0, **unused_extra):
      if params is None:
        raise ValueError(f"{self.name}.as_optax(...).update needs params")
      ctx = make_context(state.step, horizon, loss)
      out, inner = self.update(phi, state.inner, updates, params, ctx)
      return out, OptaxState(state.step + 1, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
