"""Public helpers for writing an optimizer (see ``docs/extending.md``).

* ``check(cond, msg)``: a one-line ``ValueError`` for an out-of-range option (in ``validate``).
* :class:`LogLearningRate`: a mixin for optimizers whose only meta-parameter is a learning rate,
  kept as ``phi = {"log_lr": log(lr)}`` so a learning-rate grid is a ``vmap`` over ``phi`` and the
  rate itself can be meta-trained (Wu et al. 2018). It provides ``init_phi``, ``learning_rate_of``
  and the learning-rate contract (``tunable_lr``, ``with_learning_rate``) of
  ``mesajax.optimizers.base.Optimizer``.
* ``zeros_like_tree(params)``: a zero state leaf per parameter leaf.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mesajax.checks import check  # noqa: F401 (re-exported for optimizer modules)

PyTree = Any


def zeros_like_tree(params: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, params)


class LogLearningRate:
  """Mixin: ``phi = {"log_lr": log(self.learning_rate)}``. Put it before ``Optimizer`` in the bases
  and give the dataclass a ``learning_rate`` field."""

  tunable_lr = True

  def init_phi(self, key=None) -> dict:
    del key
    return {"log_lr": jnp.asarray(math.log(self.learning_rate), jnp.float32)}

  @staticmethod
  def learning_rate_of(phi) -> jax.Array:
    """η = exp(phi["log_lr"]) as float32."""
    return jnp.exp(jnp.asarray(phi["log_lr"], jnp.float32))

  def with_learning_rate(self, phi, learning_rate) -> dict:
    return dict(phi, log_lr=jnp.log(jnp.asarray(learning_rate, jnp.float32)))
