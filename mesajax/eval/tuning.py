"""Learning-rate grid search for hand-designed baselines, on tuning tasks of one split.

For a baseline (an optimizer with ``tunable_lr``; its learning rate is set through
``opt.with_learning_rate(phi, lr)``, the optimizer interface's learning-rate contract) the grid

  lr_g = exp(linspace(log lr_grid_min, log lr_grid_max, lr_grid_size)),  g = 1..G,

is evaluated in one compiled program (shared by all baselines of a split): ``jax.vmap`` over the
grid's ``phi`` (every other option stays at its configured value), ``jax.vmap`` over the tuning
tasks, and ``mesajax.rollout.run_curve`` for the split's full horizon. The selected rate is

  lr* = argmin_g  (1/M) sum_m  L_out(theta_T^{g,m}),

the mean final outer loss over the M tuning tasks, where a run that diverges (final outer loss
non-finite or above ``stats.EXPLODE_FACTOR`` × its initial one: ``stats.diverged``) counts as
+inf: a rate that blows up any tuning task is never selected while a stable one exists. (A rate
that merely overfits is judged by its final loss like any other.) If every rate fails somewhere, the rate with the
fewest failed tasks wins (ties: smaller mean final loss over its finite runs) and ``all_failed`` is
set. ``at_grid_edge`` flags a winner at either end of the grid: the optimum may lie outside it.

Tuning is per split: tasks come from ``purpose_key(seed, "tune", split)``, a stream disjoint from
meta-training and held-out evaluation, and a shifted split (other knobs or a longer horizon) retunes
its baselines on its own tuning tasks, so baselines are always compared at their best rate for the
tasks they face (the learned optimizer gets no such retuning: that is the point of a shift).
Tuning on separate tasks follows the protocol of Metz et al. 2020 ("Tasks, stability, architecture,
and compute") and Wu et al. 2018 (short-horizon bias) for hand-designed baselines.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.eval import stats
from mesajax.rollout import run_curve
from mesajax.splits import purpose_tasks
from mesajax.tasks.views import PresetInit

PyTree = Any


class TuningResult(NamedTuple):
  best_lr: float
  best_index: int
  at_grid_edge: bool
  all_failed: bool
  lrs: np.ndarray             # [G] the grid
  mean_final_loss: np.ndarray  # [G] selection score (+inf where some tuning task failed)
  failed_frac: np.ndarray      # [G] fraction of tuning tasks that failed at each rate
  num_tasks: int


def lr_grid(lr_min: float, lr_max: float, size: int) -> np.ndarray:
  """``size`` log-spaced learning rates from ``lr_min`` to ``lr_max`` inclusive."""
  if not (lr_min > 0 and lr_max > lr_min):
    raise ValueError(f"need 0 < lr_grid_min < lr_grid_max, got {lr_min}, {lr_max}")
  if size < 2:
    raise ValueError(f"lr_grid_size must be >= 2, got {size}")
  return np.exp(np.linspace(math.log(lr_min), math.log(lr_max), int(size)))


def grid_phi(opt, base_phi: PyTree, lrs) -> PyTree:
  """``base_phi`` with its learning rate set to each of ``lrs``: every leaf gets a leading grid axis
  (through the optimizer's learning-rate contract, ``opt.with_learning_rate``)."""
  if not getattr(opt, "tunable_lr", False):
    raise ValueError(f"optimizer {opt.name!r} has no tunable learning rate (tunable_lr is False); "
                     "it cannot be a tuned baseline")
  return jax.vmap(lambda lr: opt.with_learning_rate(base_phi, lr))(jnp.asarray(lrs, jnp.float32))


@functools.partial(jax.jit, static_argnames=("opts", "family", "horizon"))
def _grid_endpoints(opts, phis_G, family, tasks, keys, horizon):
  """Initial and final outer loss, ``[G, M]`` each, for every (rate, tuning task) pair, for each
  optimizer of ``opts`` (one compiled program for all of them: compiling them together is cheaper
  than one by one)."""
  def endpoints(opt, phi_G):
    def one(phi, task, key):
      out = run_curve(opt, phi, family, task, key, horizon, horizon, every=horizon)
      return out["outer_loss"][0], out["outer_loss"][-1]

    over_tasks = jax.vmap(one, in_axes=(None, 0, 0))
    return jax.vmap(over_tasks, in_axes=(0, None, None))(phi_G, tasks, keys)

  return tuple(endpoints(o, p) for o, p in zip(opts, phis_G))


def tuning_tasks(family, num_tasks: int, seed: int, split_name: str):
  """``(prepared, run_keys)`` for tuning on ``split_name``: ``num_tasks`` tasks from the tune stream."""
  return purpose_tasks(family, seed, "tune", split_name, num_tasks)


def select(lrs, initial_GxM, final_GxM) -> TuningResult:
  """The selection rule of the module docstring, on given per-(rate, task) losses (numpy)."""
  lrs = np.asarray(lrs, np.float64)
  final_GxM = np.asarray(final_GxM, np.float64)
  failed_GxM = stats.diverged(initial_GxM, final_GxM)
  score_G = np.where(failed_GxM.any(axis=1), np.inf,
                     np.where(failed_GxM, 0.0, final_GxM).mean(axis=1))
  all_failed = bool(np.all(np.isinf(score_G)))
  if all_failed:
    finite_GxM = np.isfinite(final_GxM)
    with np.errstate(invalid="ignore"):
      finite_mean_G = np.where(finite_GxM.any(axis=1),
                               np.where(finite_GxM, final_GxM, 0.0).sum(axis=1)
                               / np.maximum(finite_GxM.sum(axis=1), 1), np.inf)
    best = int(np.lexsort((finite_mean_G, failed_GxM.sum(axis=1)))[0])
  else:
    best = int(np.argmin(score_G))
  return TuningResult(
      best_lr=float(lrs[best]), best_index=best, at_grid_edge=best in (0, len(lrs) - 1),
      all_failed=all_failed, lrs=lrs, mean_final_loss=score_G,
      failed_frac=failed_GxM.mean(axis=1), num_tasks=int(final_GxM.shape[1]))


def tune_lr(opt, base_phi: PyTree, family, horizon: int, cfg_eval, seed: int,
            split_name: str, tasks=None) -> TuningResult:
  """Grid-searches ``log_lr`` of ``opt`` on the tuning tasks of one split (module docstring).

  Args:
    opt: a hand-designed ``Optimizer`` with ``tunable_lr``.
    base_phi: its phi at the configured hyperparameters (``opt.init_phi(key)``); everything but
      the learning rate is kept fixed.
    family, horizon: the split's task family and inner horizon.
    cfg_eval: ``config.eval`` (``lr_grid_min``, ``lr_grid_max``, ``lr_grid_size``,
      ``num_tuning_tasks``).
    seed, split_name: select the tuning key stream ``purpose_key(seed, "tune", split_name)``.
    tasks: optional precomputed ``tuning_tasks(family, num_tuning_tasks, seed, split_name)``.
  """
  return tune_many([opt], [base_phi], family, horizon, cfg_eval, seed, split_name, tasks)[0]


def tune_many(opts, base_phis, family, horizon: int, cfg_eval, seed: int, split_name: str,
              tasks=None) -> list[TuningResult]:
  """``tune_lr`` for several baselines on the same tuning tasks, in one compiled program."""
  lrs = lr_grid(float(cfg_eval.lr_grid_min), float(cfg_eval.lr_grid_max), int(cfg_eval.lr_grid_size))
  phis_G = [grid_phi(o, p, lrs) for o, p in zip(opts, base_phis)]
  if tasks is None:
    tasks = tuning_tasks(family, int(cfg_eval.num_tuning_tasks), seed, split_name)
  tasks, keys = tasks
  out = _grid_endpoints(tuple(opts), tuple(phis_G), PresetInit(family.program_key()), tasks, keys,
                        int(horizon))  # tasks are inputs: program shared across sample-only knobs
  return [select(lrs, np.asarray(initial), np.asarray(final)) for initial, final in out]
