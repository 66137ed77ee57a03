"""Real data, small: scikit-learn's bundled 8x8 handwritten digits (1797 x 64, 10 classes).

Needs scikit-learn (``pip install mesajax[data]``); ``load_digits`` reads a file shipped with the
package, so nothing is downloaded. The data set is loaded lazily, once, and kept as a float32
constant with pixels scaled to [0, 1] (raw values are 0..16).

One task = a random disjoint train/validation split of the 1797 images (``n_train`` and ``n_val``
rows drawn without replacement) and a fresh classifier: ``hidden = 0`` is softmax regression, else
one hidden layer of ``hidden`` units (the nnx MLP of ``classifier.py``). As in the teacher-MLP
family, ``label_noise`` resamples training labels only; validation labels stay clean. Loss: mean
softmax cross-entropy; ``train_loss`` on a minibatch, ``outer_loss`` on the full validation split.

Knobs (fields of :class:`Digits`):

===============  =======  ==========================================================================
knob             default  meaning
===============  =======  ==========================================================================
``n_train``      256      training images (int >= 1; ``n_train + n_val <= 1797``)
``n_val``        512      validation images (int >= 1)
``hidden``       0        hidden units of the one hidden layer; 0 = softmax regression (int >= 0)
``activation``   "tanh"   hidden activation, "tanh" or "relu"
``batch_size``   32       minibatch size; None or >= n_train: full batch
``label_noise``  0.0      probability of resampling a training label uniformly (in [0, 1])
===============  =======  ==========================================================================

Task pytree: ``{"x_train": [n_train, 64], "y_train": [n_train] int32, "x_val": [n_val, 64],
"y_val": [n_val] int32}``. Params: the classifier's pure dict.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.tasks import classifier, data
from mesajax.tasks.base import check, is_int
from mesajax.tasks.classifier import ClassifierFamily

N_IMAGES, N_PIXELS, N_CLASSES = 1797, 64, 10


@functools.lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
  """``(x [1797, 64] float32 in [0, 1], y [1797] int32)``; raises a one-line ValueError without
  scikit-learn."""
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise ValueError(
        "the digits task family needs scikit-learn: pip install mesajax[data]") from None
  ds = load_digits()
  return (np.asarray(ds.data, np.float32) / 16.0, np.asarray(ds.target, np.int32))


@dataclasses.dataclass(frozen=True)
class Digits(ClassifierFamily):
  """Softmax regression or a one-hidden-layer MLP on random splits of sklearn's digits."""

  name = "digits"
  test_kwargs = {"n_train": 48, "n_val": 64, "batch_size": 16}
  test_shift = dict(n_train=100, n_val=30, hidden=7, activation="relu", batch_size=None,
                    label_noise=0.3)
  gd_lr = 0.5
  default_shifts = {"label_noise": {"task": {"label_noise": 0.3}},
                    "hidden_32": {"task": {"hidden": 32}}, "horizon_x10": {"horizon_mult": 10}}

  n_train: int = 256
  n_val: int = 512
  hidden: int = 0
  activation: str = "tanh"
  batch_size: int | None = 32
  label_noise: float = 0.0

  @property
  def arch(self) -> classifier.Arch:
    return classifier.Arch(N_PIXELS, max(self.hidden, 1), int(self.hidden > 0), N_CLASSES,
                           self.activation)

  def validate(self) -> None:
    check(is_int(self.hidden) and self.hidden >= 0,
          f"digits: hidden must be an int >= 0, got {self.hidden!r}")
    self._validate_common()
    check(self.n_train + self.n_val <= N_IMAGES,
          f"digits: n_train + n_val must be <= {N_IMAGES}, got {self.n_train + self.n_val}")
    load()  # fail early, before anything compiles, when scikit-learn is missing

  def sample(self, key):
    x_all, y_all = load()
    k_split, k_noise = jax.random.split(key)
    perm = jax.random.permutation(k_split, N_IMAGES)
    idx_train, idx_val = perm[:self.n_train], perm[self.n_train:self.n_train + self.n_val]
    x_all, y_all = jnp.asarray(x_all), jnp.asarray(y_all)
    y_train = data.corrupt_labels(k_noise, y_all[idx_train], self.label_noise, N_CLASSES)
    return {"x_train": x_all[idx_train], "y_train": y_train,
            "x_val": x_all[idx_val], "y_val": y_all[idx_val]}
