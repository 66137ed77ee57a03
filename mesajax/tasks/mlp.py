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
from mesajax.tasks.base import TaskFamily, check, is_int


@dataclasses.dataclass(frozen=True)
class ClassifierFamily(TaskFamily):
  """Shared part of the classification families: an MLP student on ``x_*``/``y_*`` arrays.

  Subclasses define ``arch`` (a :class:`classifier.Arch`), ``sample`` and the knobs
  ``batch_size``; the task pytree holds ``x_train, y_train, x_val, y_val``.
  """

  name = "_classifier"

  @property
  def arch(self) -> classifier.Arch:
    raise NotImplementedError

  def logits(self, params, x_NxD):
    return classifier.apply(params, self.arch, x_NxD)

  def init(self, key, task):
    return classifier.init(key, self.arch)

  def train_loss(self, params, task, key):
    x, y = data.minibatch(key, (task["x_train"], task["y_train"]), self.batch_size)
    return classifier.cross_entropy(self.logits(params, x), y)

  def train_loss_full(self, params, task):
    return classifier.cross_entropy(self.logits(params, task["x_train"]), task["y_train"])

  def outer_loss_full(self, params, task):
    return classifier.cross_entropy(self.logits(params, task["x_val"]), task["y_val"])

  def error_rate(self, params, task, split: str = "val"):
    """0-1 error on ``split`` (evaluation metric; zero gradient, so not a proxy)."""
    return classifier.error_rate(self.logits(params, task[f"x_{split}"]), task[f"y_{split}"])

  def proxies(self):
    def train_hinge(params, task):
      """Multiclass hinge on the training rows: stops pushing once every margin is >= 1."""
      return classifier.multiclass_hinge(self.logits(params, task["x_train"]), task["y_train"])

    def neg_margin(params, task):
      """Minus the mean training margin z_y - max_{c != y} z_c: rewards confident fitting of the
      training labels (noisy ones included) at any scale."""
      return -jnp.mean(classifier.margins(self.logits(params, task["x_train"]), task["y_train"]))

    return {"train_hinge": train_hinge, "neg_margin": neg_margin}

  def _validate_common(self) -> None:
    n = self.name
    check(is_int(self.n_train) and self.n_train >= 1,
          f"{n}: n_train must be an int >= 1, got {self.n_train!r}")
    check(is_int(self.n_val) and self.n_val >= 1,
          f"{n}: n_val must be an int >= 1, got {self.n_val!r}")
    check(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
          f"{n}: batch_size must be None or an int >= 1, got {self.batch_size!r}")
    check(self.activation in classifier.ACTIVATIONS,
          f"{n}: activation must be one of {sorted(classifier.ACTIVATIONS)}, "
          f"got {self.activation!r}")
    check(0.0 <= self.label_noise <= 1.0,
          f"{n}: label_noise must be in [0, 1], got {self.label_noise!r}")


@dataclasses.dataclass(frozen=True)
class TeacherMLP(ClassifierFamily):
  """MLP student on random-MLP-teacher labels; see module doc for the knobs."""

  name = "mlp"

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
