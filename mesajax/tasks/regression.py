"""Linear and logistic regression on a Gaussian teacher, with a finite training set.

Generative model shared by both families (one task = one teacher and one data set):

  Sigma = Q diag(lam) Q^T,  lam log-uniform in [1, input_cond] normalised to mean 1, Q Haar-random
  x ~ N(0, Sigma)  (n_train training rows, n_val validation rows)
  w* ~ N(0, I / dim)  (so x . w* has variance ~1 for any input_cond)

* :class:`LinearRegression`: ``y = w_scale * x . w* + noise * eps``, ``eps ~ N(0, 1)``; loss
  ``1/2 mean (x . w + b - y)^2``. The Bayes (population) loss is ``noise^2 / 2``.
* :class:`LogisticRegression`: ``y ~ Bernoulli(sigmoid(logit_scale * x . w*))``, then each label is
  flipped with probability ``label_noise``; loss ``mean BCE(x . w + b, y)`` (with logits).

Both losses are unregularised. ``train_loss`` uses a minibatch of the training rows
(``batch_size=None`` or ``>= n_train``: full batch); ``outer_loss`` is the full validation loss.
Defaults are an overfitting regime (``n_train = 2 dim``, noisy labels): the training loss keeps
falling while the validation loss turns up, so train and outer objectives part ways.

Knobs, :class:`LinearRegression`:

===============  =======  ==========================================================================
knob             default  meaning
===============  =======  ==========================================================================
``dim``          10       input dimension (int >= 1)
``n_train``      20       training rows (int >= 1)
``n_val``        200      validation rows (int >= 1)
``noise``        0.5      label noise std sigma (>= 0)
``input_cond``   1.0      condition number of the input covariance Sigma (>= 1)
``w_scale``      1.0      teacher scale: ``y = w_scale * x . w* + ...`` (>= 0)
``init_scale``   0.0      ``w_0 = init_scale * N(0, I / dim)``, ``b_0 = 0`` (>= 0)
``batch_size``   None     minibatch size of ``train_loss``; None or >= n_train: full batch
===============  =======  ==========================================================================

Knobs, :class:`LogisticRegression`: ``dim``, ``n_train``, ``n_val``, ``input_cond``, ``init_scale``,
``batch_size`` as above (same defaults), and

===============  =======  ==========================================================================
``logit_scale``  4.0      teacher sharpness: ``P(y=1|x) = sigmoid(logit_scale * x . w*)`` (>= 0)
``label_noise``  0.0      probability of flipping each label, train and validation (in [0, 0.5])
===============  =======  ==========================================================================

Task pytree: ``{"w_star": [d], "cov": [d, d], "x_train": [n_train, d], "y_train": [n_train],
"x_val": [n_val, d], "y_val": [n_val]}`` (float32 labels, 0/1 for logistic).
Params: ``{"w": [d], "b": []}``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mesajax.tasks import data
from mesajax.tasks.base import TaskFamily, check, is_int


@dataclasses.dataclass(frozen=True)
class _GaussianRegression(TaskFamily):
  """Shared sampling, parameters and minibatching; subclasses define labels and the loss."""

  name = "_regression"

  dim: int = 10
  n_train: int = 20
  n_val: int = 200
  input_cond: float = 1.0
  init_scale: float = 0.0
  batch_size: int | None = None

  # --- subclass hooks ----------------------------------------------------------------------
  def _labels(self, e_Nx2, x_NxD, w_star):
    """Labels of the rows ``x_NxD`` given two standard normals ``e_Nx2`` per row."""
    raise NotImplementedError

  def _loss(self, params, x_NxD, y_N):
    raise NotImplementedError

  # --- the interface -------------------------------------------------------------------------
  def validate(self) -> None:
    n = self.name
    check(is_int(self.dim) and self.dim >= 1, f"{n}: dim must be an int >= 1, got {self.dim!r}")
    check(is_int(self.n_train) and self.n_train >= 1,
          f"{n}: n_train must be an int >= 1, got {self.n_train!r}")
    check(is_int(self.n_val) and self.n_val >= 1,
          f"{n}: n_val must be an int >= 1, got {self.n_val!r}")
    check(self.input_cond >= 1.0, f"{n}: input_cond must be >= 1, got {self.input_cond!r}")
    check(self.init_scale >= 0.0, f"{n}: init_scale must be >= 0, got {self.init_scale!r}")
    check(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
          f"{n}: batch_size must be None or an int >= 1, got {self.batch_size!r}")

  def sample(self, key):
    k_cov, k_data = jax.random.split(key)
    cov, cov_sqrt = data.input_covariance(k_cov, self.dim, self.input_cond)
    # One Gaussian draw for the rest (see data.py on compile time); e_* feed the label noise.
    w_star, z_train, z_val, e_train, e_val = data.normals(
        k_data, (self.dim,), (self.n_train, self.dim), (self.n_val, self.dim),
        (self.n_train, 2), (self.n_val, 2))
    w_star = w_star / jnp.sqrt(self.dim)
    x_train, x_val = z_train @ cov_sqrt, z_val @ cov_sqrt
    return {
        "w_star": w_star, "cov": cov,
        "x_train": x_train, "y_train": self._labels(e_train, x_train, w_star),
        "x_val": x_val, "y_val": self._labels(e_val, x_val, w_star),
    }

  def init(self, key, task):
    w = self.init_scale * jax.random.normal(key, (self.dim,)) / jnp.sqrt(self.dim)
    return {"w": w, "b": jnp.zeros([])}

  def train_loss(self, params, task, key):
    x, y = data.minibatch(key, (task["x_train"], task["y_train"]), self.batch_size)
    return self._loss(params, x, y)

  def train_loss_full(self, params, task):
    return self._loss(params, task["x_train"], task["y_train"])

  def outer_loss_full(self, params, task):
    return self._loss(params, task["x_val"], task["y_val"])


def predict(params, x_NxD):
  """The linear predictor (or logit) ``x . w + b``: ``[N]``."""
  return x_NxD @ params["w"] + params["b"]


@dataclasses.dataclass(frozen=True)
class LinearRegression(_GaussianRegression):
  """Noisy linear regression, 1/2 MSE loss; see module doc for the knobs."""

  name = "linreg"
  test_shift = dict(dim=4, n_train=50, n_val=30, input_cond=30.0, init_scale=1.0, batch_size=8,
                    noise=0.0, w_scale=3.0)
  gd_lr = 0.1
  default_shifts = {"n_train_x10": {"task": {"n_train": 200}}, "noiseless": {"task": {"noise": 0.0}},
                    "dim_x2": {"task": {"dim": 20}}, "horizon_x10": {"horizon_mult": 10}}
  sample_only = ("noise",)  # only the labels' sampling (and the oracle, which no program uses)

  noise: float = 0.5
  w_scale: float = 1.0

  def validate(self) -> None:
    super().validate()
    check(self.noise >= 0.0, f"linreg: noise must be >= 0, got {self.noise!r}")
    check(self.w_scale >= 0.0, f"linreg: w_scale must be >= 0, got {self.w_scale!r}")

  def _labels(self, e_Nx2, x_NxD, w_star):
    return self.w_scale * x_NxD @ w_star + self.noise * e_Nx2[:, 0]

  def _loss(self, params, x_NxD, y_N):
    return 0.5 * jnp.mean(jnp.square(predict(params, x_NxD) - y_N))

  def oracle(self, task):
    """The Bayes posterior mean of the weights given the training rows (the best achievable
    expected outer loss under the family's prior): with v = w_scale·w* ~ N(0, w_scale²/dim · I),
    b = 0 and noise σ, it is ridge regression w = (XᵀX + λI)⁻¹Xᵀy with λ = σ²·dim / w_scale²
    (σ = 0: the minimum-norm least-squares solution), computed through the SVD of X."""
    return bayes_posterior_mean(task, self.noise ** 2 * self.dim / max(self.w_scale ** 2, 1e-30))

  def proxies(self):
    def param_error(params, task):
      """1/2 ||w - w_scale w*||^2 + 1/2 b^2: Euclidean distance to the teacher; differs from
      the population risk's geometry when ``input_cond > 1``."""
      dw = params["w"] - self.w_scale * task["w_star"]
      return 0.5 * jnp.sum(jnp.square(dw)) + 0.5 * jnp.square(params["b"])

    def pop_excess(params, task):
      """Population excess risk 1/2 (w - w_scale w*)^T Sigma (w - w_scale w*) + 1/2 b^2, i.e. the
      expected outer loss minus the noise floor noise^2 / 2 (infinite validation set)."""
      dw = params["w"] - self.w_scale * task["w_star"]
      return 0.5 * dw @ (task["cov"] @ dw) + 0.5 * jnp.square(params["b"])

    return {"param_error": param_error, "pop_excess": pop_excess}


def bayes_posterior_mean(task, lam: float) -> dict:
  """Ridge weights (XᵀX + λI)⁻¹Xᵀy on the training rows through the SVD X = U diag(s) Vᵀ,
  w = V diag(s / (s² + λ)) Uᵀy (λ = 0: minimum-norm least squares), b = 0, as params."""
  x_NxD, y_N = task["x_train"], task["y_train"]
  u, s, vt = jnp.linalg.svd(x_NxD, full_matrices=False)
  tol = jnp.max(s) * max(x_NxD.shape) * jnp.finfo(s.dtype).eps
  filt = jnp.where(s > tol, s / (s * s + lam), 0.0)
  return {"w": vt.T @ (filt * (u.T @ y_N)), "b": jnp.zeros([], y_N.dtype)}


def least_squares(task, split: str = "train") -> dict:
  """Closed-form least-squares fit (with bias) on ``split``'s rows, as params (minimum-norm
  solution when the system is underdetermined)."""
  x_NxD, y_N = task[f"x_{split}"], task[f"y_{split}"]
  x1 = jnp.concatenate([x_NxD, jnp.ones_like(x_NxD[:, :1])], axis=1)
  sol = jnp.linalg.lstsq(x1, y_N)[0]
  return {"w": sol[:-1], "b": sol[-1]}


@dataclasses.dataclass(frozen=True)
class LogisticRegression(_GaussianRegression):
  """Binary logistic regression on a logistic teacher, mean BCE loss; see module doc."""

  name = "logreg"
  test_shift = dict(dim=4, n_train=50, n_val=30, input_cond=30.0, init_scale=1.0, batch_size=8,
                    logit_scale=50.0, label_noise=0.2)
  gd_lr = 0.5
  default_shifts = {"label_noise": {"task": {"label_noise": 0.2}},
                    "n_train_x10": {"task": {"n_train": 200}}, "horizon_x10": {"horizon_mult": 10}}

  logit_scale: float = 4.0
  label_noise: float = 0.0

  def validate(self) -> None:
    super().validate()
    check(self.logit_scale >= 0.0, f"logreg: logit_scale must be >= 0, got {self.logit_scale!r}")
    check(0.0 <= self.label_noise <= 0.5,
          f"logreg: label_noise must be in [0, 0.5], got {self.label_noise!r}")

  def _labels(self, e_Nx2, x_NxD, w_star):
    u_Nx2 = data.uniform_from_normal(e_Nx2)
    p_N = jax.nn.sigmoid(self.logit_scale * x_NxD @ w_star)
    y_N = u_Nx2[:, 0] < p_N  # Bernoulli(p)
    if self.label_noise > 0.0:
      y_N = y_N ^ (u_Nx2[:, 1] < self.label_noise)
    return y_N.astype(jnp.float32)

  def _loss(self, params, x_NxD, y_N):
    z_N = predict(params, x_NxD)
    # BCE with logits: log(1 + e^z) - y z.
    return jnp.mean(jnp.logaddexp(0.0, z_N) - y_N * z_N)

  def proxies(self):
    def train_hinge(params, task):
      """Mean hinge loss max(0, 1 - s z) on the training rows, s = 2y - 1 (an SVM-type
      objective; stops pushing on points with margin >= 1, unlike BCE)."""
      s_N = 2.0 * task["y_train"] - 1.0
      return jnp.mean(jax.nn.relu(1.0 - s_N * predict(params, task["x_train"])))

    def neg_margin(params, task):
      """Minus the mean signed margin s z on the training rows: unbounded below, rewards
      confident separation at any scale (parts ways with the validation BCE)."""
      s_N = 2.0 * task["y_train"] - 1.0
      return -jnp.mean(s_N * predict(params, task["x_train"]))

    return {"train_hinge": train_hinge, "neg_margin": neg_margin}
