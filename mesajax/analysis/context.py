"""The per-split analysis context shared by every analysis stage, and the row collector.

A stage is a function ``(SplitContext) -> list[row]`` registered by name in
``mesajax.registry.ANALYSES``. The context holds what several stages share, computed lazily and
once: the tasks of the split's ``analysis`` key stream, the full-batch trajectories with the
dictionary along them (``traj``), the Jacobian analyses at points (``points``, float64), the
objective fit (``fit``, float64, used by ``alignment`` too), and the permutations of the tasks used
by every permutation null (``perms``). Adding an analysis is one new module with a stage function
plus one line in ``ANALYSES``.

Numerics: trajectories run in float32 (what the optimizer does in use); everything that cancels —
the update field's Jacobian and every NCI, the quasi-static fixed point and ū, the objective fit —
is computed in float64 inside ``jax.enable_x64(True)`` scopes, from float64 copies of the points.
The compiled programs those lazy properties call live in ``mesajax.analysis.programs``.
"""
from __future__ import annotations

import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mesajax.analysis import dictionary
from mesajax.analysis import quasi_static as qs
from mesajax.analysis.programs import (FAST_COMPILE_MAX_PARAMS, _endpoint_fn, _points_fn,
                                       _qs_trajectory_fn, _trajectory_fn, to64)
from mesajax.eval.stats import finite_bootstrap_ci, stream_seed
from mesajax.report.rows import make_row
from mesajax.splits import purpose_key


def knob(acfg, name, defaults):
  """``acfg.name``; the analysis default when the config does not carry the knob."""
  try:
    v = acfg[name] if hasattr(acfg, "__getitem__") else getattr(acfg, name)
  except (KeyError, AttributeError):
    return defaults[name]
  return v


# --- rows -----------------------------------------------------------------------------------------

class Rows:
  """Collects rows of one (optimizer, split); keeps every per-task vector for paired rows.

  ``add`` aggregates per-task values: mean (or ``stat``) over the finite ones with a percentile
  bootstrap CI whose seed is derived from (seed, optimizer, split, analysis, metric) — an
  independent stream per metric. A row without a finite value carries ``undefined=<reason>``;
  so does every ``fixed`` row whose value is None or non-finite.
  """

  def __init__(self, split: str, opt_name: str, n_boot: int, seed: int,
               common: dict | None = None):
    self.split, self.opt, self.n_boot, self.seed = split, opt_name, n_boot, seed
    self.common = dict(common or {})
    self.rows: list[dict] = []
    self.per_task: dict[tuple[str, str], np.ndarray] = {}

  def seed_for(self, *names) -> int:
    return stream_seed(self.seed, self.opt, self.split, *names)

  def add(self, analysis, metric, per_task, stat=np.mean, undefined: str | None = None, **extra):
    x = np.asarray(per_task, np.float64).reshape(-1).copy()
    self.per_task[(analysis, metric)] = x
    out = finite_bootstrap_ci(x, n_boot=self.n_boot, seed=self.seed_for(analysis, metric),
                              stat=stat)
    if out is None:
      reason = undefined or f"no finite value in {x.size} tasks"
      self.rows.append(make_row(analysis, self.split, self.opt, metric, None, n=0,
                                undefined=reason, **self.common, **extra))
      return
    v, lo, hi, n = out
    if n < x.size:
      extra.setdefault("n_undefined", int(x.size - n))
      if undefined:
        extra.setdefault("undefined_tasks", undefined)
    self.rows.append(make_row(analysis, self.split, self.opt, metric, v, lo, hi, n,
                              **self.common, **extra))

  def fixed(self, analysis, metric, value, ci_low=None, ci_high=None, n=None,
            undefined: str | None = None, **extra):
    bad = value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value))
    if bad:
      extra["undefined"] = undefined or "non-finite value"
      value, ci_low, ci_high = None, None, None
      n = 0 if n is None else n
    self.rows.append(make_row(analysis, self.split, self.opt, metric, value, ci_low, ci_high, n,
                              **self.common, **extra))


def _point_indices(num_steps, num_points):
  return np.floor((np.arange(num_points) + 0.5) * num_steps / num_points).astype(np.int32)


def take(tree, idx, axis=1):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=axis), tree)


def derangements(b: int, r: int, seed: int) -> np.ndarray:
  """``r`` random permutations of ``b`` tasks without fixed points, [r, b] (the permutation null
  pairs each task's updates with another task's gradients)."""
  rng = np.random.default_rng(seed)
  out = np.empty((r, b), np.int64)
  for i in range(r):
    while True:
      p = rng.permutation(b)
      if b < 2 or np.all(p != np.arange(b)):
        break
    out[i] = p
  return out


# --- the context ----------------------------------------------------------------------------------

class SplitContext:
  """Everything the stages share for one (optimizer, φ, split): see the module docstring.

  Attributes: ``opt, phi, opt_name, split, fam, acfg, seed, knob(name)``; ``b`` tasks, ``t_len``
  steps, ``p_num`` points, ``horizon``, ``names`` (dictionary terms), ``train_ix``, ``outer_ix``,
  ``tasks``, ``keys``, ``n_params``, ``sm`` (``quasi_static.StateMap``), ``use_qs``, ``rows``
  (``Rows``); lazily: ``traj``, ``points``, ``perms``, and ``cache`` (a dict stages may fill, e.g.
  the objective fit that ``alignment`` reuses).
  """

  def __init__(self, opt, phi, opt_name, split, acfg, seed, defaults, timings=None,
               common: dict | None = None):
    # One placement for every φ: a restored checkpoint's φ carries the meta-training mesh's
    # NamedSharding, a fresh φ (the untrained null) a single-device one, and jit compiles each
    # input sharding separately (the null pass recompiled every program).
    phi = jax.device_put(phi, jax.local_devices()[0])
    self.opt, self.phi, self.opt_name, self.split = opt, phi, opt_name, split
    self.acfg, self.seed, self.defaults, self.timings = acfg, int(seed), defaults, timings
    self.fam = split.family
    self.b = int(self.knob("num_tasks"))
    self.t_len = int(self.knob("num_steps"))
    self.p_num = int(self.knob("num_points"))
    self.horizon = int(split.horizon)
    self.names = dictionary.term_names(self.fam)
    self.train_ix = self.names.index("train_loss")
    self.outer_ix = self.names.index("outer_loss")
    self.rows = Rows(split.name, opt_name, int(self.knob("n_boot")), self.seed, common)
    self.cache: dict = {}
    k_tasks, k_init, self.k_pts = jax.random.split(purpose_key(self.seed, "analysis", split.name), 3)
    self.tasks = self.fam.sample_batch(k_tasks, self.b)
    self.keys = jax.random.split(k_init, self.b)
    self.params_like = self.fam.init(self.keys[0], jax.tree.map(lambda x: x[0], self.tasks))
    self.state_like = opt.init(phi, self.params_like)
    self.n_params = int(ravel_pytree(self.params_like)[0].shape[0])
    self.hidden_like = opt.hidden_state(self.state_like)
    self.sm = qs.StateMap(opt, self.state_like, self.params_like)
    # Dense ∂F/∂s up to qs_max_state floats; above it Krylov methods (qs_matfree) or nothing.
    self.qs_matfree = self.sm.dim > int(self.knob("qs_max_state")) and bool(self.knob("qs_matfree"))
    self.use_qs = 0 < self.sm.dim and (self.sm.dim <= int(self.knob("qs_max_state"))
                                       or self.qs_matfree)
    self.hz = jnp.asarray(self.horizon, jnp.int32)
    self.fast = self.n_params <= FAST_COMPILE_MAX_PARAMS
    self._tick = time.perf_counter()

  def knob(self, name):
    return knob(self.acfg, name, self.defaults)

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    if self.timings is not None:
      key = f"{self.split.name}/{self.opt_name}/{stage}"
      self.timings[key] = self.timings.get(key, 0.0) + now - self._tick
    self._tick = now

  @functools.cached_property
  def traj(self) -> dict:
    fn = _trajectory_fn(self.opt, self.fam.program_key(), self.t_len,
                        self.hidden_like is not None, self.fast)
    out = jax.block_until_ready(fn(self.phi, self.hz, self.tasks, self.keys))
    self.lap("trajectories")
    return out

  @functools.cached_property
  def updates(self) -> np.ndarray:
    return np.asarray(self.traj["updates"], np.float64)

  @functools.cached_property
  def perms(self) -> np.ndarray:
    return derangements(self.b, int(self.knob("num_perms")), self.rows.seed_for("permutations"))

  def params_tree(self, thetas):
    unravel = ravel_pytree(self.params_like)[1]
    flat = jax.vmap(unravel)(thetas.reshape((-1, thetas.shape[-1])))
    return jax.tree.map(lambda x: x.reshape(thetas.shape[:2] + x.shape[1:]), flat)

  @functools.cached_property
  def point_idx(self) -> np.ndarray:
    return _point_indices(self.t_len, self.p_num)

  @functools.cached_property
  def points(self) -> dict:
    traj, b, p_num, n = self.traj, self.b, self.p_num, self.n_params
    idx = self.point_idx
    params_pts = self.params_tree(traj["thetas"][:, idx])
    states_pts = take(traj["opt_states"], jnp.asarray(idx))
    dense = n <= int(self.knob("dense_max"))
    want_jac = n <= int(self.knob("spd_max"))
    # Probes on the host (threefry inside jit is slow to compile on CPU), from the split's key.
    rng = np.random.default_rng(np.asarray(self.k_pts, np.uint32))
    # Probes wherever a field is not dense: above dense_max, and for ū when it is matrix-free.
    probed = not dense or self.qs_matfree
    k_pr = int(self.knob("num_probes")) if probed else 1
    k_sens = int(self.knob("num_sens_probes")) if probed else 1
    k_fit = int(self.knob("num_fit_probes")) if probed else 1
    v = rng.standard_normal((b, p_num, k_pr, n))
    w = rng.standard_normal((b, p_num, k_pr, n))
    z = rng.choice(np.array([-1.0, 1.0]), (b, p_num, k_sens, n))
    f = rng.standard_normal((b, p_num, k_fit, n))
    segments = tuple(int(np.size(x)) for x in jax.tree.leaves(self.params_like))
    krylov = int(self.knob("krylov_dim")) if self.qs_matfree else 0
    # Every point at once unless its probe products would exceed point_batch_mb (float64): past
    # the caches one point at a time is also faster (docs/analyses.md, "Scaling to 10⁵ parameters").
    jvps = 2 * k_pr + 1 + k_fit * (2 * len(segments) + 1)
    sequential = (probed and b * p_num * jvps * n * 8 * (2 if self.use_qs else 1)
                  > float(self.knob("point_batch_mb")) * 2 ** 20)
    with jax.enable_x64(True):
      sm = None
      if self.use_qs:
        sm = qs.StateMap(self.opt, to64(self.state_like), to64(self.params_like))
      fn = _points_fn(self.opt, self.fam.program_key(), dense, want_jac, sm, segments, krylov,
                      sequential, self.fast)
      out = fn(self.phi, self.hz, self.tasks, params_pts, states_pts, jnp.asarray(idx), v, w, z, f)
      out = jax.tree.map(np.asarray, jax.block_until_ready(out))
    self.lap("points")
    out["_dense"] = dense
    out["_qs_dense"] = dense and not self.qs_matfree
    return out

  def per_task_mean(self, key: str) -> np.ndarray:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN tasks stay NaN (undefined)
      return np.nanmean(self.points[key], axis=1)

  def qs_updates(self, sub: np.ndarray) -> np.ndarray:
    """ū (float64) at trajectory steps ``sub`` of every task."""
    traj = self.traj
    with jax.enable_x64(True):
      sm = qs.StateMap(self.opt, to64(self.state_like), to64(self.params_like))
      krylov = int(self.knob("krylov_dim")) if self.qs_matfree else 0
      out = _qs_trajectory_fn(self.opt, self.fam.program_key(), sm, krylov, self.fast)(
          self.phi, self.hz, self.tasks, self.params_tree(traj["thetas"][:, sub]),
          take(traj["opt_states"], jnp.asarray(sub)), jnp.asarray(sub),
          traj["grads"][:, sub, self.train_ix])
      return np.asarray(jax.block_until_ready(out))

  def endpoint(self, steps: int):
    fn = _endpoint_fn(self.opt, self.fam.program_key(), self.fast)
    g_end, u_end = fn(self.phi, self.hz, jnp.asarray(steps, jnp.int32), self.tasks, self.keys)
    out = np.asarray(g_end, np.float64), np.asarray(u_end, np.float64)
    self.lap("endpoint")
    return out
