"""A small convolutional classifier on real images (the CNN counterpart of ``image_mlp``).

The network follows learned_optimization's ``Conv_*`` image tasks (Metz et al. 2022) and the
small CNNs Celo and VeLO meta-train on: ``len(channels)`` 3x3 convolutions with stride 2 and
``SAME`` padding, each followed by the activation, then a global mean over the spatial positions
and a linear read-out to the class logits (flax.nnx ``Conv`` / ``Linear``, default
initialisation)::

    h_0 = x                                           [H, W, C]
    h_l = act(conv_{3x3, stride 2}(h_{l-1}))          [ceil(H/2^l), ceil(W/2^l), channels[l-1]]
    logits = mean_{i,j} h_L[i, j, :] @ W_out + b_out

Parameter count ``sum_l (9 c_{l-1} c_l + c_l) + c_L * classes + classes`` (``c_0`` = input
channels): the default ``channels=(16, 32)`` on 8x8 digits has 5,130. The data knobs (dataset,
``data_dir``, ``source``, ``image_size``, ``standardize``, ``n_train``, ``n_val``,
``batch_size``, ``label_noise``, ``activation``) and per-task sampling are those of
:mod:`mesajax.tasks.images`; images stay ``[N, H, W, C]`` in the task pytree. Knobs of its own:

=================  ==========  ===================================================================
``channels``       (16, 32)    output channels of each stride-2 convolution (ints >= 1, >= 1 layer)
``image_size``     None        resize to image_size x image_size (int >= 2); None: native size
=================  ==========  ===================================================================

Like every classification family: ``train_loss`` is the softmax cross-entropy on a minibatch of
the training images, ``outer_loss`` on the full validation images.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesajax.tasks import classifier
from mesajax.tasks.base import check, is_int
from mesajax.tasks.images import _ImageFamily


class ConvArch(NamedTuple):
  """Static architecture of :class:`ConvClassifier` (hashable: the cache key)."""

  image_shape: tuple[int, int, int]
  channels: tuple[int, ...]
  n_classes: int
  activation: str


class ConvClassifier(nnx.Module):
  """Stride-2 3x3 convolutions, global mean pooling, linear read-out (module docstring)."""

  def __init__(self, arch: ConvArch, *, rngs: nnx.Rngs):
    self.activation = arch.activation
    self.num_conv = len(arch.channels)
    c_in = arch.image_shape[2]
    for i, c_out in enumerate(arch.channels):
      setattr(self, f"conv{i}", nnx.Conv(c_in, c_out, kernel_size=(3, 3), strides=(2, 2),
                                         padding="SAME", rngs=rngs))
      c_in = c_out
    self.out = nnx.Linear(c_in, arch.n_classes, rngs=rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    act = classifier.ACTIVATIONS[self.activation]
    h = x_NHWC
    for i in range(self.num_conv):
      h = act(getattr(self, f"conv{i}")(h))
    return self.out(jnp.mean(h, axis=(1, 2)))


@functools.lru_cache(maxsize=None)
def graph(arch: ConvArch):
  """``(graphdef, abstract_state)`` of the architecture, built once outside jit and cached."""
  return nnx.split(nnx.eval_shape(lambda: ConvClassifier(arch, rngs=nnx.Rngs(0))))


def init(key: jax.Array, arch: ConvArch) -> dict:
  """Fresh parameters as a pure dict (works under jit/vmap with a raw uint32 key)."""
  return nnx.to_pure_dict(nnx.state(ConvClassifier(arch, rngs=nnx.Rngs(params=key)), nnx.Param))


def apply(params: dict, arch: ConvArch, x_NHWC: jax.Array) -> jax.Array:
  """Logits ``[N, n_classes]``."""
  graphdef, template = graph(arch)
  state = jax.tree.map(lambda leaf: leaf, template)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(x_NHWC)


@dataclasses.dataclass(frozen=True)
class ImageCNN(_ImageFamily):
  """A small CNN classifier on random subsets of an image data set; see the module docstring."""

  name = "image_cnn"

  image_size: int | None = None
  channels: tuple = (16, 32)

  test_kwargs = {"n_train": 48, "n_val": 64, "batch_size": 16, "channels": (4,)}
  test_shift = {"image_size": 6, "standardize": False, "channels": (3, 5),
                "activation": "tanh", "n_train": 40, "n_val": 30, "batch_size": None,
                "label_noise": 0.3}
  file_knobs = ("dataset", "data_dir", "source")
  gd_lr = 0.1
  default_shifts = {
      "n_train_x4": {"task": {"n_train": 1024}},
      "image_16": {"task": {"image_size": 16}},
      "channels_x2": {"task": {"channels": (32, 64)}},
      "horizon_x10": {"horizon_mult": 10},
  }

  def image_shape(self) -> tuple[int, int, int]:
    h, w, c = self.data().image_shape
    return (h, w, c) if self.image_size is None else (self.image_size, self.image_size, c)

  @property
  def arch(self) -> ConvArch:
    return ConvArch(self.image_shape(), tuple(int(c) for c in self.channels),
                    self.data().n_classes, self.activation)

  def num_params(self) -> int:
    a = self.arch
    sizes = (a.image_shape[2],) + a.channels
    conv = sum(9 * i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    return conv + sizes[-1] * a.n_classes + a.n_classes

  def logits(self, params, x_NHWC):
    return apply(params, self.arch, x_NHWC)

  def init(self, key, task):
    return init(key, self.arch)

  def validate(self) -> None:
    n = self.name
    check(self.image_size is None or (is_int(self.image_size) and self.image_size >= 2),
          f"{n}: image_size must be None or an int >= 2, got {self.image_size!r}")
    check(isinstance(self.channels, (tuple, list)) and len(self.channels) >= 1
          and all(is_int(c) and c >= 1 for c in self.channels),
          f"{n}: channels must be a non-empty sequence of ints >= 1, got {self.channels!r}")
    self._validate_data()

  def sample(self, key):
    k_data, k_noise = jax.random.split(key)
    x_train, y_train, x_val, y_val = self._raw_images(k_data)
    x_train, x_val = self._prepare(x_train, x_val, self.image_size)
    return {"x_train": x_train, "y_train": self._noisy(k_noise, y_train),
            "x_val": x_val, "y_val": y_val}
