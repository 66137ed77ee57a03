"""Named evaluation splits: the held-out split of the training family and the shift suite.

A *split* is a task family plus an inner horizon. ``heldout`` is the meta-training family itself with
tasks drawn from a key stream that meta-training never uses; every shift is the training family with
some knobs changed (``config.shifts.NAME.task``) and/or its horizon multiplied
(``config.shifts.NAME.horizon_mult``), so a shifted family is a config change, not new code.

Key streams are separated by purpose (``meta_train``, ``select`` (meta-parameter selection),
``tune``, ``heldout``, ``analysis``) and by
split name, so held-out tasks are never the tasks meta-training or learning-rate tuning saw.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax

from mesajax.registry import make_task_family
from mesajax.tasks import views

PURPOSES = ("meta_train", "select", "tune", "heldout", "analysis")


@dataclasses.dataclass(frozen=True)
class Split:
  name: str
  family: Any  # TaskFamily
  horizon: int


def purpose_key(seed: int, purpose: str, split: str = "heldout") -> jax.Array:
  """A raw PRNG key for (seed, purpose, split); distinct purposes give independent streams."""
  if purpose not in PURPOSES:
    raise ValueError(f"unknown key purpose {purpose!r}; known: {PURPOSES}")
  key = jax.random.PRNGKey(seed)
  key = jax.random.fold_in(key, zlib.crc32(purpose.encode()) & 0x7FFFFFFF)
  return jax.random.fold_in(key, zlib.crc32(split.encode()) & 0x7FFFFFFF)


def _as_dict(x) -> dict:
  if x is None:
    return {}
  return dict(x.to_dict() if hasattr(x, "to_dict") else x)


def training_family(config):
  return make_task_family(config.task.name, _as_dict(config.task.kwargs))


def make_splits(config, names=None) -> dict[str, Split]:
  """``{"heldout": Split, **shifts}`` from a config; ``names`` restricts to some splits."""
  base = training_family(config)
  horizon = int(config.meta.horizon)
  splits = {"heldout": Split("heldout", base, horizon)}
  shifts = _as_dict(config.get("shifts", None))
  for name, spec in shifts.items():
    spec = _as_dict(spec)
    unknown = sorted(set(spec) - {"task", "horizon_mult"})
    if unknown:
      raise ValueError(f"shift {name!r} has unknown field(s) {unknown}; use 'task' and 'horizon_mult'")
    mult = spec.get("horizon_mult", 1)
    if not (isinstance(mult, int) and mult >= 1):
      raise ValueError(f"shift {name!r}: horizon_mult must be an integer >= 1, got {mult!r}")
    try:
      family = base.replace(**_as_dict(spec.get("task")))
    except ValueError as e:
      raise ValueError(f"shift {name!r}: {e}") from None
    splits[name] = Split(name, family, horizon * mult)
  if names is not None:
    missing = sorted(set(names) - set(splits))
    if missing:
      raise ValueError(f"unknown split(s) {missing}; known: {sorted(splits)}")
    splits = {k: v for k, v in splits.items() if k in names}
  return splits


def purpose_keys(seed: int, purpose: str, split_name: str, num_tasks: int):
  """``(task_keys, run_keys)``, ``[num_tasks, 2]`` each, of one purpose's stream on one split.

  Sampling at ``task_keys`` gives ``family.sample_batch(k_tasks, num_tasks)`` with
  ``k_tasks, k_runs = split(purpose_key(seed, purpose, split_name))``; ``run_keys`` seed each task's
  initialisation and minibatches (``rollout.run_curve``).
  """
  k_tasks, k_runs = jax.random.split(purpose_key(seed, purpose, split_name))
  return jax.random.split(k_tasks, num_tasks), jax.random.split(k_runs, num_tasks)


def purpose_tasks(family, seed: int, purpose: str, split_name: str, num_tasks: int):
  """``(prepared, run_keys)``: ``num_tasks`` tasks of ``family`` from one purpose's key stream,
  prepared for ``views.PresetInit(family)`` (``prepared["task"]`` holds the family's task pytrees)."""
  task_keys, run_keys = purpose_keys(seed, purpose, split_name, num_tasks)
  return views.prepare_tasks(family, task_keys, run_keys), run_keys
