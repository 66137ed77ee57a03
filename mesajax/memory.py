"""Memory estimates from a config, before anything compiles or allocates.

Shapes come from ``jax.eval_shape`` of the task family's ``sample`` / ``init`` and the optimizer's
``init_phi`` / ``init`` (tracing only: nothing is allocated or compiled). From them

  task  = bytes of one task (its data),   inner = bytes of one task's parameters + optimizer state

and each stage's peak is estimated as a sum of its largest live buffers (rough, within a small
factor; the point is to refuse sizes that cannot fit, with the estimate, instead of an allocator
abort or minutes of swapping):

  meta step   num_seeds * num_tasks * pairs * (task + (unroll_length + 2) * 4 * inner)
              pairs = 2 for ES/PES
  selection   select_tasks * (task + 4 * inner)
  evaluate    (num_tasks + num_tuning_tasks * lr_grid_size) * (task + 4 * inner) * (#baselines+1)
              + n_boot * num_tasks * 8 (bootstrap index matrix)
  analyses    num_tasks * (task + (num_steps + 1) * 8 * inner
              + num_points * (num_probes * 4 + (n if n <= dense_max else 0)) * n * 4)
              + n_boot * num_tasks * 8   (the dense Jacobian only up to dense_max; above: probes)

``check(config)`` raises a one-line ``ValueError`` when a stage needs more than 80% of the device's
memory (host RAM on CPU) or when one array would exceed 2**31 - 1 elements.
"""
from __future__ import annotations

import math
import os

MAX_ELEMENTS = 2**31 - 1
FRACTION = 0.8


def _bytes(tree) -> tuple[int, int]:
  """(total bytes, largest leaf's element count) of a pytree of ShapeDtypeStructs."""
  import jax
  total, largest = 0, 0
  for x in jax.tree.leaves(tree):
    n = math.prod(x.shape)
    total += n * x.dtype.itemsize
    largest = max(largest, n)
  return total, largest


def shapes(config) -> dict:
  """Bytes per task and per inner state, parameter count and meta-parameter bytes."""
  import jax
  from mesajax.registry import make_optimizer
  from mesajax.splits import make_splits
  opt = make_optimizer(config.optimizer.name, config.optimizer.kwargs.to_dict())
  key = jax.random.PRNGKey(0)
  out = {"task": 0, "inner": 0, "n_params": 0, "largest": 0, "phi": 0}
  try:
    phi = jax.eval_shape(opt.init_phi, key)
    out["phi"], _ = _bytes(phi)
    for split in make_splits(config).values():
      fam = split.family
      task = jax.eval_shape(fam.sample, key)
      params = jax.eval_shape(fam.init, key, task)
      state = jax.eval_shape(opt.init, phi, params)
      t, lt = _bytes(task)
      p, lp = _bytes(params)
      s, ls = _bytes(state)
      n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
      out["task"] = max(out["task"], t)
      out["inner"] = max(out["inner"], p + s)
      out["n_params"] = max(out["n_params"], n)
      out["largest"] = max(out["largest"], lt, lp, ls)
  except (ValueError, TypeError, OverflowError, MemoryError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"the task family / optimizer cannot be shaped at this size: {msg}") from None
  return out


def estimate(config) -> dict:
  """Estimated peak bytes per stage (see the module docstring)."""
  s = shapes(config)
  m, e, a = config.meta, config.eval, config.analysis
  task, inner, n = s["task"], s["inner"], s["n_params"]
  pairs = 2 if m.estimator in ("es", "pes") else 1
  out = {
      "meta-training step": (m.num_seeds * m.num_tasks * pairs
                             * (task + (m.unroll_length + 2) * 4 * inner)),
      "selection": (m.select_tasks * (task + 4 * inner)) if m.select_every else 0,
      "evaluation": ((e.num_tasks + e.num_tuning_tasks * e.lr_grid_size) * (task + 4 * inner)
                     * (len(e.baselines) + 1) + e.n_boot * e.num_tasks * 8),
      "analyses": (a.num_tasks * (task + (a.num_steps + 1) * 8 * inner
                                  + a.num_points * (a.num_probes * 4 + (n if n <= a.dense_max else 0))
                                  * n * 4)
                   + a.n_boot * a.num_tasks * 8),
  }
  out["_shapes"] = s
  return out


def available() -> tuple[int, str]:
  """(bytes, description) of the memory the first device can use."""
  import jax
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats() or {}
  except Exception:
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{dev.platform} device ({dev.device_kind})"
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 2**40
  return int(ram), "host RAM"


def _gib(b: float) -> str:
  return f"{b / 2**30:.3g} GiB" if b >= 2**27 else f"{b / 2**20:.3g} MiB"


def check(config, limit: int | None = None) -> dict:
  """Raises ``ValueError`` (one line) when a stage cannot fit; returns the estimate."""
  est = estimate(config)
  s = est["_shapes"]
  m = config.meta
  biggest_batch = max(m.num_tasks, m.select_tasks if m.select_every else 1, config.eval.num_tasks,
                      config.analysis.num_tasks)
  if s["largest"] * biggest_batch > MAX_ELEMENTS:
    raise ValueError(f"an array of {s['largest']} elements per task x {biggest_batch} tasks "
                     f"exceeds {MAX_ELEMENTS} elements; reduce the task size or the task counts")
  where = "memory"
  if limit is None:
    limit, where = available()
  for stage, b in est.items():
    if stage.startswith("_"):
      continue
    if b > FRACTION * limit:
      raise ValueError(f"the {stage} needs about {_gib(b)} (estimated from shapes: "
                       f"{_gib(s['task'])} per task, {_gib(s['inner'])} of inner state) but the "
                       f"{where} holds {_gib(limit)}; reduce the sizes in the config")
  return est
