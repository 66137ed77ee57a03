"""SGD with a meta-learnable piecewise-constant learning-rate schedule (Wu et al. 2018).

The horizon T is cut into ``num_buckets`` = K equal pieces; step t uses the rate of piece
k(t) = min(K − 1, ⌊K t / T⌋):

  u_t = −η_{k(t)} g_t,    φ = {"log_lrs": [log η_0, …, log η_{K−1}]}.

Meta-training φ with truncations of T / K steps (``meta.unroll_length``) and the loss at each
truncation's end (``meta.outer_objective = final_outer``) optimises each piece for the loss a few
steps ahead: the greedy schedule whose "short-horizon bias" Wu et al. (2018, "Understanding
short-horizon bias in stochastic meta-optimization", ICLR) analyse on noisy quadratics; full
unrolls of T steps optimise every piece for the final loss. ``experiments/horizon`` compares both
with their closed forms.

``with_learning_rate(phi, lr)`` sets every piece to ``lr`` (a constant schedule), so evaluation can
tune it like SGD. ``learning_rate`` is the initial rate of every piece.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mesajax.optimizers.base import Optimizer, StepContext
from mesajax.optimizers.common import check


class ScheduleState(NamedTuple):
  pass


@dataclasses.dataclass(frozen=True)
class SGDSchedule(Optimizer):
  """SGD whose learning rate is a meta-learnable piecewise-constant schedule (module docstring)."""

  learning_rate: float = 0.1
  num_buckets: int = 10

  name = "sgd_schedule"
  tunable_lr = True

  def validate(self) -> None:
    check(self.learning_rate > 0,
          f"sgd_schedule: learning_rate must be > 0, got {self.learning_rate}")
    check(isinstance(self.num_buckets, int) and not isinstance(self.num_buckets, bool)
          and self.num_buckets >= 1,
          f"sgd_schedule: num_buckets must be an int >= 1, got {self.num_buckets!r}")

  def init_phi(self, key=None) -> dict:
    del key
    return {"log_lrs": jnp.full((self.num_buckets,), math.log(self.learning_rate), jnp.float32)}

  def with_learning_rate(self, phi, learning_rate) -> dict:
    lr = jnp.asarray(learning_rate, jnp.float32)
    return dict(phi, log_lrs=jnp.broadcast_to(jnp.log(lr)[..., None],
                                              jnp.shape(lr) + (self.num_buckets,)))

  def bucket(self, step, horizon) -> jax.Array:
    """k(t) = min(K − 1, ⌊K t / T⌋) (int32)."""
    k = (jnp.asarray(step, jnp.int32) * self.num_buckets) // jnp.maximum(
        jnp.asarray(horizon, jnp.int32), 1)
    return jnp.clip(k, 0, self.num_buckets - 1)

  def learning_rates(self, phi) -> jax.Array:
    """[K] the schedule η_k."""
    return jnp.exp(jnp.asarray(phi["log_lrs"], jnp.float32))

  def init(self, phi, params):
    return ScheduleState()

  def update(self, phi, state, grads, params, ctx: StepContext):
    lr = self.learning_rates(phi)[self.bucket(ctx.step, ctx.horizon)]
    return jax.tree.map(lambda g: -lr.astype(g.dtype) * g, grads), state
