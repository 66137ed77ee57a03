"""Update fields: the optimizer's update as a function of the flat parameter vector.

The analyses study the *update field* of an optimizer at a point of an inner run,

  u(θ) = opt.update(φ, s, ∇L_train(θ), θ, ctx(θ))[0]            (state s frozen),

as a map R^n → R^n on the raveled parameters (``jax.flatten_util.ravel_pytree`` order), with the
deterministic full-batch training gradient. ``ctx(θ)`` is the point's step context with its
``loss`` replaced by the full-batch training loss at θ, so a loss-conditioned learned optimizer
sees the loss that belongs to θ. Its Jacobian J = ∂u/∂θ is what NCI measures: one Jacobian-vector
product of u costs about one Hessian-vector product of L_train (forward-over-reverse) plus one
forward-mode pass through ``opt.update``.

Also here: the update as a function of the gradient at fixed θ (for the optimizer's own diagonal
sensitivity ∂u/∂g). The analyses use full batches throughout (``mesajax.tasks.views.FullBatch``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mesajax.optimizers.base import StepContext

PyTree = Any
Array = jax.Array
FlatField = Callable[[Array], Array]


def with_loss(ctx: StepContext, loss: Array) -> StepContext:
  """``ctx`` with ``loss`` replaced (keeping a float64 loss float64 in the float64 analyses)."""
  loss = jnp.asarray(loss)
  return ctx._replace(loss=loss if loss.dtype == jnp.float64 else loss.astype(jnp.float32))


def update_field(opt, phi, family, task, opt_state, ctx: StepContext, params_like: PyTree,
                 state_fn: Callable | None = None) -> FlatField:
  """The flat update field θ ↦ (u(θ), ∇L_train(θ)) with the optimizer state frozen.

  Returns a function of the flat parameter vector giving ``(u_flat, grad_flat)`` (use
  ``jax.linearize(field, theta, has_aux=True)``). ``params_like`` fixes the pytree structure.
  ``state_fn(grads, params, ctx) -> state``, if given, replaces the frozen state by a state that
  depends on the gradient (the quasi-static effective update ū uses the fixed point s*(g)).
  Cost per evaluation: one gradient of L_train and one ``opt.update``.
  """
  _, unravel = ravel_pytree(params_like)

  def field(theta_flat):
    params = unravel(theta_flat)
    loss, grads = jax.value_and_grad(family.train_loss_full)(params, task)
    c = with_loss(ctx, loss)
    state = opt_state if state_fn is None else state_fn(grads, params, c)
    updates, _ = opt.update(phi, state, grads, params, c)
    return ravel_pytree(updates)[0], ravel_pytree(grads)[0]

  return field


def update_of_grad(opt, phi, opt_state, params: PyTree, ctx: StepContext,
                   state_fn: Callable | None = None) -> FlatField:
  """g_flat ↦ u_flat at fixed θ = ``params`` and frozen state: the update as a function of the
  gradient input alone (its Jacobian ∂u/∂g is the optimizer's preconditioner at this point)."""
  _, unravel = ravel_pytree(params)

  def u_of_g(g_flat):
    grads = unravel(g_flat)
    state = opt_state if state_fn is None else state_fn(grads, params, ctx)
    updates, _ = opt.update(phi, state, grads, params, ctx)
    return ravel_pytree(updates)[0]

  return u_of_g


def diag_sensitivity(u_of_g: FlatField, g_flat: Array, z_KxN: Array) -> Array:
  """Hutchinson estimate of diag(∂u/∂g): mean over Rademacher rows z of z ⊙ (∂u/∂g) z.

  Exact (with any number of probes) when ∂u/∂g is diagonal, i.e. for every per-coordinate rule
  (SGD, momentum, Adam, RMSProp with frozen state); off-diagonal couplings (e.g. a learned rule's
  per-tensor normalisation) add zero-mean noise of order ‖offdiag row‖/√K.
  Cost: K JVPs of ``opt.update`` (no Hessian products). ``z_KxN``: ±1 entries.
  """
  _, lin = jax.linearize(u_of_g, g_flat)
  jz_KxN = jax.vmap(lin)(z_KxN)
  return jnp.mean(z_KxN * jz_KxN, axis=0)


def cosine(a: Array, b: Array, eps: float = 1e-30) -> Array:
  return jnp.vdot(a, b) / jnp.sqrt(jnp.maximum(jnp.vdot(a, a) * jnp.vdot(b, b), eps))
