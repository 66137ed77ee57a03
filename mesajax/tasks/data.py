"""Data helpers shared by the task families: in-jit minibatches, correlated inputs, label noise.

All functions are pure and shape-static (shapes depend only on Python ints), so they run inside
``jax.jit`` / ``jax.vmap`` over tasks. Minibatches are index draws from a task's own arrays with the
step's key: there is no Python data loader in the hot path.

Compile time: every ``jax.random`` call inlines its own threefry graph, and XLA's CPU compile time
grows with their number (a task ``sample`` with eight draws compiled ~5x slower than the same
sample from one draw). So samplers here take *one* Gaussian draw and slice it (:func:`normals`),
and get uniforms as ``Phi(z)`` (:func:`uniform_from_normal`, exactly uniform).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

Array = jax.Array


def full_batch(batch_size: int | None, n: int) -> bool:
  """True when ``batch_size`` means "use all ``n`` examples" (``None`` or ``>= n``)."""
  return batch_size is None or batch_size >= n


def minibatch(key: Array, arrays: Sequence[Array], batch_size: int | None) -> tuple[Array, ...]:
  """A minibatch of ``batch_size`` rows drawn without replacement from each of ``arrays``.

  The arrays share their leading axis ``n``; the same rows are taken from each. With
  ``batch_size`` ``None`` or ``>= n`` the arrays are returned unchanged (full batch, key unused).
  """
  n = arrays[0].shape[0]
  if full_batch(batch_size, n):
    return tuple(arrays)
  idx_B = jax.random.choice(key, n, (batch_size,), replace=False)
  return tuple(a[idx_B] for a in arrays)


def normals(key: Array, *shapes: tuple[int, ...]) -> list[Array]:
  """Independent standard-normal arrays of the given shapes, sliced from one draw."""
  sizes = [math.prod(s) for s in shapes]
  z = jax.random.normal(key, (sum(sizes),))
  offsets = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
  return [part.reshape(s) for part, s in zip(jnp.split(z, offsets), shapes)]


def uniform_from_normal(z: Array) -> Array:
  """``Phi(z)``, uniform on (0, 1) when ``z`` is standard normal."""
  return ndtr(z)


def log_uniform_from_normal(z: Array, low: float, high: float) -> Array:
  """Log-uniform in ``[low, high]`` from standard normals ``z`` (clipped against round-off)."""
  u = uniform_from_normal(z)
  out = jnp.exp(math.log(low) + u * (math.log(high) - math.log(low)))
  return jnp.clip(out, low, high)


def haar_rotation(g_DxD: Array) -> Array:
  """Haar-random orthogonal matrix from a standard Gaussian matrix: QR with the sign fix of
  Mezzadri (2007), from a given Gaussian draw."""
  q, r = jnp.linalg.qr(g_DxD)
  return q * jnp.sign(jnp.diagonal(r))[None, :]


def input_covariance(key: Array, dim: int, cond: float) -> tuple[Array, Array]:
  """A random input covariance ``Sigma = Q diag(lam) Q^T`` and its symmetric square root.

  ``lam`` is log-uniform in ``[1, cond]`` then normalised to mean 1 (so ``tr Sigma = dim`` and
  ``E||x||^2 = dim`` whatever the conditioning); ``Q`` is Haar-random. ``cond = 1`` gives ``I``.
  Returns ``(Sigma_DxD, Sigma_sqrt_DxD)``.
  """
  z_D, g_DxD = normals(key, (dim,), (dim, dim))
  lam_D = log_uniform_from_normal(z_D, 1.0, cond)
  lam_D = lam_D / jnp.mean(lam_D)
  q_DxD = haar_rotation(g_DxD)
  cov = (q_DxD * lam_D) @ q_DxD.T
  cov_sqrt = (q_DxD * jnp.sqrt(lam_D)) @ q_DxD.T
  return 0.5 * (cov + cov.T), 0.5 * (cov_sqrt + cov_sqrt.T)


def corrupt_labels(key: Array, y_N: Array, prob: float, n_classes: int) -> Array:
  """With probability ``prob`` each label is replaced by a uniformly random class (possibly itself).

  For two classes and ``prob = 2p`` this flips each label with probability ``p``.
  """
  if prob == 0.0:
    return y_N
  z_mask, z_new = normals(key, y_N.shape, y_N.shape)
  mask_N = uniform_from_normal(z_mask) < prob
  new_N = jnp.minimum(jnp.floor(uniform_from_normal(z_new) * n_classes), n_classes - 1)
  return jnp.where(mask_N, new_N.astype(y_N.dtype), y_N)
