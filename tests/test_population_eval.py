"""Population evaluation: the hierarchical (seeds, then tasks) bootstrap and per-member rows."""
import numpy as np

from mesajax.eval.population import hierarchical_ci


def test_hierarchical_ci_wider_than_tasks_only_when_seeds_differ():
  """With a seed effect the two-level interval covers the between-seed spread, which a bootstrap
  over the pooled tasks alone ignores."""
  rng = np.random.default_rng(0)
  seed_effect = np.array([0.0, 1.0, 2.0, 3.0])[:, None]
  x = seed_effect + 0.1 * rng.standard_normal((4, 50))
  v, lo, hi = hierarchical_ci(x, 2000, 0)
  assert abs(v - x.mean()) < 1e-12 and lo < v < hi
  assert hi - lo > 1.5  # ≈ 2 × 1.96 × sd(seed means)/√4 = 2.2 up to the percentile bootstrap's bias
  from mesajax.eval.stats import bootstrap_ci
  _, lo_t, hi_t = bootstrap_ci(x.ravel(), n_boot=2000, seed=0)
  assert hi_t - lo_t < 0.7 * (hi - lo)
  # No seed effect: about the tasks-only width.
  y = 0.1 * rng.standard_normal((4, 50))
  _, lo, hi = hierarchical_ci(y, 2000, 0)
  _, lo_t, hi_t = bootstrap_ci(y.ravel(), n_boot=2000, seed=0)
  assert 0.7 < (hi - lo) / (hi_t - lo_t) < 2.0


def test_hierarchical_ci_non_finite_is_a_failure():
  x = np.ones((3, 10))
  x[1, 2] = np.nan
  v, lo, hi = hierarchical_ci(x, 500, 0)
  assert v == np.inf and hi == np.inf
