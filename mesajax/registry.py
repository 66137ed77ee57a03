"""Registries: task families and optimizers are picked by name from the config.

Adding one is a new file and a line in ``TASKS``, ``OPTIMIZERS`` or ``ESTIMATORS`` below. Modules are imported
lazily so that, for example, the digits family's optional scikit-learn dependency is only needed
when it is asked for.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

# name -> "module:ClassName"
TASKS: dict[str, str] = {
    "quadratic": "mesajax.tasks.quadratic:Quadratic",
    "linreg": "mesajax.tasks.regression:LinearRegression",
    "logreg": "mesajax.tasks.regression:LogisticRegression",
    "mlp": "mesajax.tasks.mlp:TeacherMLP",
    "digits": "mesajax.tasks.digits:Digits",
    "image_mlp": "mesajax.tasks.images:ImageMLP",
    "image_mlp_mixture": "mesajax.tasks.images:ImageMLPMixture",
    "image_cnn": "mesajax.tasks.image_cnn:ImageCNN",
    "charlm": "mesajax.tasks.charlm:CharLM",
}

# Meta-gradient estimators (mesajax/meta/estimators.py).
ESTIMATORS: dict[str, str] = {
    "tbptt": "mesajax.meta.estimators:TBPTT",
    "es": "mesajax.meta.estimators:ES",
    "pes": "mesajax.meta.estimators:PES",
}

OPTIMIZERS: dict[str, str] = {
    "sgd": "mesajax.optimizers.baselines:SGD",
    "sgdm": "mesajax.optimizers.baselines:SGDM",
    "adam": "mesajax.optimizers.baselines:Adam",
    "rmsprop": "mesajax.optimizers.baselines:RMSProp",
    "mlp_lopt": "mesajax.optimizers.mlp_lopt:MLPLOpt",
    "rnn_lopt": "mesajax.optimizers.rnn_lopt:RNNLOpt",
    "noise_update": "mesajax.optimizers.controls:NoiseUpdate",
    "random_field": "mesajax.optimizers.controls:RandomField",
    "precond_sgd": "mesajax.optimizers.controls:PrecondSGD",
    "sgd_schedule": "mesajax.optimizers.schedule:SGDSchedule",
}

# Mesa-objective analyses: name -> "module:function", each ``(SplitContext) -> list[row]``
# (``mesajax.analysis.context``); run in this order by ``mesajax.analysis.suite``.
ANALYSES: dict[str, str] = {
    "nci": "mesajax.analysis.stages:nci_stage",
    "dense_metric": "mesajax.analysis.stages:dense_metric_stage",
    "quasi_static": "mesajax.analysis.stages:quasi_static_stage",
    "objective_fit": "mesajax.analysis.stages:objective_fit_stage",
    "endpoint_fit": "mesajax.analysis.stages:endpoint_fit_stage",
    "alignment": "mesajax.analysis.stages:alignment_stage",
    "probes": "mesajax.analysis.stages:probes_stage",
}


def _load(table: Mapping[str, str], kind: str, name: str):
  """The class registered as ``name``; a name of the form ``"package.module:Class"`` is imported
  directly (a family or optimizer living in the user's own package, no registry line needed)."""
  if name in table:
    target = table[name]
  elif isinstance(name, str) and ":" in name:
    target = name
  else:
    raise ValueError(f"unknown {kind} {name!r}; known: {sorted(table)} (or 'package.module:Class')")
  module, _, cls = target.partition(":")
  try:
    return getattr(importlib.import_module(module), cls)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"cannot import {kind} {target!r}: {type(e).__name__}: {e}") from None


def task_class(name: str):
  """The task-family class registered as ``name`` (for its declarations: ``test_kwargs``, ...)."""
  return _load(TASKS, "task family", name)


def optimizer_class(name: str):
  """The optimizer class registered as ``name`` (``learned``, ``tunable_lr``, ``test_kwargs``)."""
  return _load(OPTIMIZERS, "optimizer", name)


def estimator_class(name: str):
  """The meta-gradient estimator class registered as ``name``."""
  return _load(ESTIMATORS, "estimator", name)


def _build(table, kind, name, kwargs):
  cls = _load(table, kind, name)
  kwargs = dict(kwargs or {})
  import dataclasses
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"{kind} {name!r} has no option(s) {unknown}; options: {sorted(known)}")
  # Configs and JSON turn tuples into lists; options must stay hashable (static under jit).
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  obj = cls(**kwargs)
  if hasattr(obj, "check_finite"):
    obj.check_finite()
  obj.validate()
  return obj


def make_task_family(name: str, kwargs: Mapping[str, Any] | None = None):
  """Builds and validates a task family by name, e.g. ``make_task_family('quadratic', {'dim': 10})``."""
  return _build(TASKS, "task family", name, kwargs)


def make_optimizer(name: str, kwargs: Mapping[str, Any] | None = None):
  """Builds and validates an optimizer by name, e.g. ``make_optimizer('adam', {'learning_rate': 1e-2})``."""
  return _build(OPTIMIZERS, "optimizer", name, kwargs)


def _defaults(table, kind, name, overrides):
  import dataclasses
  cls = _load(table, kind, name)
  fields = {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"{kind} {name!r} has no option(s) {unknown}; options: {sorted(fields)}")
  fields.update(overrides)
  return fields


def task_kwargs(name: str, **overrides) -> dict:
  """Every knob of a task family with its default (and ``overrides``): for configs, so that any
  knob can be set from the command line with ``--config.task.kwargs.KNOB=value``."""
  return _defaults(TASKS, "task family", name, overrides)


def optimizer_kwargs(name: str, **overrides) -> dict:
  """Every option of an optimizer with its default (and ``overrides``), for configs."""
  return _defaults(OPTIMIZERS, "optimizer", name, overrides)
