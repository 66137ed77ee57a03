"""Random quadratics: the simplest family with a known Hessian and optimum.

  f(theta) = 1/2 (theta - theta*)^T A (theta - theta*),   A = Q diag(lam) Q^T,

with ``lam`` log-uniform in ``[eig_max / cond, eig_max]`` and ``Q`` a Haar-random rotation
(``rotate=True``: QR of a Gaussian matrix with Mezzadri's sign fix; identity otherwise). Random
rotation matters for the mesa-objective analyses: any per-coordinate update rule on an
axis-aligned (separable) quadratic is trivially conservative.

Noisy gradients: ``train_loss(theta, key) = f(theta) + noise * xi^T theta`` with ``xi ~ N(0, I)``
drawn from the step's key, so the gradient is ``A (theta - theta*) + noise * xi`` (isotropic
Gaussian gradient noise of standard deviation ``noise`` per coordinate) and the value is ``f`` up to
a zero-mean term. ``outer_loss = f`` (noiseless).

Knobs (fields of :class:`Quadratic`):

=================  =======  ========================================================================
knob               default  meaning
=================  =======  ========================================================================
``dim``            10       dimension of theta (int >= 1)
``cond``           10.0     condition number of A: eigenvalues in ``[eig_max / cond, eig_max]``
                            (>= 1)
``eig_max``        1.0      largest eigenvalue of A (> 0)
``rotate``         True     Haar-random eigenbasis Q; ``False``: A diagonal (separable problem)
``optimum_scale``  1.0      ``theta* = optimum_scale * N(0, I)``: spread of the optimum around the
                            mean initialisation (0); small = "optimum near init" (>= 0)
``far_frac``       0.0      fraction of tasks whose optimum is *far*: each task independently, with
                            probability ``far_frac``, draws ``theta* = far_scale * N(0, I)`` instead
                            (in [0, 1]; 0: every task uses ``optimum_scale``, the draw of the other
                            knobs is unchanged)
``far_scale``      3.0      spread of a far task's optimum (>= 0); only read when ``far_frac > 0``
``init_scale``     0.0      ``theta_0 = init_scale * N(0, I)`` from the init key (>= 0)
``noise``          0.0      std of the additive Gaussian gradient noise in ``train_loss`` (>= 0)
=================  =======  ========================================================================

Optimum location (goal misgeneralization, Langosco et al. 2022): with a small ``optimum_scale``
and ``far_frac = 0`` every optimum lies near the initialisation, so "stay near / shrink toward the
initialisation" is a good proxy for the loss; ``far_frac`` mixes in tasks where it is not, and a
shift to ``far_frac = 1`` puts every optimum far away. A task's far/near draw uses
``fold_in(key, 1)``, so the rest of the task (A, the direction of theta*) is the same draw either way.

Reference setting: learned_optimization's ``FixedDimQuadraticFamily`` (Metz et al. 2022,
``learned_optimization/tasks/quadratics.py``) has loss ``sum((target - theta)^2)`` with
``target ~ N(0, I)``. That is ``eig_max=2, cond=1, rotate=False, optimum_scale=1, noise=0``
(``A = 2 I`` so ``f = ||theta - target||^2``). Its ``init`` draws ``theta_0 ~ N(0, I)``:
``init_scale=1`` reproduces that too; ``init_scale=0`` starts at the mean initialisation instead.

Task pytree: ``{"A": [dim, dim], "eigs": [dim], "Q": [dim, dim], "theta_star": [dim]}``.
Params: ``{"theta": [dim]}``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mesajax.tasks import data
from mesajax.tasks.base import TaskFamily, check, is_int


@dataclasses.dataclass(frozen=True)
class Quadratic(TaskFamily):
  """Random (rotated, ill-conditioned) quadratics with optional gradient noise; see module doc."""

  name = "quadratic"
  test_shift = dict(dim=5, cond=100.0, eig_max=2.0, rotate=False, optimum_scale=0.1,
                    init_scale=1.0, noise=0.3, far_frac=0.5, far_scale=10.0)
  gd_lr = 0.5
  default_shifts = {"dim_x2": {"task": {"dim": 20}}, "cond_x10": {"task": {"cond": 100.0}},
                    "optimum_far": {"task": {"optimum_scale": 3.0}},
                    "horizon_x10": {"horizon_mult": 10}}

  dim: int = 10
  cond: float = 10.0
  eig_max: float = 1.0
  rotate: bool = True
  optimum_scale: float = 1.0
  far_frac: float = 0.0
  far_scale: float = 3.0
  init_scale: float = 0.0
  noise: float = 0.0

  def validate(self) -> None:
    check(is_int(self.dim) and self.dim >= 1,
          f"quadratic: dim must be an int >= 1, got {self.dim!r}")
    check(self.cond >= 1.0, f"quadratic: cond must be >= 1, got {self.cond!r}")
    check(self.eig_max > 0.0, f"quadratic: eig_max must be > 0, got {self.eig_max!r}")
    check(isinstance(self.rotate, bool), f"quadratic: rotate must be a bool, got {self.rotate!r}")
    check(self.optimum_scale >= 0.0,
          f"quadratic: optimum_scale must be >= 0, got {self.optimum_scale!r}")
    check(0.0 <= self.far_frac <= 1.0,
          f"quadratic: far_frac must be in [0, 1], got {self.far_frac!r}")
    check(self.far_scale >= 0.0, f"quadratic: far_scale must be >= 0, got {self.far_scale!r}")
    check(self.init_scale >= 0.0, f"quadratic: init_scale must be >= 0, got {self.init_scale!r}")
    check(self.noise >= 0.0, f"quadratic: noise must be >= 0, got {self.noise!r}")

  def sample(self, key):
    # One Gaussian draw for everything (see data.py on compile time).
    z_D, g_DxD, theta_star = data.normals(key, (self.dim,), (self.dim, self.dim), (self.dim,))
    eigs_D = data.log_uniform_from_normal(z_D, self.eig_max / self.cond, self.eig_max)
    q_DxD = data.haar_rotation(g_DxD) if self.rotate else jnp.eye(self.dim)
    a_DxD = (q_DxD * eigs_D) @ q_DxD.T
    a_DxD = 0.5 * (a_DxD + a_DxD.T)  # exactly symmetric: the Hessian of f
    scale = self.optimum_scale
    if self.far_frac > 0.0:  # static: the default path draws exactly what it always drew
      far = jax.random.uniform(jax.random.fold_in(key, 1)) < self.far_frac
      scale = jnp.where(far, self.far_scale, self.optimum_scale)
    return {"A": a_DxD, "eigs": eigs_D, "Q": q_DxD, "theta_star": scale * theta_star}

  def init(self, key, task):
    return {"theta": self.init_scale * jax.random.normal(key, (self.dim,))}

  def train_loss_full(self, params, task):
    delta = params["theta"] - task["theta_star"]
    return 0.5 * delta @ (task["A"] @ delta)

  def outer_loss_full(self, params, task):
    return self.train_loss_full(params, task)

  def train_loss(self, params, task, key):
    loss = self.train_loss_full(params, task)
    if self.noise > 0.0:
      xi_D = jax.random.normal(key, (self.dim,))
      loss = loss + self.noise * xi_D @ params["theta"]
    return loss

  def oracle(self, task):
    """The minimiser θ* of the (noiseless) outer loss: outer loss 0."""
    return {"theta": task["theta_star"]}

  def proxies(self):
    def dist_opt(params, task):
      """1/2 ||theta - theta*||^2: same optimum as f, isotropic geometry."""
      return 0.5 * jnp.sum(jnp.square(params["theta"] - task["theta_star"]))

    def diag_quadratic(params, task):
      """1/2 sum_i A_ii (theta_i - theta*_i)^2: the axis-aligned part of f that a per-coordinate
      rule sees; equals f when ``rotate=False``."""
      delta = params["theta"] - task["theta_star"]
      return 0.5 * jnp.sum(jnp.diagonal(task["A"]) * jnp.square(delta))

    return {"dist_opt": dist_opt, "diag_quadratic": diag_quadratic}


def hessian(task) -> jax.Array:
  """The (constant) Hessian ``A`` of the task's loss: ``[dim, dim]``."""
  return task["A"]


def optimum(task) -> dict:
  """The minimiser of both the training and the outer loss, as params: ``{"theta": theta*}``."""
  return {"theta": task["theta_star"]}


def gradient(params, task) -> dict:
  """Closed-form noiseless gradient ``A (theta - theta*)``, as params."""
  return {"theta": task["A"] @ (params["theta"] - task["theta_star"])}
