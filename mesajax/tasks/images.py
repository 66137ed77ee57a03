"""Image classification task families on real data sets read from local files.

The data set (``datasets.py``: sklearn's embedded digits by default; MNIST, Fashion-MNIST,
CIFAR-10 or any ``.npz`` from a folder the config names) is loaded once on the host and cached;
it enters the compiled programs as a constant. Everything per task happens inside jit from the
task key, so ``sample`` is vmappable:

1. which images: ``n_train`` training rows drawn without replacement from the training pool and
   ``n_val`` validation rows from the test pool (for digits, which has no test split, both come
   from the one pool and are disjoint). Pools of at most 8192 images are permuted uniformly; larger
   ones (MNIST's 60000) take a random arithmetic progression ``perm[(a*i + b) mod N]`` through a
   fixed host-side shuffle (distinct rows, O(n) instead of a 60000-element sort per task);
2. resize (``image_size``: bilinear with antialiasing, e.g. 28x28 -> 8x8 as in
   learned_optimization's resized image tasks, or up, e.g. digits 8x8 -> 28x28);
3. standardisation (``standardize``): subtract the per-channel mean of the task's training images
   and divide by their per-channel standard deviation (the same statistics for validation);
4. label noise on training labels only (as in the other classification families).

Pixels are scaled to [0, 1] before any of this. Loss: mean softmax cross-entropy;
``train_loss`` on a minibatch, ``outer_loss`` on the full validation rows.

:class:`ImageMLP` knobs (the data knobs are shared with :class:`ImageMLPMixture`):

=================  ==========  ===================================================================
knob               default     meaning
=================  ==========  ===================================================================
``dataset``        "digits"    digits | mnist | fashion_mnist | cifar10 | npz (see datasets.py)
``data_dir``       None        local folder (npz: file) holding the files; None for digits
``source``         "files"     files | tfds | hf (an installed tensorflow_datasets / HF datasets)
``image_size``     None        resize to image_size x image_size (int >= 2); None: native size
``standardize``    True        per-channel standardisation with the task's training statistics
``width``          32          hidden units per layer (int >= 1)
``depth``          1           hidden layers (int >= 0; 0 = softmax regression)
``activation``     "relu"      "relu" or "tanh"
``n_train``        256         training images per task (int >= 1)
``n_val``          512         validation images per task (int >= 1)
``batch_size``     32          minibatch size; None or >= n_train: full batch
``label_noise``    0.0         probability of resampling a training label uniformly (in [0, 1])
=================  ==========  ===================================================================

Parameter count ``in*width + width + (depth-1)*(width^2 + width) + width*classes + classes``
(``in = size^2 * channels``): the defaults on digits have 2,410; ``image_size=28, width=128`` has
101,770 (the ~1e5-parameter task of the analysis-at-scale work; the same on 28x28 MNIST).

:class:`ImageMLPMixture` is the task-augmented mixture (Celo, Moudgil et al. 2025; Metz et al.
2022): per task a random hidden width from ``widths``, a random input size from ``image_sizes``
and a random gradient scale. Every task of a vmapped batch has the same array shapes, so the
network is the largest one (``max(widths)`` units, ``max(image_sizes)``² inputs): a task of width
``w`` multiplies the hidden activations by a 0/1 mask keeping the first ``w`` units (the masked
units' parameters get zero gradient); an input of size ``s`` is resized to ``s x s``, standardised
and zero-padded to the largest size (the padded inputs' weights get zero gradient). The gradient
scale ``c`` is log-uniform in ``[1/grad_scale, grad_scale]``: the *training* loss (minibatch and
full) is ``c`` times the cross-entropy, so every gradient is ``c`` times larger and plain SGD's
learning rate is effectively ``c`` times larger (Adam is invariant); the outer (validation) loss is
the unscaled cross-entropy. Its knobs: the data knobs above, ``depth``, ``activation``, and

=================  ============  =================================================================
``widths``         (16, 32, 64)  hidden widths to draw from (ints >= 1)
``image_sizes``    (4, 6, 8)     input sizes to draw from (ints >= 2)
``grad_scale``     10.0          c in [1/grad_scale, grad_scale], log-uniform (>= 1; 1: off)
=================  ============  =================================================================

Task pytree: ``{"x_train": [n_train, in], "y_train": [n_train] int32, "x_val": [n_val, in],
"y_val": [n_val] int32}`` (the mixture adds ``"mask": [max(widths)]`` and ``"scale": []``).
Params: the classifier's pure dict (``classifier.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.tasks import classifier, data, datasets
from mesajax.tasks.base import check, is_int
from mesajax.tasks.classifier import ClassifierFamily

EXACT_PERMUTATION_MAX = 8192


@functools.lru_cache(maxsize=16)
def _pool_order(n: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed shuffle of ``range(n)`` and multipliers ``a`` coprime to ``n`` (for progressions)."""
  perm = np.random.default_rng(0).permutation(n).astype(np.int32)
  units = np.array([a for a in range(1, min(n, 4096)) if math.gcd(a, n) == 1] or [1], np.int32)
  return perm, units


def distinct_indices(key: jax.Array, n_pool: int, count: int) -> jax.Array:
  """``count`` distinct indices into a pool of ``n_pool`` rows (see the module docstring)."""
  if n_pool <= EXACT_PERMUTATION_MAX:
    # argsort of random bits: one sort (jax.random.permutation's several compile ~1.5x slower).
    return jnp.argsort(jax.random.bits(key, (n_pool,)))[:count].astype(jnp.int32)
  perm, units = _pool_order(n_pool)
  draws = jax.random.randint(key, (2,), 0, jnp.array([len(units), n_pool]))
  a, b = jnp.asarray(units)[draws[0]], draws[1]
  return jnp.asarray(perm)[(a * jnp.arange(count, dtype=jnp.int32) + b) % n_pool]


def to_float(x):
  """Pixels in [0, 1], ``float32`` (``uint8`` pools are divided by 255)."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def resize(x_NHWC, size: int | None):
  if size is None or x_NHWC.shape[1:3] == (size, size):
    return x_NHWC
  n, _, _, c = x_NHWC.shape
  return jax.image.resize(x_NHWC, (n, size, size, c), "linear", antialias=True)


def standardize(x_train, x_val):
  """Per-channel standardisation with the training images' statistics."""
  mean = jnp.mean(x_train, axis=(0, 1, 2))
  std = jnp.sqrt(jnp.var(x_train, axis=(0, 1, 2)) + 1e-5)
  return (x_train - mean) / std, (x_val - mean) / std


def _check_depth(family) -> None:
  check(is_int(family.depth) and family.depth >= 0,
        f"{family.name}: depth must be an int >= 0, got {family.depth!r}")


@dataclasses.dataclass(frozen=True)
class _ImageFamily(ClassifierFamily):
  """Data knobs and per-task image sampling shared by the image families."""

  name = "_image"

  dataset: str = "digits"
  data_dir: str | None = None
  source: str = "files"
  standardize: bool = True
  activation: str = "relu"
  n_train: int = 256
  n_val: int = 512
  batch_size: int | None = 32
  label_noise: float = 0.0

  def data(self) -> datasets.ImageData:
    return datasets.load(self.dataset, self.data_dir, self.source)

  def _validate_data(self) -> None:
    n = self.name
    try:
      datasets.check_args(self.dataset, self.data_dir, self.source)
    except ValueError as e:
      raise ValueError(f"{n}: {e}") from None
    check(isinstance(self.standardize, bool),
          f"{n}: standardize must be True or False, got {self.standardize!r}")
    self._validate_common()
    ds = self.data()  # fails early (one line) when files are missing
    n_pool = len(ds.x_train)
    if ds.x_test is None:
      check(self.n_train + self.n_val <= n_pool,
            f"{n}: n_train + n_val must be <= {n_pool} ({self.dataset} has no test split), "
            f"got {self.n_train + self.n_val}")
    else:
      check(self.n_train <= n_pool, f"{n}: n_train must be <= {n_pool}, got {self.n_train}")
      check(self.n_val <= len(ds.x_test),
            f"{n}: n_val must be <= {len(ds.x_test)}, got {self.n_val}")

  def _raw_images(self, key):
    """``(x_train [n_train, H, W, C], y_train, x_val, y_val)`` in [0, 1], native size."""
    ds = self.data()
    k_train, k_val = jax.random.split(key)
    pool_x, pool_y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if ds.x_test is None:
      idx = distinct_indices(k_train, len(ds.x_train), self.n_train + self.n_val)
      idx_train, idx_val = idx[:self.n_train], idx[self.n_train:]
      val_x, val_y = pool_x, pool_y
    else:
      idx_train = distinct_indices(k_train, len(ds.x_train), self.n_train)
      idx_val = distinct_indices(k_val, len(ds.x_test), self.n_val)
      val_x, val_y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    return (to_float(pool_x[idx_train]), pool_y[idx_train], to_float(val_x[idx_val]),
            val_y[idx_val])

  def _prepare(self, x_train, x_val, size):
    x_train, x_val = resize(x_train, size), resize(x_val, size)
    if self.standardize:
      x_train, x_val = standardize(x_train, x_val)
    return x_train, x_val

  def _noisy(self, key, y_train):
    return data.corrupt_labels(key, y_train, self.label_noise, self.data().n_classes)


@dataclasses.dataclass(frozen=True)
class ImageMLP(_ImageFamily):
  """An MLP classifier on random subsets of an image data set; see the module docstring."""

  name = "image_mlp"

  image_size: int | None = None
  width: int = 32
  depth: int = 1

  test_kwargs = {"n_train": 48, "n_val": 64, "batch_size": 16, "width": 8}
  test_shift = {"image_size": 6, "standardize": False, "width": 5, "depth": 2,
                "activation": "tanh", "n_train": 40, "n_val": 30, "batch_size": None,
                "label_noise": 0.3}
  # dataset, data_dir and source have no valid non-default value without files on disk.
  file_knobs = ("dataset", "data_dir", "source")
  gd_lr = 0.1
  default_shifts = {
      "n_train_x4": {"task": {"n_train": 1024}},
      "image_16": {"task": {"image_size": 16}},
      "width_x4": {"task": {"width": 128}},
      "horizon_x10": {"horizon_mult": 10},
  }

  def image_shape(self) -> tuple[int, int, int]:
    h, w, c = self.data().image_shape
    return (h, w, c) if self.image_size is None else (self.image_size, self.image_size, c)

  @property
  def arch(self) -> classifier.Arch:
    h, w, c = self.image_shape()
    return classifier.Arch(h * w * c, self.width, self.depth, self.data().n_classes,
                           self.activation)

  def num_params(self) -> int:
    a = self.arch
    sizes = [a.in_dim] + [a.width] * a.depth + [a.n_classes]
    return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))

  def validate(self) -> None:
    n = self.name
    check(self.image_size is None or (is_int(self.image_size) and self.image_size >= 2),
          f"{n}: image_size must be None or an int >= 2, got {self.image_size!r}")
    check(is_int(self.width) and self.width >= 1,
          f"{n}: width must be an int >= 1, got {self.width!r}")
    _check_depth(self)
    self._validate_data()

  def sample(self, key):
    k_data, k_noise = jax.random.split(key)
    x_train, y_train, x_val, y_val = self._raw_images(k_data)
    x_train, x_val = self._prepare(x_train, x_val, self.image_size)
    return {"x_train": x_train.reshape(self.n_train, -1), "y_train": self._noisy(k_noise, y_train),
            "x_val": x_val.reshape(self.n_val, -1), "y_val": y_val}


@dataclasses.dataclass(frozen=True)
class ImageMLPMixture(_ImageFamily):
  """Task-augmented mixture of image MLPs (random width, input size, gradient scale per task)."""

  name = "image_mlp_mixture"

  widths: tuple = (16, 32, 64)
  image_sizes: tuple = (4, 6, 8)
  grad_scale: float = 10.0
  depth: int = 1

  test_kwargs = {"n_train": 48, "n_val": 64, "batch_size": 16, "widths": (4, 8)}
  test_shift = {"widths": (3, 5), "image_sizes": (4,), "grad_scale": 1.0, "standardize": False,
                "depth": 2, "activation": "tanh", "n_train": 40, "n_val": 30, "batch_size": None,
                "label_noise": 0.3}
  file_knobs = ("dataset", "data_dir", "source")
  gd_lr = 0.02  # the training loss is scaled by up to grad_scale
  default_shifts = {
      "width_128": {"task": {"widths": (128,)}},
      "image_16": {"task": {"image_sizes": (16,)}},
      "depth_2": {"task": {"depth": 2}},
      "no_scale": {"task": {"grad_scale": 1.0}},
  }

  @property
  def arch(self) -> classifier.Arch:
    c = self.data().image_shape[2]
    s = max(self.image_sizes)
    return classifier.Arch(s * s * c, max(self.widths), self.depth, self.data().n_classes,
                           self.activation)

  def validate(self) -> None:
    n = self.name
    for knob, low in (("widths", 1), ("image_sizes", 2)):
      v = getattr(self, knob)
      check(isinstance(v, tuple) and len(v) >= 1 and all(is_int(x) and x >= low for x in v),
            f"{n}: {knob} must be a non-empty tuple of ints >= {low}, got {v!r}")
    check(isinstance(self.grad_scale, (int, float)) and not isinstance(self.grad_scale, bool)
          and self.grad_scale >= 1.0, f"{n}: grad_scale must be >= 1, got {self.grad_scale!r}")
    _check_depth(self)
    self._validate_data()

  def sample(self, key):
    k_data, k_noise, k_aug = jax.random.split(key, 3)
    x_train, y_train, x_val, y_val = self._raw_images(k_data)
    big = max(self.image_sizes)
    z_size, z_width, z_scale = jax.random.normal(k_aug, (3,))
    pick = lambda z, n: jnp.minimum(jnp.floor(data.uniform_from_normal(z) * n), n - 1).astype(
        jnp.int32)
    # Every candidate size is computed (a few small resizes) and one is selected.
    candidates = []
    for s in self.image_sizes:
      xt, xv = self._prepare(x_train, x_val, s)
      pad = ((0, 0), (0, big - s), (0, big - s), (0, 0))
      candidates.append((jnp.pad(xt, pad), jnp.pad(xv, pad)))
    i = pick(z_size, len(self.image_sizes))
    xt = jnp.stack([c[0] for c in candidates])[i]
    xv = jnp.stack([c[1] for c in candidates])[i]
    width = jnp.asarray(self.widths, jnp.int32)[pick(z_width, len(self.widths))]
    mask = (jnp.arange(max(self.widths)) < width).astype(jnp.float32)
    log_c = math.log(self.grad_scale)
    scale = jnp.exp(-log_c + 2 * log_c * data.uniform_from_normal(z_scale))
    return {"x_train": xt.reshape(self.n_train, -1), "y_train": self._noisy(k_noise, y_train),
            "x_val": xv.reshape(self.n_val, -1), "y_val": y_val, "mask": mask, "scale": scale}

  def masked_logits(self, params, x_NxD, mask):
    act = classifier.ACTIVATIONS[self.activation]
    h = x_NxD
    for i in range(self.depth):
      layer = params[f"hidden{i}"]
      h = act(h @ layer["kernel"] + layer["bias"]) * mask
    return h @ params["out"]["kernel"] + params["out"]["bias"]

  def _ce(self, params, task, x, y):
    return classifier.cross_entropy(self.masked_logits(params, x, task["mask"]), y)

  def train_loss(self, params, task, key):
    x, y = data.minibatch(key, (task["x_train"], task["y_train"]), self.batch_size)
    return task["scale"] * self._ce(params, task, x, y)

  def train_loss_full(self, params, task):
    return task["scale"] * self._ce(params, task, task["x_train"], task["y_train"])

  def outer_loss_full(self, params, task):
    return self._ce(params, task, task["x_val"], task["y_val"])

  def proxies(self):
    def train_hinge(params, task):
      logits = self.masked_logits(params, task["x_train"], task["mask"])
      return classifier.multiclass_hinge(logits, task["y_train"])

    def neg_margin(params, task):
      logits = self.masked_logits(params, task["x_train"], task["mask"])
      return -jnp.mean(classifier.margins(logits, task["y_train"]))

    return {"train_hinge": train_hinge, "neg_margin": neg_margin}
