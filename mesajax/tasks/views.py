"""Views of a task family that change how it is run, not what it is.

* :class:`FullBatch`: ``train_loss`` is the deterministic ``train_loss_full`` (noise-free inner runs
  for the analyses).
* :class:`PresetInit` with :func:`prepare_tasks`: each task carries its initial point, drawn once,
  so compiled evaluation / tuning / selection programs hold no random initialisation.

Both are task-layer helpers: they know nothing of optimizers, meta-training or analyses.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from mesajax.tasks.base import TaskFamily


class FullBatch:
  """A task-family view whose ``train_loss`` is the deterministic ``train_loss_full``.

  Passing ``FullBatch(family)`` to ``mesajax.rollout.run_trajectory`` / ``run_curve`` gives
  full-batch (noise-free) inner runs; every other attribute is the wrapped family's.
  """

  def __init__(self, family):
    self.family = family

  def train_loss(self, params, task, key):
    del key
    return self.family.train_loss_full(params, task)

  def __getattr__(self, name):
    return getattr(self.family, name)

  def __hash__(self):
    return hash(("FullBatch", self.family))

  def __eq__(self, other):
    return isinstance(other, FullBatch) and other.family == self.family


@dataclasses.dataclass(frozen=True)
class PresetInit(TaskFamily):
  """``base`` with each task's initial point precomputed: tasks are ``{"task", "params0"}``.

  ``prepare_tasks`` draws ``params0 = base.init(k_init, task)`` with the key ``run_curve`` would use
  (``k_init, _ = split(run_key)``), once per split, so an evaluation or tuning run of
  ``run_curve(opt, phi, PresetInit(base), prepared, run_key, ...)`` is the same computation as
  ``run_curve(opt, phi, base, task, run_key, ...)`` while the per-optimizer compiled programs hold no
  random initialisation (on CPU, compiling vmapped random-number generation dominated them: ~4x).
  """

  base: Any = None
  name = "preset_init"

  def init(self, key, task):
    return task["params0"]

  def train_loss(self, params, task, key):
    return self.base.train_loss(params, task["task"], key)

  def outer_loss(self, params, task, key):
    return self.base.outer_loss(params, task["task"], key)

  def train_loss_full(self, params, task):
    return self.base.train_loss_full(params, task["task"])

  def outer_loss_full(self, params, task):
    return self.base.outer_loss_full(params, task["task"])


@functools.partial(jax.jit, static_argnames=("family",))
def prepare_tasks(family, task_keys, run_keys):
  """``{"task": family.sample per task key, "params0": initial points}`` in one compiled call
  (``PresetInit``). A ``lax.map`` over tasks, not ``vmap``: the same values, and on CPU it compiles
  about twice as fast (vmapped random-number generation is slow to compile); it runs once per split.
  """
  def one(keys):
    task_key, run_key = keys
    task = family.sample(task_key)
    return {"task": task, "params0": family.init(jax.random.split(run_key)[0], task)}
  return jax.lax.map(one, (task_keys, run_keys))
