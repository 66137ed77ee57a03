"""Statistics over tasks: percentile bootstrap confidence intervals and the divergence and
overfitting criteria.

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the n per-task values with
replacement B times, compute the statistic on each resample, and report the alpha/2 and 1 - alpha/2
quantiles of the B statistics as the (1 - alpha) interval around the statistic of the original sample.

Non-finite values. Every quantity bootstrapped here is a loss (lower is better) or a 0/1 indicator,
and a non-finite loss means the run blew up. ``bootstrap_ci`` therefore maps every non-finite value
(NaN, +inf, -inf) to ``+inf`` *explicitly* instead of dropping it: one diverged task makes the mean
``+inf`` and the interval reflects how often a resample contains such a task (``ci_high = +inf`` as
soon as more than alpha/2 of the resamples do; ``ci_low`` stays finite while fewer than 1 - alpha/2
do). The companion metric ``diverged_frac`` (see ``diverged``) counts the same tasks as a fraction,
with a finite interval. Result rows store +inf as null, named in the row's ``nonfinite`` map
(``mesajax.report.rows``); reports
print it as ``inf``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def as_loss_array(values) -> np.ndarray:
  """float64 copy of ``values`` with every non-finite entry replaced by ``+inf`` (a failed run)."""
  x = np.asarray(values, dtype=np.float64).reshape(-1).copy()
  x[~np.isfinite(x)] = np.inf
  return x


def _resample_stats(x_N: np.ndarray, idx_BxN: np.ndarray, stat: Callable) -> np.ndarray:
  samples_BxN = x_N[idx_BxN]
  try:
    out = np.asarray(stat(samples_BxN, axis=1), dtype=np.float64)
    if out.shape == (idx_BxN.shape[0],):
      return out
  except TypeError:  # a statistic without an ``axis`` argument
    pass
  return np.array([stat(s) for s in samples_BxN], dtype=np.float64)


def _quantiles(stats_B: np.ndarray, qs) -> np.ndarray:
  """Quantiles of the bootstrap statistics; without interpolation when some are +inf.

  Linear interpolation between +inf and a finite neighbour gives NaN (inf * 0), so if any
  resample's statistic is non-finite, use the inverted empirical CDF (Hyndman & Fan type 1).
  """
  s = np.where(np.isfinite(stats_B), stats_B, np.inf)
  method = "linear" if np.all(np.isfinite(s)) else "inverted_cdf"
  return np.quantile(s, qs, method=method)


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, stat: Callable = np.mean,
                 alpha: float = 0.05) -> tuple[float, float, float]:
  """Percentile bootstrap over tasks: ``(stat(values), lo, hi)`` with a ``1 - alpha`` interval.

  ``values`` holds one number per task; non-finite entries count as ``+inf`` (module docstring).
  ``stat`` is applied along ``axis=1`` of a ``[n_boot, n]`` matrix of resamples when it accepts
  ``axis`` (``np.mean``, ``np.median``), else once per resample. Deterministic in ``seed``. With
  one value the interval collapses to it.
  """
  x_N = as_loss_array(values)
  n = x_N.shape[0]
  if n == 0:
    raise ValueError("bootstrap_ci needs at least one value")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  with np.errstate(invalid="ignore", over="ignore"):
    value = float(stat(x_N))
    if n == 1:
      return value, value, value
    rng = np.random.default_rng(seed)
    idx_BxN = rng.integers(0, n, size=(n_boot, n))
    stats_B = _resample_stats(x_N, idx_BxN, stat)
  lo, hi = _quantiles(stats_B, [alpha / 2, 1 - alpha / 2])
  return value, float(lo), float(hi)


def bootstrap_mean_curve(curves_NxP, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
  """Mean over tasks of a ``[n_tasks, n_points]`` curve with per-point percentile bootstrap CIs.

  The same task resamples are used at every point (a resample is a set of tasks), computed as one
  matrix product of resample counts with the curves. Points where some task is non-finite are
  bootstrapped by ``bootstrap_ci`` (non-finite -> +inf). Returns ``(mean_P, lo_P, hi_P)``.
  """
  c = np.asarray(curves_NxP, dtype=np.float64)
  n, p = c.shape
  finite_P = np.all(np.isfinite(c), axis=0)
  mean_P = np.full(p, np.inf)
  mean_P[finite_P] = c[:, finite_P].mean(axis=0)
  lo_P, hi_P = mean_P.copy(), mean_P.copy()
  if n > 1:
    rng = np.random.default_rng(seed)
    idx_BxN = rng.integers(0, n, size=(n_boot, n))
    counts_BxN = np.zeros((n_boot, n))
    np.add.at(counts_BxN, (np.arange(n_boot)[:, None], idx_BxN), 1.0)
    boot_BxP = counts_BxN @ np.where(np.isfinite(c), c, 0.0) / n
    lo_P, hi_P = np.quantile(boot_BxP, [alpha / 2, 1 - alpha / 2], axis=0)
    lo_P, hi_P = np.where(finite_P, lo_P, np.inf), np.where(finite_P, hi_P, np.inf)
    for j in np.flatnonzero(~finite_P):
      _, lo_P[j], hi_P[j] = bootstrap_ci(c[:, j], n_boot=n_boot, seed=seed, alpha=alpha)
  return mean_P, lo_P, hi_P


#: A run diverged when its final outer loss is non-finite or this many times its initial one.
EXPLODE_FACTOR = 100.0


def diverged(initial, final, factor: float = EXPLODE_FACTOR) -> np.ndarray:
  """Per-task divergence: the final outer loss is not finite, or exceeds ``factor`` × the initial
  one (an exploding run). A finite run that merely ends above its start is *overfitting* (see
  ``overfit``), not divergence."""
  initial = np.asarray(initial, dtype=np.float64)
  final = np.asarray(final, dtype=np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    return ~np.isfinite(final) | (final > factor * np.abs(initial))


def overfit(initial, final, factor: float = EXPLODE_FACTOR) -> np.ndarray:
  """Per-task overfitting: a run that did not diverge but ends with a final outer loss above its
  initial one (the training loss fell while the outer loss rose past its starting value)."""
  initial = np.asarray(initial, dtype=np.float64)
  final = np.asarray(final, dtype=np.float64)
  with np.errstate(invalid="ignore"):
    return ~diverged(initial, final, factor) & (final > initial)


# --- streams, paired differences, nulls and the hierarchical bootstrap (analyses, seed populations)

def stream_seed(*names) -> int:
  """An independent bootstrap seed per (metric, split, optimizer, ...): a CRC32 of the names.

  Using one seed for every metric makes all intervals share their resamples (their errors are then
  perfectly dependent); hashing the names gives each metric its own stream, deterministically.
  """
  import zlib
  return zlib.crc32("\x1f".join(str(n) for n in names).encode()) & 0x7FFFFFFF


def sign_flip_pvalue(diffs, n_perm: int = 2000, seed: int = 0) -> float:
  """Two-sided p-value of mean(diffs) = 0 by random sign flips of the paired differences
  (exact under the null that each difference is symmetric about 0). NaNs are dropped; the
  p-value counts the observed statistic itself ((1 + #{|null| ≥ |obs|}) / (1 + n_perm))."""
  d = np.asarray(diffs, np.float64).reshape(-1)
  d = d[np.isfinite(d)]
  if d.size == 0:
    return float("nan")
  obs = abs(d.mean())
  rng = np.random.default_rng(seed)
  signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, d.size))
  null = np.abs(signs @ d / d.size)
  return float((1 + np.sum(null >= obs * (1 - 1e-12))) / (1 + n_perm))


def null_pvalue(observed: float, null_samples, two_sided: bool = True,
                centre: float = 0.0) -> float:
  """p-value of ``observed`` against draws of the same statistic under a null (e.g. a permutation
  null): ``(1 + #{null at least as extreme}) / (1 + #draws)``; two-sided about ``centre``."""
  s = np.asarray(null_samples, np.float64).reshape(-1)
  s = s[np.isfinite(s)]
  if s.size == 0 or not np.isfinite(observed):
    return float("nan")
  if two_sided:
    hits = np.sum(np.abs(s - centre) >= abs(observed - centre) * (1 - 1e-12))
  else:
    hits = np.sum(s >= observed)
  return float((1 + hits) / (1 + s.size))


def hierarchical_bootstrap_ci(values, groups, n_boot: int = 1000, seed: int = 0,
                              stat: Callable = np.mean, alpha: float = 0.05):
  """Two-level percentile bootstrap: resample groups (e.g. meta-training seeds) with replacement,
  then units (tasks) with replacement within each drawn group; ``stat`` of the pooled resample.

  ``values`` [N] and ``groups`` [N] (any hashable labels). Non-finite values count as +inf (as in
  ``bootstrap_ci``). With one group this is the ordinary bootstrap over units. Returns
  ``(stat(values), lo, hi)``.
  """
  x = as_loss_array(values)
  g = np.asarray(groups).reshape(-1)
  if x.shape[0] != g.shape[0]:
    raise ValueError(f"values ({x.shape[0]}) and groups ({g.shape[0]}) differ in length")
  if x.size == 0:
    raise ValueError("hierarchical_bootstrap_ci needs at least one value")
  labels = list(dict.fromkeys(g.tolist()))
  members = [np.flatnonzero(g == lab) for lab in labels]
  with np.errstate(invalid="ignore", over="ignore"):
    value = float(stat(x))
    if x.size == 1:
      return value, value, value
    rng = np.random.default_rng(seed)
    stats_b = np.empty(n_boot)
    for b in range(n_boot):
      picked = rng.integers(0, len(members), len(members))
      idx = np.concatenate([m[rng.integers(0, m.size, m.size)] for m in (members[i]
                                                                            for i in picked)])
      stats_b[b] = stat(x[idx])
  lo, hi = _quantiles(stats_b, [alpha / 2, 1 - alpha / 2])
  return value, float(lo), float(hi)


def finite_bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, stat: Callable = np.mean,
                        alpha: float = 0.05):
  """``bootstrap_ci`` of the finite entries only, for analysis metrics (not losses): returns
  ``(value, lo, hi, n)``, or ``None`` when no entry is finite (the caller states why)."""
  x = np.asarray(values, np.float64).reshape(-1)
  x = x[np.isfinite(x)]
  if x.size == 0:
    return None
  v, lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed, stat=stat, alpha=alpha)
  return v, lo, hi, int(x.size)
