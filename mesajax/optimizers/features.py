"""Per-parameter input features shared by the learned optimizers.

The learned optimizers are coordinatewise: one small network is applied to every scalar parameter.
For speed, each leaf's features are built as one ``x_FxN`` array (feature-major, normalised along
the parameter axis), then transposed and stacked over leaves into one ``x_NxF`` matrix (one row
per parameter, in ``ravel_pytree`` order: leaves in ``jax.tree.leaves`` order, each flattened in C
order).
The network runs as dense matmuls on it (rows stay contiguous with a vmapped task axis, so XLA sees
one ``[tasks·N, F] @ [F, H]`` matmul), and the result is split back per leaf.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# Metz et al.'s time-feature scales τ (learned_optimization's MLPLOpt): tanh(t/τ − 1) per τ.
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)


def second_moment_normalize(x_FxN: jax.Array, eps: float) -> jax.Array:
  """x · rsqrt(mean over the tensor of x² + ε), per feature (row) of one leaf's ``x_FxN``.

  Each feature is divided by its root-mean-square over the tensor (Metz et al. 2019), so the
  normalised features are invariant to rescaling the gradient (up to ε).
  """
  return x_FxN * jax.lax.rsqrt(jnp.mean(jnp.square(x_FxN), axis=1, keepdims=True) + eps)


def time_features(step: jax.Array, time_scales: Sequence[float]) -> jax.Array:
  """tanh(t/τ − 1) for each τ in ``time_scales`` (Metz et al.'s step embedding), shape ``[S]``."""
  inv_tau = jnp.asarray([1.0 / s for s in time_scales], jnp.float32)
  return jnp.tanh(jnp.asarray(step, jnp.float32) * inv_tau - 1.0)


def log_sign_preprocess(g_N: jax.Array, p: float = 10.0) -> jax.Array:
  """Andrychowicz et al. (2016, appendix A) gradient preprocessing, shape ``[2, N]``.

  g ↦ (log|g| / p, sign g) if |g| ≥ e^{−p}, else (−1, e^p g). Written with a clipped |g| inside the
  log so that neither branch produces inf/NaN in value or gradient.
  """
  thresh = jnp.exp(-p)
  big = jnp.abs(g_N) >= thresh
  log_mag = jnp.log(jnp.maximum(jnp.abs(g_N), thresh)) / p
  first = jnp.where(big, log_mag, -1.0)
  second = jnp.where(big, jnp.sign(g_N), jnp.exp(p) * g_N)
  return jnp.stack([first, second]).astype(g_N.dtype)


def feature_row(leaf: jax.Array) -> jax.Array:
  """A leaf as one feature row ``[1, N]`` over its N = leaf.size parameters (scalars: N = 1)."""
  return jnp.reshape(leaf, (1, -1))


def split_rows(y_N: jax.Array, like_leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """Splits a per-parameter vector ``[N_total, ...]`` back into arrays shaped like ``like_leaves``
  (trailing dimensions of ``y_N`` are kept)."""
  out, start = [], 0
  for leaf in like_leaves:
    n = int(jnp.size(leaf))
    out.append(y_N[start:start + n].reshape(jnp.shape(leaf) + y_N.shape[1:]))
    start += n
  return out
