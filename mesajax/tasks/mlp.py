"""A small MLP student classifying the labels of a random MLP teacher (synthetic data).

Generative model (one task = one teacher and one data set):

  x ~ N(0, I_dim)
  teacher logits  t(x) = tanh(x W1 + b1) W2
  W1 ~ N(0, 1/dim),  b1 ~ N(0, 0.1^2),  W2 ~ N(0, 1/teacher_width)
  y = argmax_c t(x)_c

Training labels are then corrupted: with probability ``label_noise`` a label is replaced by a
uniformly random class; validation labels stay clean, so the outer loss measures the true task and
parts ways with the training loss once the student fits the noise.

The student is a flax.nnx :class:`~mesajax.tasks.classifier.MLPClassifier` handled as a pure dict
of arrays (see ``classifier.py``). Loss: mean softmax cross-entropy. ``train_loss`` uses a minibatch
of ``batch_size`` training rows drawn without replacement with the step's key; ``outer_loss`` the
full validation set.

Knobs (fields of :class:`TeacherMLP`):

=================  =======  ========================================================================
knob               default  meaning
=================  =======  ========================================================================
``dim``            8        input dimension (int >= 1)
``n_classes``      4        number of classes (int >= 2)
``width``          16       student hidden width (int >= 1)
``depth``          2        student hidden layers (int >= 0; 0 = softmax regression)
``activation``     "tanh"   student activation, "tanh" or "relu"
``teacher_width``  32       teacher hidden width (int >= 1)
``n_train``        256      training rows (int >= 1)
``n_val``          512      validation rows (int >= 1)
``batch_size``     32       minibatch size; None or >= n_train: full batch
``label_noise``    0.0      probability of resampling a training label uniformly (in [0, 1])
=================  =======  ========================================================================

Task pytree: ``{"x_train": [n_train, dim], "y_train": [n_train] int32, "x_val": [n_val, dim],
"y_val": [n_val] int32}``. Params: the student's pure dict (``classifier.py``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mesajax.tasks import classifier, data
from mesajax.tasks.base import check, is_int
from mesajax.tasks.classifier import ClassifierFamily


@dataclasses.dataclass(frozen=True)
class TeacherMLP(ClassifierFamily):
  """MLP student on random-MLP-teacher labels; see module doc for the knobs."""

  name = "mlp"
  test_kwargs = {"n_train": 48, "n_val": 64, "batch_size": 16, "width": 8}
  test_shift = dict(dim=3, n_classes=2, width=5, depth=0, activation="relu", teacher_width=4,
                    n_train=20, n_val=10, batch_size=None, label_noise=0.3)
  gd_lr = 0.2
  default_shifts = {"label_noise": {"task": {"label_noise": 0.3}}, "width_x2": {"task": {"width": 32}},
                    "horizon_x10": {"horizon_mult": 10}}

  dim: int = 8
  n_classes: int = 4
  width: int = 16
  depth: int = 2
  activation: str = "tanh"
  teacher_width: int = 32
  n_train: int = 256
  n_val: int = 512
  batch_size: int | None = 32
  label_noise: float = 0.0

  @property
  def arch(self) -> classifier.Arch:
    return classifier.Arch(self.dim, self.width, self.depth, self.n_classes, self.activation)

  def validate(self) -> None:
    check(is_int(self.dim) and self.dim >= 1, f"mlp: dim must be an int >= 1, got {self.dim!r}")
    check(is_int(self.n_classes) and self.n_classes >= 2,
          f"mlp: n_classes must be an int >= 2, got {self.n_classes!r}")
    check(is_int(self.width) and self.width >= 1,
          f"mlp: width must be an int >= 1, got {self.width!r}")
    check(is_int(self.depth) and self.depth >= 0,
          f"mlp: depth must be an int >= 0, got {self.depth!r}")
    check(is_int(self.teacher_width) and self.teacher_width >= 1,
          f"mlp: teacher_width must be an int >= 1, got {self.teacher_width!r}")
    self._validate_common()

  def sample(self, key):
    k_data, k_noise = jax.random.split(key)
    d, h, c = self.dim, self.teacher_width, self.n_classes
    w1, b1, w2, x_train, x_val = data.normals(
        k_data, (d, h), (h,), (h, c), (self.n_train, d), (self.n_val, d))
    w1, b1, w2 = w1 / jnp.sqrt(d), 0.1 * b1, w2 / jnp.sqrt(h)

    def teacher_labels(x_NxD):
      return jnp.argmax(jnp.tanh(x_NxD @ w1 + b1) @ w2, axis=1).astype(jnp.int32)

    y_train = data.corrupt_labels(k_noise, teacher_labels(x_train), self.label_noise, c)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": teacher_labels(x_val)}
