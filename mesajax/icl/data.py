"""The in-context linear-regression task family.

One task (one sequence) is a weight vector and a context of N labelled points plus M queries:

  w ~ N(0, τ² I_d)                            (``weights="gaussian"``)
      or τ · (k-sparse: k random coordinates N(0, 1), the rest 0)  (``weights="sparse"``)
      or drawn uniformly from a fixed pool of ``num_pretrain_tasks`` such vectors (task diversity,
      Raventós et al. 2023; the pool is a function of ``pool_seed`` only, so it is the same in
      training and evaluation)
  x = s · Σ^{1/2} z,  z ~ U(−1, 1)^d  (``inputs="uniform"``) or N(0, I_d) (``inputs="normal"``)
      Σ = diag(λ_1..λ_d), λ log-spaced in [1, input_cond] and normalised to mean 1
      (``orthant=True`` takes |x|: every input in the positive orthant)
  y = wᵀx + σ ε,  ε ~ N(0, 1), for context and query points alike

Queries: ``query="iid"`` draws x_q like the context; ``"context_point"`` sets x_q to a context
input (x_q = x_{m mod N}, label with fresh noise); ``"orthogonal"`` projects an iid query onto the
orthogonal complement of span{x_1..x_N} (needs N < d; the validator refuses N ≥ d).

Under this prior the Bayes-optimal predictor of the query label is ridge regression
ŵ = (XᵀX + λ* I)⁻¹ Xᵀy with λ* = σ²/τ² (posterior mean of a Gaussian prior and Gaussian noise;
for ``weights="gaussian"`` and an infinite pool only).

The conventions of von Oswald et al. (2023): their text samples x ~ U(−1, 1), their code
U(−0.5, 0.5) with a ½-MSE loss. mesajax uses x ~ U(−1, 1) (``input_scale=1``) and the ½-MSE
loss for the noiseless GD experiment, and x ~ N(0, I) for the noisy ridge experiments (Garg et
al. 2022; Akyürek et al. 2022).

A task is the dict ``{"x_NxD", "y_N", "xq_MxD", "yq_M", "w_D"}``; every function is pure and
vmappable; the knobs are static fields of a frozen dataclass (hashable, closed over by ``jit``).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from mesajax.icl.linalg import lstsq


INPUTS = ("uniform", "normal")
WEIGHTS = ("gaussian", "sparse")
QUERIES = ("iid", "context_point", "orthogonal")


@dataclasses.dataclass(frozen=True)
class ICLRegression:
  """In-context linear regression; see the module docstring for every knob."""

  d: int = 10
  N: int = 10
  tau: float = 1.0
  sigma: float = 0.0
  inputs: str = "uniform"
  input_scale: float = 1.0
  input_cond: float = 1.0
  orthant: bool = False
  weights: str = "gaussian"
  sparsity: int = 0              # nonzero coordinates of w when weights="sparse"
  num_pretrain_tasks: int = 0    # 0: a fresh w for every sequence; k > 0: a fixed pool of k
  pool_seed: int = 0
  query: str = "iid"

  def validate(self) -> None:
    """One-line ``ValueError`` for a bad knob."""
    def need(ok, msg):
      if not ok:
        raise ValueError(f"icl task: {msg}")
    isint = lambda v: isinstance(v, int) and not isinstance(v, bool)
    isnum = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    need(isint(self.d) and 1 <= self.d <= 4096, f"d must be an int in [1, 4096], got {self.d!r}")
    need(isint(self.N) and 1 <= self.N <= 65536, f"N must be an int in [1, 65536], got {self.N!r}")
    need(isnum(self.tau) and self.tau > 0, f"tau must be a finite number > 0, got {self.tau!r}")
    need(isnum(self.sigma) and self.sigma >= 0, f"sigma must be a finite number >= 0, got {self.sigma!r}")
    need(self.inputs in INPUTS, f"inputs must be one of {list(INPUTS)}, got {self.inputs!r}")
    need(isnum(self.input_scale) and self.input_scale > 0,
         f"input_scale must be a finite number > 0, got {self.input_scale!r}")
    need(isnum(self.input_cond) and self.input_cond >= 1,
         f"input_cond must be a finite number >= 1, got {self.input_cond!r}")
    need(isinstance(self.orthant, bool), f"orthant must be a bool, got {self.orthant!r}")
    need(self.weights in WEIGHTS, f"weights must be one of {list(WEIGHTS)}, got {self.weights!r}")
    if self.weights == "sparse":
      need(isint(self.sparsity) and 1 <= self.sparsity <= self.d,
           f"sparsity must be an int in [1, d={self.d}] for sparse weights, got {self.sparsity!r}")
    need(isint(self.num_pretrain_tasks) and self.num_pretrain_tasks >= 0,
         f"num_pretrain_tasks must be an int >= 0, got {self.num_pretrain_tasks!r}")
    need(isint(self.pool_seed) and self.pool_seed >= 0, f"pool_seed must be an int >= 0")
    need(self.query in QUERIES, f"query must be one of {list(QUERIES)}, got {self.query!r}")
    need(self.query != "orthogonal" or self.N < self.d,
         f"query='orthogonal' needs N < d (the context spans R^d otherwise), got N={self.N}, d={self.d}")

  def replace(self, **overrides) -> "ICLRegression":
    known = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"icl task has no knob(s) {unknown}; knobs: {sorted(known)}")
    out = dataclasses.replace(self, **overrides)
    out.validate()
    return out

  def knobs(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def bayes_lambda(self) -> float:
    """λ* = σ²/τ², the ridge penalty of the Bayes-optimal predictor (posterior mean)."""
    return float(self.sigma) ** 2 / float(self.tau) ** 2

  # --- sampling ------------------------------------------------------------------------------
  def cov_diag(self) -> jax.Array:
    """Eigenvalues of Σ: log-spaced in [1, input_cond], normalised to mean 1, largest first."""
    lam = jnp.logspace(0.0, math.log10(self.input_cond), self.d)[::-1] if self.d > 1 else jnp.ones(1)
    return lam / jnp.mean(lam)

  def _inputs(self, z):
    """Inputs from standard normals ``z`` (uniforms as 2Φ(z) − 1, exactly U(−1, 1))."""
    if self.inputs == "uniform":
      z = 2.0 * ndtr(z) - 1.0
    x = self.input_scale * z * jnp.sqrt(self.cov_diag())
    return jnp.abs(x) if self.orthant else x

  def _weight_from(self, z_D, g_D):
    """One weight vector from two standard-normal draws (``g_D`` picks the sparse support)."""
    if self.weights == "gaussian":
      return self.tau * z_D
    rank_D = jnp.argsort(jnp.argsort(g_D))  # a uniformly random permutation's ranks
    return self.tau * jnp.where(rank_D < self.sparsity, z_D, 0.0)

  def pool(self) -> jax.Array:
    """The fixed pool of pretraining weights ``[max(num_pretrain_tasks, 1), d]``."""
    k = max(self.num_pretrain_tasks, 1)
    z = jax.random.normal(jax.random.PRNGKey(1_000_003 + self.pool_seed), (k, 2, self.d))
    return jax.vmap(self._weight_from)(z[:, 0], z[:, 1])

  def _sizes(self, m):
    n, d = self.N, self.d
    return (d,), (d,), (n, d), (m, d), (n,), (m,), (1,)

  def from_normals(self, z, num_queries: int = 1) -> dict:
    """One task from a flat vector of standard normals (``num_normals`` of them)."""
    n, d, m = self.N, self.d, num_queries
    sizes = [math.prod(s) for s in self._sizes(m)]
    offsets = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    z_w, g_w, z_x, z_q, e_N, e_M, u = [p.reshape(s) for p, s in
                                       zip(jnp.split(z, offsets), self._sizes(m))]
    if self.num_pretrain_tasks > 0:
      i = jnp.minimum(jnp.floor(ndtr(u[0]) * self.num_pretrain_tasks).astype(jnp.int32),
                      self.num_pretrain_tasks - 1)
      w_D = self.pool()[i]
    else:
      w_D = self._weight_from(z_w, g_w)
    x_NxD = self._inputs(z_x)
    xq_MxD = self._inputs(z_q)
    if self.query == "context_point":
      xq_MxD = x_NxD[jnp.arange(m) % n]
    elif self.query == "orthogonal":
      # Projector onto the orthogonal complement of span{x_i}: I − X⁺X.
      proj_DxD = jnp.eye(d) - lstsq(x_NxD, jnp.eye(n, dtype=x_NxD.dtype)) @ x_NxD
      xq_MxD = xq_MxD @ proj_DxD.T
    y_N = x_NxD @ w_D + self.sigma * e_N
    yq_M = xq_MxD @ w_D + self.sigma * e_M
    return {"x_NxD": x_NxD, "y_N": y_N, "xq_MxD": xq_MxD, "yq_M": yq_M, "w_D": w_D}

  def num_normals(self, num_queries: int = 1) -> int:
    return sum(math.prod(s) for s in self._sizes(num_queries))

  def sample(self, key, num_queries: int = 1) -> dict:
    """One task with ``num_queries`` queries (all sharing the context)."""
    return self.from_normals(jax.random.normal(key, (self.num_normals(num_queries),)), num_queries)

  def sample_batch(self, key, batch: int, num_queries: int = 1) -> dict:
    """``batch`` tasks; every leaf gets a leading ``B`` axis.

    Compile time: every ``jax.random`` call inlines its own threefry graph (XLA's CPU compile time
    grows with their number), so a batch is sliced from ONE Gaussian draw; uniforms are Φ(z).
    """
    z_BxZ = jax.random.normal(key, (batch, self.num_normals(num_queries)))
    return jax.vmap(lambda z: self.from_normals(z, num_queries))(z_BxZ)


def shuffle_context(key, task: dict) -> dict:
  """The shuffled-context null: the context labels permuted, so each y_i belongs to another x_j.
  Query labels are unchanged; a model that uses the (x, y) pairing must lose its accuracy."""
  perm = jax.random.permutation(key, task["y_N"].shape[0])
  return {**task, "y_N": task["y_N"][perm]}
