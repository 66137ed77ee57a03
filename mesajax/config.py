"""Config resolution and validation: every user mistake becomes a one-line ``ValueError`` before
anything compiles.

``resolve(config)`` checks every field's range, builds the task family, the optimizer and the splits once (so unknown names and knobs fail
here), and returns the resolved config, locked against new keys.
"""
from __future__ import annotations

import ml_collections

from mesajax.registry import ESTIMATORS
from mesajax.meta.truncation import OBJECTIVES, TRANSFORMS
from mesajax.registry import make_optimizer
from mesajax.splits import make_splits

SMOKE = {
    "meta.num_tasks": 4, "meta.horizon": 20, "meta.unroll_length": 5, "meta.num_outer_steps": 6,
    "meta.log_every": 2, "meta.checkpoint_every": 3, "meta.select_every": 3,
    "meta.select_tasks": 4,
    "eval.num_tasks": 8, "eval.num_tuning_tasks": 4, "eval.lr_grid_size": 4, "eval.n_boot": 50,
    "analysis.num_tasks": 3, "analysis.num_steps": 10, "analysis.num_points": 2,
    "analysis.num_probes": 8, "analysis.n_boot": 50,
}

def get_config_with_arg(make, arg):
  """Config-file helper: ``get_config(arg)`` with ``arg`` in (None, "", "smoke").

  ``configs/NAME.py:smoke`` (big_vision's ``runlocal`` idea) shrinks every size for a CPU smoke
  run in seconds; ``--config.key=value`` overrides still apply on top.
  """
  config = make()
  if arg in (None, ""):
    return config
  if arg != "smoke":
    raise ValueError(f"unknown config argument {arg!r}; the only one is 'smoke'")
  for dotted, value in SMOKE.items():
    _set(config, dotted, value)
  # One shift keeps the shift path exercised; each further split only adds compile time.
  shifts = config.shifts.to_dict()
  config.shifts = ml_collections.ConfigDict(dict(list(shifts.items())[:1]))
  return config


# Fields that may change when a run resumes (they do not change what has been computed).
RESUMABLE = ("meta.num_outer_steps", "meta.log_every", "meta.checkpoint_every")
# Note: select_every is not resumable: changing it changes which phi is kept.


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _set(config, dotted, value):
  *path, last = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def _int(config, dotted, low=1, high=None):
  v = _get(config, dotted)
  if isinstance(v, bool) or not isinstance(v, int):
    raise ValueError(f"config.{dotted} must be an integer, got {v!r}")
  if v < low or (high is not None and v > high):
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"config.{dotted} must be {bounds}, got {v}")
  return v


def _float(config, dotted, low=None, high=None, low_open=False):
  v = _get(config, dotted)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError(f"config.{dotted} must be a number, got {v!r}")
  bad = (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high)
  if bad:
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else f"<= {high}"
    raise ValueError(f"config.{dotted} must be {' and '.join(x for x in (lo, hi) if x)}, got {v}")
  return float(v)


def _choice(config, dotted, choices):
  v = _get(config, dotted)
  if v not in choices:
    raise ValueError(f"config.{dotted} must be one of {list(choices)}, got {v!r}")
  return v


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates every field and returns a locked copy."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not isinstance(config.get("name"), str) or not config.name:
    raise ValueError("config.name must be a non-empty string (the learned optimizer's row name)")
  if config.name in ("sgd", "sgdm", "adam", "rmsprop"):
    raise ValueError(f"config.name {config.name!r} clashes with a baseline's row name")
  _int(config, "seed", low=0)
  _int(config, "meta.num_tasks")
  horizon = _int(config, "meta.horizon")
  k = _int(config, "meta.unroll_length")
  if horizon % k:
    raise ValueError(f"config.meta.horizon ({horizon}) must be a multiple of "
                     f"config.meta.unroll_length ({k})")
  _choice(config, "meta.estimator", ESTIMATORS)
  _float(config, "meta.sigma", low=0.0, low_open=True)
  _choice(config, "meta.outer_objective", OBJECTIVES)
  _choice(config, "meta.loss_transform", TRANSFORMS)
  _float(config, "meta.outer_lr", low=0.0, low_open=True)
  _float(config, "meta.outer_clip", low=0.0)
  _int(config, "meta.num_outer_steps", low=0)
  devices = _int(config, "meta.num_devices")
  if config.meta.num_tasks % devices:
    raise ValueError(f"config.meta.num_tasks ({config.meta.num_tasks}) must be divisible by "
                     f"config.meta.num_devices ({devices})")
  _int(config, "meta.select_every", low=0)
  _int(config, "meta.select_tasks", low=1)
  _int(config, "meta.log_every")
  _int(config, "meta.checkpoint_every")
  _int(config, "eval.num_tasks", low=2)
  _int(config, "eval.num_tuning_tasks")
  lo = _float(config, "eval.lr_grid_min", low=0.0, low_open=True)
  hi = _float(config, "eval.lr_grid_max", low=0.0, low_open=True)
  if hi <= lo:
    raise ValueError(f"config.eval.lr_grid_max ({hi}) must exceed config.eval.lr_grid_min ({lo})")
  _int(config, "eval.lr_grid_size", low=2)
  _int(config, "eval.curve_every")
  _int(config, "eval.n_boot", low=10)
  for name in config.eval.baselines:
    make_optimizer(name)
  _int(config, "analysis.num_tasks", low=2)
  _int(config, "analysis.num_steps", low=2)
  _int(config, "analysis.num_points")
  _int(config, "analysis.num_probes", low=2)
  _int(config, "analysis.n_boot", low=10)
  make_optimizer(config.optimizer.name, config.optimizer.kwargs.to_dict())
  # Builds the family and every shift: unknown names and knobs fail here.
  for name, split in make_splits(config).items():
    if split.horizon % config.eval.curve_every:
      raise ValueError(f"config.eval.curve_every ({config.eval.curve_every}) must divide the "
                       f"horizon of split {name!r} ({split.horizon})")
  config.lock()
  return config


def identity(config) -> dict:
  """The part of a resolved config that defines a run (compared on resume)."""
  d = config.to_dict()
  for dotted in RESUMABLE:
    *path, last = dotted.split(".")
    node = d
    for part in path:
      node = node[part]
    node.pop(last, None)
  return d
