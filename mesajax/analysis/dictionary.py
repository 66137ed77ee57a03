"""The dictionary of candidate objectives φ_k for the implicit-objective and endpoint fits.

Generic terms (every family), in this order, then the family's ``proxies()``:

  train_loss    L_train(θ)                  full batch
  outer_loss    L_outer(θ)                  full batch (validation loss of the same task)
  l2            ½‖θ‖²                       weight decay
  l2_init       ½‖θ − θ₀‖²                  decay toward the initialisation
  grad_norm_sq  ½‖∇L_train(θ)‖²             implicit gradient regularisation (Barrett & Dherin
                                             2021);
                                             its gradient H∇L_train is one forward-over-reverse HVP

Cost per point: one reverse-mode gradient per term plus one HVP for ``grad_norm_sq``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any
Array = jax.Array
GENERIC_TERMS = ("train_loss", "outer_loss", "l2", "l2_init", "grad_norm_sq")


def term_names(family) -> tuple[str, ...]:
  return GENERIC_TERMS + tuple(family.proxies().keys())


def values_and_grads(family, task: PyTree, params: PyTree, params0: PyTree) -> tuple[Array, Array]:
  """Values ``[K]`` and flat gradients ``[K, n]`` of every dictionary term at ``params``."""
  theta, unravel = ravel_pytree(params)
  theta0 = ravel_pytree(params0)[0]
  flat = lambda t: ravel_pytree(t)[0]
  lt, gt = jax.value_and_grad(family.train_loss_full)(params, task)
  lo, go = jax.value_and_grad(family.outer_loss_full)(params, task)
  g_train = flat(gt)
  hvp = jax.jvp(lambda th: flat(jax.grad(family.train_loss_full)(unravel(th), task)),
                (theta,), (g_train,))[1]
  vals = [lt, lo, 0.5 * theta @ theta, 0.5 * (theta - theta0) @ (theta - theta0),
          0.5 * g_train @ g_train]
  grads = [g_train, flat(go), theta, theta - theta0, hvp]
  for fn in family.proxies().values():
    v, g = jax.value_and_grad(fn)(params, task)
    vals.append(v)
    grads.append(flat(g))
  return jnp.stack(vals).astype(jnp.float32), jnp.stack(grads)
