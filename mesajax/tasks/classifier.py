"""A small flax.nnx MLP classifier handled as a pure pytree, multiclass losses, and the shared
base of the classification task families (:class:`ClassifierFamily`).

The network is an ``nnx.Module``; tasks see only its parameters as a plain nested dict of arrays
(``nnx.to_pure_dict``), so params cross ``jax.jit`` / ``vmap`` / ``grad`` / ``lax.scan`` and
``ravel_pytree`` like any pytree. The static half (``GraphDef`` and an abstract ``State`` template)
is built once per architecture outside jit, from ``nnx.eval_shape`` (no arrays allocated), and
cached on the architecture's knobs; :func:`apply` merges a fresh copy of the template with the
params inside the traced function.

Params layout (string keys only): ``{"hidden0": {"kernel": [in, width], "bias": [width]}, ...,
"hidden{depth-1}": ..., "out": {"kernel": [width or in, n_classes], "bias": [n_classes]}}``;
``depth = 0`` is a linear (softmax-regression) classifier. Initialisation is ``nnx.Linear``'s
default (LeCun-normal kernels, zero biases).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesajax.tasks import data
from mesajax.tasks.base import TaskFamily, check, is_int

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class Arch(NamedTuple):
  """Static architecture of :class:`MLPClassifier` (hashable: the cache key)."""

  in_dim: int
  width: int
  depth: int
  n_classes: int
  activation: str


class MLPClassifier(nnx.Module):
  """``depth`` hidden ``nnx.Linear`` layers of ``width`` units with ``activation``, then a linear
  read-out to ``n_classes`` logits."""

  def __init__(self, arch: Arch, *, rngs: nnx.Rngs):
    self.depth = arch.depth
    self.activation = arch.activation
    fan_in = arch.in_dim
    for i in range(arch.depth):
      # Named attributes (not a list) keep every key of the pure dict a string.
      setattr(self, f"hidden{i}", nnx.Linear(fan_in, arch.width, rngs=rngs))
      fan_in = arch.width
    self.out = nnx.Linear(fan_in, arch.n_classes, rngs=rngs)

  def __call__(self, x_NxD: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    h = x_NxD
    for i in range(self.depth):
      h = act(getattr(self, f"hidden{i}")(h))
    return self.out(h)


@functools.lru_cache(maxsize=None)
def graph(arch: Arch):
  """``(graphdef, abstract_state)`` of the architecture, built once outside jit and cached."""
  abstract = nnx.eval_shape(lambda: MLPClassifier(arch, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def init(key: jax.Array, arch: Arch) -> dict:
  """Fresh parameters as a pure dict (works under jit/vmap with a raw uint32 key)."""
  model = MLPClassifier(arch, rngs=nnx.Rngs(params=key))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def apply(params: dict, arch: Arch, x_NxD: jax.Array) -> jax.Array:
  """Logits ``[N, n_classes]`` of the network with ``params``."""
  graphdef, template = graph(arch)
  state = jax.tree.map(lambda leaf: leaf, template)  # fresh containers; the cache is never mutated
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(x_NxD)


# --- multiclass losses and metrics (labels are int32 class indices) ----------------------------
def cross_entropy(logits_NxC: jax.Array, y_N: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy ``mean(logsumexp(z) - z_y)``."""
  z_y = jnp.take_along_axis(logits_NxC, y_N[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits_NxC, axis=1) - z_y)


def margins(logits_NxC: jax.Array, y_N: jax.Array) -> jax.Array:
  """Per-example margin ``z_y - max_{c != y} z_c``: positive iff correctly classified. ``[N]``."""
  n_classes = logits_NxC.shape[1]
  onehot = jax.nn.one_hot(y_N, n_classes, dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits_NxC, 0.0), axis=1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits_NxC), axis=1)
  return z_y - z_other


def multiclass_hinge(logits_NxC: jax.Array, y_N: jax.Array) -> jax.Array:
  """Crammer-Singer hinge ``mean max(0, 1 - margin)`` (Crammer & Singer 2001)."""
  return jnp.mean(jax.nn.relu(1.0 - margins(logits_NxC, y_N)))



# --- the shared classification task family ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierFamily(TaskFamily):
  """Shared part of the classification families: an MLP student on ``x_*``/``y_*`` arrays.

  Subclasses define ``arch`` (a :class:`Arch`), ``sample`` and the knobs
  ``batch_size``; the task pytree holds ``x_train, y_train, x_val, y_val``.
  """

  name = "_classifier"

  @property
  def arch(self) -> Arch:
    raise NotImplementedError

  def logits(self, params, x_NxD):
    return apply(params, self.arch, x_NxD)

  def init(self, key, task):
    return init(key, self.arch)

  def train_loss(self, params, task, key):
    x, y = data.minibatch(key, (task["x_train"], task["y_train"]), self.batch_size)
    return cross_entropy(self.logits(params, x), y)

  def train_loss_full(self, params, task):
    return cross_entropy(self.logits(params, task["x_train"]), task["y_train"])

  def outer_loss_full(self, params, task):
    return cross_entropy(self.logits(params, task["x_val"]), task["y_val"])

  def proxies(self):
    def train_hinge(params, task):
      """Multiclass hinge on the training rows: stops pushing once every margin is >= 1."""
      return multiclass_hinge(self.logits(params, task["x_train"]), task["y_train"])

    def neg_margin(params, task):
      """Minus the mean training margin z_y - max_{c != y} z_c: rewards confident fitting of the
      training labels (noisy ones included) at any scale."""
      return -jnp.mean(margins(self.logits(params, task["x_train"]), task["y_train"]))

    return {"train_hinge": train_hinge, "neg_margin": neg_margin}

  def _validate_common(self) -> None:
    n = self.name
    check(is_int(self.n_train) and self.n_train >= 1,
          f"{n}: n_train must be an int >= 1, got {self.n_train!r}")
    check(is_int(self.n_val) and self.n_val >= 1,
          f"{n}: n_val must be an int >= 1, got {self.n_val!r}")
    check(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
          f"{n}: batch_size must be None or an int >= 1, got {self.batch_size!r}")
    check(self.activation in ACTIVATIONS,
          f"{n}: activation must be one of {sorted(ACTIVATIONS)}, "
          f"got {self.activation!r}")
    check(0.0 <= self.label_noise <= 1.0,
          f"{n}: label_noise must be in [0, 1], got {self.label_noise!r}")
