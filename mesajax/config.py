"""Configs: the base config, loading ``configs/NAME.py[:arg]`` with ``KEY=VALUE`` overrides, and
validation that turns every user mistake into a one-line ``ValueError`` before anything compiles.

* ``base_config()``: every knob with its default (each field commented). Every ``configs/*.py``
  starts from it and changes only what it needs; ``task.kwargs`` / ``optimizer.kwargs`` list only
  the knobs a config changes (``resolve`` fills in the family's / optimizer's defaults).
* ``load(spec, overrides)``: ``spec`` is ``"path/to/config.py[:arg]"``, ``overrides`` are
  ``["meta.num_tasks=8", "task.name=quadratic", ...]``. Values are parsed with ``ast.literal_eval``
  (falling back to a string); ``None``, ``nan``, ``inf``, ``true``/``false`` are understood (and then
  validated). ``task.name`` / ``optimizer.name`` are applied first: a new name brings that entry's
  own defaults (the file's kwargs are kept only when the name is unchanged) and, for a new task
  family, its ``default_shifts`` replace the shifts that set knobs of the old family (horizon-only
  shifts are kept). Every ``task.kwargs.K`` / ``optimizer.kwargs.K`` is checked against the
  entry's knobs.
* ``resolve(config)``: one validator per section (top level, task, optimizer, meta, eval,
  analysis, shifts), all finite and in range, plus a memory estimate of the compiled step and the
  analyses from shapes (``mesajax.memory``, ``jax.eval_shape`` only). Returns a locked ConfigDict
  holding every default, which is what ``config.json`` records.

Layering: this module does not import ``mesajax.meta`` / ``eval`` / ``analysis``; the estimator,
objective and transform names are data here (a test checks they match those modules).
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import math
import os
from typing import Any, Iterable

import ml_collections

from mesajax import registry

# Names the meta-training code accepts: estimators from the registry; objectives and transforms
# kept equal to mesajax.meta.truncation.OBJECTIVES / TRANSFORMS (tests/test_faults.py checks it).
ESTIMATORS = tuple(registry.ESTIMATORS)
OBJECTIVES = ("mean_train", "mean_outer", "final_outer")
TRANSFORMS = ("clip", "log", "none")

# Kinds of run: meta-training an update rule, or training an in-context learner (mesajax.icl).
KINDS = ("meta", "icl")

# Fields that may change when a run resumes (they do not change what has been computed).
# Note: select_every is not resumable: changing it changes which phi is kept.
RESUMABLE = ("meta.num_outer_steps", "meta.log_every", "meta.checkpoint_every", "meta.tensorboard",
             "distributed")
INNER_DTYPES = ("float32", "bfloat16")

# Sizes beyond these are refused outright (the memory estimate catches most before).
MAX_COUNT = 10**7      # tasks, steps, probes, grid sizes
MAX_BOOT = 10**6       # bootstrap resamples


def base_config() -> ml_collections.ConfigDict:
  """Every knob with its default; ``configs/*.py`` start from this and change what they need."""
  c = ml_collections.ConfigDict()
  c.name = "quickstart"        # the learned optimizer's name in result rows (not a baseline's)
  c.seed = 0                   # every random stream derives from it (mesajax.splits)

  # Task family by registry name (mesajax.registry.TASKS); kwargs: only the knobs that differ
  # from the family's defaults (resolve fills in the rest).
  c.task = ml_collections.ConfigDict()
  c.task.name = "linreg"
  c.task.kwargs = ml_collections.ConfigDict()

  # Optimizer to meta-train by registry name (mesajax.registry.OPTIMIZERS) with its options.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "mlp_lopt"
  c.optimizer.kwargs = ml_collections.ConfigDict()

  # Meta-training (mesajax/meta/).
  c.meta = ml_collections.ConfigDict()
  c.meta.num_tasks = 32          # task batch (sharded over devices)
  c.meta.num_seeds = 1           # meta-training seeds as ONE compiled population (seeds seed..seed+S-1)
  c.meta.horizon = 200           # inner horizon T of every task
  c.meta.unroll_length = 20      # truncation length K (T % K == 0)
  c.meta.estimator = "tbptt"     # tbptt | es | pes
  c.meta.sigma = 0.01            # ES/PES perturbation std, in (0, 10]
  c.meta.outer_objective = "mean_outer"  # mean_train | mean_outer | final_outer
  c.meta.loss_transform = "clip"  # clip (normalise by the initial loss, clip at 1) | log | none
  c.meta.outer_lr = 3e-3         # outer Adam learning rate, in (0, 10]
  c.meta.outer_clip = 1.0        # global-norm clip of the meta-gradient (0: off), in [0, 1e6]
  c.meta.num_outer_steps = 2000  # outer steps in total (a resume may raise it)
  c.meta.num_devices = 1         # task-batch axis sharded over this many devices (0: all, of every process)
  c.meta.select_every = 100      # score phi on full-horizon validation runs; keep the best (0: off)
  c.meta.select_tasks = 64       # validation tasks for that selection (own key stream)
  c.meta.log_every = 20          # a metrics.jsonl row every this many outer steps
  c.meta.checkpoint_every = 250  # a checkpoint every this many outer steps (and at the end)
  c.meta.inner_dtype = "float32"  # float32 | bfloat16: dtype of the inner losses' forward/backward
  c.meta.tensorboard = False     # also write the metrics rows as TensorBoard events (tensorboardX)

  # Multi-process runs (mesajax/distributed.py, docs/distributed.md); not part of a run's identity.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "off"     # off | auto (SLURM / TPU pod / Open MPI detection) | explicit
  c.distributed.coordinator_address = None  # explicit: "HOST:PORT" of process 0
  c.distributed.num_processes = None        # explicit: number of processes
  c.distributed.process_id = None           # explicit: this process's index
  c.distributed.local_device_ids = None     # devices this process uses (None: all local ones)
  c.distributed.cluster_detection_method = None  # auto: one of jax's detectors (None: try all)
  c.distributed.initialization_timeout = 300     # seconds to wait for every process

  # Held-out evaluation (mesajax/eval/).
  c.eval = ml_collections.ConfigDict()
  c.eval.num_tasks = 64          # held-out tasks (>= 2)
  c.eval.num_tuning_tasks = 32   # separate tasks for the baselines' learning-rate grid search
  c.eval.baselines = ("sgd", "sgdm", "adam")  # hand-designed optimizers, tuned per split
  c.eval.lr_grid_min = 1e-5      # log-spaced learning-rate grid, 0 < min < max <= 1e6
  c.eval.lr_grid_max = 3.0
  c.eval.lr_grid_size = 16       # grid points (>= 2)
  c.eval.curve_every = 5         # curve resolution; divides every split's horizon
  c.eval.n_boot = 1000           # bootstrap resamples for CIs, in [10, 1e6]

  # Mesa-objective analyses (mesajax/analysis/).
  c.analysis = ml_collections.ConfigDict()
  c.analysis.num_tasks = 32      # tasks per split (>= 2; the CI needs >= 32 for validity)
  c.analysis.num_steps = 100     # trajectory length for objective fit / alignment / probes (>= 4)
  c.analysis.num_points = 4      # points per trajectory for the Jacobian analyses, in [1, num_steps]
  c.analysis.num_probes = 64     # Gaussian probe pairs per point (NCI estimators, >= 2)
  c.analysis.n_boot = 1000       # bootstrap resamples, in [10, 1e6]
  c.analysis.endpoint_steps = None  # endpoint-fit run length (None: the split's horizon; >= 1)
  c.analysis.dense_max = 2048    # largest n for the exact dense-Jacobian NCIs (>= 0; above: probes)
  c.analysis.qs_max_state = 1024  # largest float-state size for the quasi-static reduction (>= 0)
  c.analysis.num_sens_probes = 8  # Rademacher rows for the update's sensitivity to g (>= 1)
  c.analysis.num_fit_probes = 8  # Gaussian probes of the block metric fit above dense_max (>= 1)
  c.analysis.qs_matfree = True   # above qs_max_state: Krylov quasi-static reduction (else skipped)
  c.analysis.krylov_dim = 20     # Arnoldi/GMRES subspace size of that reduction, in [2, 1000]
  c.analysis.point_batch_mb = 256  # probe products above this (MiB): points one at a time (>= 1)
  c.analysis.fit_iters = 10      # ALS iterations of the objective fit (>= 1)
  c.analysis.fit_polish_steps = 30  # then Levenberg-Marquardt steps to its optimum (>= 0)
  c.analysis.fit_max_coords = 2048  # above this n the fit uses a random subset of coordinates
  c.analysis.num_eigs = 4        # quasi-static eigenvalues reported (>= 1)
  c.analysis.probe_max_rows = 50000  # rows used to fit the hidden-state probes (>= 1)
  c.analysis.qs_fit_steps = 25   # trajectory steps per task at which u-bar is solved (>= 1)
  c.analysis.qs_fit_max_state = 256  # largest float-state size for that fit (>= 0)
  c.analysis.spd_max = 32        # largest n for the dense SPD metric test (cost O(n^5); >= 0)
  c.analysis.spd_on_qs = False   # also run the dense SPD metric test on the effective update
  c.analysis.spd_null_tol = 1e-4  # NCI_M below which a metric M counts as symmetrising, in (0, 1)
  c.analysis.nci_floor = 1e-6    # float64 numerical floor of an exactly symmetric J, in (0, 1)
  c.analysis.heldout_frac = 0.25  # share of the last steps held out of the objective fit, in (0, 1)
  c.analysis.vif_max = 100.0     # largest variance inflation factor of an identifiable term (> 1)
  c.analysis.vif_profiled_max = 1e4  # the same with the fit's metric and step scales free (> 1)
  c.analysis.num_perms = 20      # permutation-null draws (0 disables the permutation null)
  c.analysis.null_stop_early = True  # the fits' draws stop once the gain's test is decided
  c.analysis.alpha = 0.05        # level of every null test, in (0, 1)
  c.analysis.stationary_tol = 1e-3  # endpoint gate: |u_end| / max_t |u_t| at most this (> 0)
  c.analysis.tie_rtol = 1e-6     # relative tolerance of loss ties in frac_outer_descent (>= 0)
  c.analysis.unit_eig_tol = 1e-6  # |eigenvalue| within this of 1: a conserved state component
  c.analysis.controls = ("noise_update", "random_field")  # no-objective controls (optimizer names)
  c.analysis.control_splits = ("heldout",)  # splits the controls are analysed on

  # Shift suite: each entry is a named split (task knob overrides and/or a horizon multiplier).
  c.shifts = ml_collections.ConfigDict()
  return c


# --- config files and overrides ----------------------------------------------------------------

def get_config_with_arg(make, arg, smoke_shift: str | None = None):
  """Config-file helper: ``get_config(arg)`` with ``arg`` in (None, "", "smoke").

  ``configs/NAME.py:smoke`` (big_vision's ``runlocal`` idea) shrinks every size for a CPU smoke
  run in seconds; ``--config.key=value`` overrides still apply on top. One shift is kept:
  ``smoke_shift`` when given, else the first declared one (``_declared_shifts``) whose knobs
  the family has.
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
  order = list(shifts)
  if smoke_shift is not None:
    if smoke_shift not in shifts:
      raise ValueError(f"smoke shift {smoke_shift!r} is not a shift of this config; "
                       f"shifts: {list(shifts)}")
    keep = smoke_shift
  else:
    knobs = set(registry.task_kwargs(config.task.name))
    ok = [n for n in order if set((shifts[n] or {}).get("task", {}) or {}) <= knobs]
    keep = ok[0] if ok else None
  config.shifts = ml_collections.ConfigDict({keep: shifts[keep]} if keep else {})
  return config


SMOKE = {
    "meta.num_tasks": 4, "meta.horizon": 20, "meta.unroll_length": 5, "meta.num_outer_steps": 6,
    "meta.log_every": 2, "meta.checkpoint_every": 3, "meta.select_every": 3,
    "meta.select_tasks": 4,
    "eval.num_tasks": 8, "eval.num_tuning_tasks": 4, "eval.lr_grid_size": 4, "eval.n_boot": 50,
    "analysis.num_tasks": 3, "analysis.num_steps": 10, "analysis.num_points": 2,
    "analysis.num_probes": 8, "analysis.n_boot": 50,
    # The smoke run exercises every null's code path once, not its statistics.
    "analysis.num_perms": 2, "analysis.controls": ("noise_update",), "analysis.spd_max": 8,
    "analysis.fit_iters": 5, "analysis.fit_polish_steps": 5,
}

_SPECIAL = {"nan": math.nan, "+nan": math.nan, "-nan": math.nan, "inf": math.inf,
            "+inf": math.inf, "infinity": math.inf, "+infinity": math.inf, "-inf": -math.inf,
            "-infinity": -math.inf, "none": None, "null": None, "true": True, "false": False}


def parse_value(text: str) -> Any:
  """A command-line value: a Python literal, ``None``/``nan``/``inf``/``true``, else the string."""
  t = text.strip()
  if t.lower() in _SPECIAL:
    return _SPECIAL[t.lower()]
  try:
    return ast.literal_eval(t)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Runs ``get_config([arg])`` of ``path.py[:arg]``; every failure is a one-line ``ValueError``."""
  path, _, arg = spec.partition(":")
  if not path:
    raise ValueError("--config needs a path to a configs/NAME.py file")
  if not os.path.exists(path):
    raise ValueError(f"config file {path} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} is not a file")
  if not os.access(path, os.R_OK):
    raise ValueError(f"config file {path} is not readable (permission denied)")
  if not path.endswith(".py"):
    raise ValueError(f"config file {path} must be a .py file with get_config()")
  try:
    mspec = importlib.util.spec_from_file_location("_mesajax_config", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
  except Exception as e:
    raise ValueError(f"cannot load config {path}: {_one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} defines no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise ValueError(f"config {spec}: {_one_line(e, with_type=False)}") from None
  except Exception as e:
    raise ValueError(f"config {spec}: get_config raised {_one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"config {spec}: get_config() must return an ml_collections.ConfigDict, "
                     f"got {type(config).__name__}")
  return config


def _one_line(e: BaseException, with_type=True) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {msg}" if with_type else msg


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """``configs/NAME.py[:arg]`` with ``KEY=VALUE`` overrides (``"meta.num_tasks=8"``; a leading
  ``--config.`` is accepted). Unvalidated: pass the result to ``resolve``."""
  config = load_file(spec)
  parsed = []
  for item in overrides:
    item = item[len("--config."):] if item.startswith("--config.") else item
    key, eq, text = item.partition("=")
    if not eq or not key:
      raise ValueError(f"config override {item!r} must look like KEY=VALUE")
    parsed.append((key, parse_value(text)))
  if kind(config) != "meta":  # another kind of run: its own keys, its own validator
    d = config.to_dict()
    for key, value in parsed:
      _apply_existing(d, key, value)
    return ml_collections.ConfigDict(d)
  d = _fill(config.to_dict(), base_config().to_dict())
  # Names first: a new name brings that entry's own defaults.
  for section, defaults in (("task", registry.task_kwargs), ("optimizer", registry.optimizer_kwargs)):
    for key, value in parsed:
      if key == f"{section}.name":
        if not isinstance(value, str):
          raise ValueError(f"config.{key} must be a name, got {value!r}")
        defaults(value)  # unknown names fail here
        if value != d[section]["name"]:
          old = d[section]["name"]
          d[section]["name"] = value
          d[section]["kwargs"] = {}
          if section == "task":
            d["shifts"] = _switch_shifts(d.get("shifts") or {}, old, value)
  for key, value in parsed:
    if key in ("task.name", "optimizer.name"):
      continue
    _apply(d, key, value)
  return ml_collections.ConfigDict(d)


def _switch_shifts(shifts: dict, old: str, new: str) -> dict:
  """Horizon-only shifts stay; shifts setting knobs of the old family give way to the new
  family's ``default_shifts``."""
  kept = {k: v for k, v in shifts.items() if not (v or {}).get("task")}
  cls = registry._load(registry.TASKS, "task family", new)
  for k, v in copy.deepcopy(getattr(cls, "default_shifts", {}) or {}).items():
    kept.setdefault(k, v)
  return kept


def kind(config) -> str:
  """``"meta"`` (meta-training an update rule: this module's schema) or ``"icl"`` (an in-context
  learner: ``mesajax.icl.config``), from the config's ``kind`` key (absent: ``"meta"``)."""
  k = config.get("kind", "meta") if hasattr(config, "get") else "meta"
  if k not in KINDS:
    raise ValueError(f"config.kind must be one of {list(KINDS)}, got {k!r}")
  return k


def _apply_existing(d: dict, key: str, value) -> None:
  """An override of a key the config already has (kinds without a base schema)."""
  *path, last = key.split(".")
  node = d
  for part in path:
    if not isinstance(node, dict) or part not in node:
      raise ValueError(f"unknown config key {key!r}")
    node = node[part]
  if not isinstance(node, dict) or last not in node:
    raise ValueError(f"unknown config key {key!r}")
  node[last] = value


def _apply(d: dict, key: str, value) -> None:
  parts = key.split(".")
  if any(not p for p in parts):
    raise ValueError(f"config override key {key!r} is malformed")
  if parts[0] in ("task", "optimizer") and len(parts) >= 2 and parts[1] == "kwargs":
    section = parts[0]
    name = d[section]["name"]
    if len(parts) == 2:
      if not isinstance(value, dict):
        raise ValueError(f"config.{key} must be a dict of knobs, got {value!r}")
      known = (registry.task_kwargs if section == "task" else registry.optimizer_kwargs)(name)
      unknown = sorted(set(value) - set(known))
      if unknown:
        raise ValueError(f"unknown config key '{section}.kwargs.{unknown[0]}' "
                         f"({section} {name!r} has knobs {sorted(known)})")
      d[section]["kwargs"] = dict(value)
      return
    if len(parts) != 3:
      raise ValueError(f"unknown config key {key!r}")
    known = (registry.task_kwargs if section == "task" else registry.optimizer_kwargs)(name)
    if parts[2] not in known:
      raise ValueError(f"unknown config key {key!r} ({section} {name!r} has knobs {sorted(known)})")
    d[section]["kwargs"] = dict(d[section].get("kwargs") or {})
    d[section]["kwargs"][parts[2]] = value
    return
  if parts[0] == "shifts" and len(parts) >= 2:
    shifts = d.setdefault("shifts", {})
    if len(parts) == 2:  # a whole (new or replaced) shift
      if value is not None and not isinstance(value, dict):
        raise ValueError(f"config.{key} must be a dict like {{'task': {{...}}, 'horizon_mult': 2}}")
      if value is None:
        shifts.pop(parts[1], None)
      else:
        shifts[parts[1]] = value
      return
    if parts[1] not in shifts:
      raise ValueError(f"unknown config key {key!r} (shifts: {sorted(shifts)})")
    node = shifts[parts[1]]
    for p in parts[2:-1]:
      node = node.setdefault(p, {}) if p == "task" else node.get(p)
      if not isinstance(node, dict):
        raise ValueError(f"unknown config key {key!r}")
    if len(parts) > 4 or (len(parts) == 4 and parts[2] != "task") or (
        len(parts) == 3 and parts[2] not in ("task", "horizon_mult")):
      raise ValueError(f"unknown config key {key!r}; a shift has 'task' and 'horizon_mult'")
    node[parts[-1]] = value
    return
  node = d
  for p in parts[:-1]:
    if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
      raise ValueError(f"unknown config key {key!r}")
    node = node[p]
  if parts[-1] not in node:
    raise ValueError(f"unknown config key {key!r}")
  if isinstance(node[parts[-1]], dict) and not isinstance(value, dict):
    raise ValueError(f"config.{key} is a section; set one of its keys ({sorted(node[parts[-1]])})")
  node[parts[-1]] = value


def _fill(d: dict, base: dict) -> dict:
  """``d`` with every key of ``base`` it lacks (recursively; kwargs and shifts are not merged)."""
  out = dict(d)
  for k, v in base.items():
    if k not in out:
      out[k] = copy.deepcopy(v)
    elif isinstance(v, dict) and isinstance(out[k], dict) and k not in ("kwargs", "shifts"):
      out[k] = _fill(out[k], v)
  return out


# --- validation ---------------------------------------------------------------------------------

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


def _int(d, dotted, low=1, high=MAX_COUNT, allow_none=False):
  v = _get(d, dotted)
  if v is None and allow_none:
    return None
  if isinstance(v, float) and v.is_integer() and math.isfinite(v):
    v = int(v)
    _set(d, dotted, v)
  if isinstance(v, bool) or not isinstance(v, int):
    raise ValueError(f"config.{dotted} must be an integer{' or None' if allow_none else ''}, "
                     f"got {v!r}")
  if v < low or (high is not None and v > high):
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"config.{dotted} must be {bounds}, got {v}")
  return v


def _float(d, dotted, low=None, high=None, low_open=False):
  v = _get(d, dotted)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError(f"config.{dotted} must be a number, got {v!r}")
  if not math.isfinite(v):
    raise ValueError(f"config.{dotted} must be a finite number, got {v}")
  bad = (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high)
  if bad:
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else f"<= {high:g}"
    raise ValueError(f"config.{dotted} must be {' and '.join(x for x in (lo, hi) if x)}, got {v}")
  _set(d, dotted, float(v))
  return float(v)


def _choice(d, dotted, choices):
  v = _get(d, dotted)
  if not isinstance(v, str) or v not in choices:
    raise ValueError(f"config.{dotted} must be one of {list(choices)}, got {v!r}")
  return v


def _finite_everywhere(node, prefix):
  """Rejects NaN/inf (and float32-overflowing magnitudes) anywhere in a (sub)config."""
  if isinstance(node, dict):
    for k, v in node.items():
      _finite_everywhere(v, f"{prefix}.{k}")
  elif isinstance(node, (list, tuple)):
    for i, v in enumerate(node):
      _finite_everywhere(v, f"{prefix}[{i}]")
  elif isinstance(node, float):
    if not math.isfinite(node):
      raise ValueError(f"{prefix} must be a finite number, got {node}")
    if abs(node) > 1e30:
      raise ValueError(f"{prefix} must be at most 1e30 in magnitude (float32 range), got {node:g}")
  elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > 2**62:
    raise ValueError(f"{prefix} is too large, got {node}")


def check_top(d):
  unknown = sorted(set(d) - set(base_config().keys()))
  if unknown:
    raise ValueError(f"unknown config key {unknown[0]!r}")
  if not isinstance(d.get("name"), str) or not d["name"] or not d["name"].strip():
    raise ValueError("config.name must be a non-empty string (the learned optimizer's row name)")
  if d["name"] in registry.OPTIMIZERS or d["name"] in tuple(d.get("eval", {}).get("baselines", ())):
    raise ValueError(f"config.name {d['name']!r} clashes with an optimizer's or baseline's row name")
  if any(c in d["name"] for c in "/\\\n"):
    raise ValueError(f"config.name must not contain '/', '\\' or newlines, got {d['name']!r}")
  _int(d, "seed", low=0, high=2**31 - 1)


def _check_section_keys(d, section):
  known = set(base_config()[section].keys())
  unknown = sorted(set(d[section]) - known)
  if unknown:
    raise ValueError(f"unknown config key '{section}.{unknown[0]}'")


def _entry(d, section, defaults_fn, kind):
  if not isinstance(d[section], dict):
    raise ValueError(f"config.{section} must be a section with name and kwargs")
  _check_section_keys(d, section)
  name = d[section].get("name")
  if not isinstance(name, str):
    raise ValueError(f"config.{section}.name must be a {kind} name, got {name!r}")
  kwargs = d[section].get("kwargs") or {}
  if not isinstance(kwargs, dict):
    raise ValueError(f"config.{section}.kwargs must be a dict of knobs, got {kwargs!r}")
  full = defaults_fn(name, **kwargs)  # unknown names and knobs fail here
  full = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}
  d[section]["kwargs"] = full
  _finite_everywhere(full, f"config.{section}.kwargs")
  return name, full


def check_task(d):
  name, kwargs = _entry(d, "task", registry.task_kwargs, "task family")
  registry.make_task_family(name, kwargs)  # the family's own ranges


def check_optimizer(d):
  name, kwargs = _entry(d, "optimizer", registry.optimizer_kwargs, "optimizer")
  registry.make_optimizer(name, kwargs)


def check_meta(d):
  _check_section_keys(d, "meta")
  n = _int(d, "meta.num_tasks")
  horizon = _int(d, "meta.horizon")
  k = _int(d, "meta.unroll_length")
  if horizon % k:
    raise ValueError(f"config.meta.horizon ({horizon}) must be a multiple of "
                     f"config.meta.unroll_length ({k})")
  _int(d, "meta.num_seeds", high=1024)
  _choice(d, "meta.estimator", ESTIMATORS)
  _float(d, "meta.sigma", low=0.0, low_open=True, high=10.0)
  _choice(d, "meta.outer_objective", OBJECTIVES)
  _choice(d, "meta.loss_transform", TRANSFORMS)
  _float(d, "meta.outer_lr", low=0.0, low_open=True, high=10.0)
  _float(d, "meta.outer_clip", low=0.0, high=1e6)
  _int(d, "meta.num_outer_steps", low=0, high=10**9)
  devices = _int(d, "meta.num_devices", low=0, high=4096)
  if devices and n % devices:
    raise ValueError(f"config.meta.num_tasks ({n}) must be divisible by "
                     f"config.meta.num_devices ({devices})")
  _int(d, "meta.select_every", low=0, high=10**9)
  _int(d, "meta.select_tasks", low=1)
  _int(d, "meta.log_every", high=10**9)
  _int(d, "meta.checkpoint_every", high=10**9)
  _choice(d, "meta.inner_dtype", INNER_DTYPES)
  if not isinstance(d["meta"]["tensorboard"], bool):
    raise ValueError(f"config.meta.tensorboard must be true or false, got "
                     f"{d['meta']['tensorboard']!r}")


def check_distributed(d):
  _check_section_keys(d, "distributed")
  from mesajax import distributed
  distributed.validate(d)


def check_devices(d):
  """``meta.num_devices`` against the devices present (initialises the jax backend; after
  ``mesajax.distributed.initialize`` these are every process's devices)."""
  import jax
  have, want = jax.device_count(), d["meta"]["num_devices"]
  if want > have:
    raise ValueError(f"config.meta.num_devices ({want}) exceeds the "
                     f"{have} {jax.default_backend()} device(s) present")
  if want == 0 and d["meta"]["num_tasks"] % have:
    raise ValueError(f"config.meta.num_tasks ({d['meta']['num_tasks']}) must be divisible by "
                     f"the {have} device(s) present (config.meta.num_devices = 0: all)")
  if jax.process_count() > 1 and want not in (0, have):
    raise ValueError(f"config.meta.num_devices ({want}) must be 0 or {have} (every device of "
                     f"the {jax.process_count()} processes) in a multi-process run")


def check_eval(d):
  _check_section_keys(d, "eval")
  _int(d, "eval.num_tasks", low=2)
  _int(d, "eval.num_tuning_tasks")
  lo = _float(d, "eval.lr_grid_min", low=0.0, low_open=True, high=1e6)
  hi = _float(d, "eval.lr_grid_max", low=0.0, low_open=True, high=1e6)
  if hi <= lo:
    raise ValueError(f"config.eval.lr_grid_max ({hi}) must exceed config.eval.lr_grid_min ({lo})")
  _int(d, "eval.lr_grid_size", low=2, high=10**4)
  _int(d, "eval.curve_every")
  _int(d, "eval.n_boot", low=10, high=MAX_BOOT)
  baselines = d["eval"]["baselines"]
  if isinstance(baselines, str) or not isinstance(baselines, (list, tuple)):
    raise ValueError(f"config.eval.baselines must be a tuple of optimizer names, got {baselines!r}")
  for name in baselines:
    if not isinstance(name, str):
      raise ValueError(f"config.eval.baselines must hold optimizer names, got {name!r}")
    opt = registry.make_optimizer(name)
    if opt.learned:
      raise ValueError(f"config.eval.baselines: {name!r} is a learned optimizer")
  if len(set(baselines)) != len(baselines):
    raise ValueError(f"config.eval.baselines has duplicates: {list(baselines)}")
  if d["name"] in baselines:
    raise ValueError(f"config.name {d['name']!r} collides with a baseline name")


# Analysis knobs and their bounds: (low, high, allow_none).
ANALYSIS_BOUNDS = {
    "num_tasks": (2, MAX_COUNT, False), "num_steps": (4, MAX_COUNT, False),
    "num_points": (1, MAX_COUNT, False), "num_probes": (2, 10**5, False),
    "n_boot": (10, MAX_BOOT, False), "endpoint_steps": (1, 10**9, True),
    "dense_max": (0, 10**5, False), "qs_max_state": (0, 10**5, False),
    "num_sens_probes": (1, 10**4, False), "fit_iters": (1, 10**6, False),
    "fit_polish_steps": (0, 10**6, False),
    "num_eigs": (1, 10**4, False), "probe_max_rows": (1, 10**8, False),
    "qs_fit_steps": (1, MAX_COUNT, False), "qs_fit_max_state": (0, 10**5, False),
    "spd_max": (0, 256, False), "num_perms": (0, 10**4, False),
    "num_fit_probes": (1, 10**4, False), "krylov_dim": (2, 1000, False),
    "point_batch_mb": (1, 10**7, False), "fit_max_coords": (1, 10**9, False),
}


# Real-valued analysis knobs: (low, high, low_open, high_open).
ANALYSIS_REAL_BOUNDS = {
    "spd_null_tol": (0.0, 1.0, True, True), "nci_floor": (0.0, 1.0, True, True),
    "heldout_frac": (0.0, 1.0, True, True), "vif_max": (1.0, 1e12, True, False),
    "vif_profiled_max": (1.0, 1e300, True, False),
    "alpha": (0.0, 1.0, True, True), "stationary_tol": (0.0, 1.0, True, False),
    "tie_rtol": (0.0, 1.0, False, False), "unit_eig_tol": (0.0, 1.0, False, True),
}


def check_analysis(d):
  _check_section_keys(d, "analysis")
  for key, (low, high, none) in ANALYSIS_BOUNDS.items():
    _int(d, f"analysis.{key}", low=low, high=high, allow_none=none)
  a = d["analysis"]
  for key, (low, high, low_open, high_open) in ANALYSIS_REAL_BOUNDS.items():
    v = a[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
        v <= low if low_open else v < low) or (v >= high if high_open else v > high):
      raise ValueError(f"config.analysis.{key} must be a number in {'(' if low_open else '['}"
                       f"{low}, {high}{')' if high_open else ']'}, got {v!r}")
  for key in ("spd_on_qs", "qs_matfree", "null_stop_early"):
    if not isinstance(a[key], bool):
      raise ValueError(f"config.analysis.{key} must be true or false, got {a[key]!r}")
  for key in ("controls", "control_splits"):
    names = a[key]
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
        isinstance(x, str) for x in names):
      raise ValueError(f"config.analysis.{key} must be a tuple of names, got {names!r}")
  for name in a["controls"]:
    registry.make_optimizer(name)  # unknown names fail here
  if a["num_points"] > a["num_steps"]:
    raise ValueError(f"config.analysis.num_points must be in [1, num_steps={a['num_steps']}], "
                     f"got {a['num_points']}")


def check_shifts(d):
  """Shift names and fields (each shift's family is built and validated by ``check_splits``)."""
  shifts = d.get("shifts") or {}
  if not isinstance(shifts, dict):
    raise ValueError("config.shifts must be a section of named shifts")
  for name, spec in shifts.items():
    if name == "heldout":
      raise ValueError("config.shifts: 'heldout' is reserved for the held-out split")
    if not isinstance(spec, dict):
      raise ValueError(f"config.shifts.{name} must be a dict like {{'task': {{...}}, "
                       f"'horizon_mult': 2}}, got {spec!r}")
    unknown = sorted(set(spec) - {"task", "horizon_mult"})
    if unknown:
      raise ValueError(f"config.shifts.{name} has unknown field(s) {unknown}; "
                       f"use 'task' and 'horizon_mult'")
    if "horizon_mult" in spec:
      _int(d, f"shifts.{name}.horizon_mult", low=1, high=10**4)
    task = spec.get("task") or {}
    if not isinstance(task, dict):
      raise ValueError(f"config.shifts.{name}.task must be a dict of knobs, got {task!r}")
    _finite_everywhere(task, f"config.shifts.{name}.task")


def check_splits(d, config):
  from mesajax.splits import make_splits
  for name, split in make_splits(config).items():
    if split.horizon % d["eval"]["curve_every"]:
      raise ValueError(f"config.eval.curve_every ({d['eval']['curve_every']}) must divide the "
                       f"horizon of split {name!r} ({split.horizon})")


def resolve(config, check_memory: bool = True) -> ml_collections.ConfigDict:
  """Validates every section and returns a locked ConfigDict holding every default."""
  if kind(config) == "icl":
    from mesajax.icl.config import validate  # the in-context learners' own schema
    out = validate(ml_collections.ConfigDict(
        config.to_dict() if hasattr(config, "to_dict") else dict(config)))
    out.lock()
    return out
  d = config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))
  d = _fill(d, base_config().to_dict())
  check_top(d)
  for section in ("task", "optimizer", "meta", "eval", "analysis", "distributed"):
    if not isinstance(d.get(section), dict):
      raise ValueError(f"config.{section} must be a section")
  _finite_everywhere({k: v for k, v in d.items() if k not in ("task", "optimizer", "shifts")},
                     "config")
  check_meta(d)
  check_distributed(d)
  check_eval(d)
  check_analysis(d)
  check_task(d)
  check_optimizer(d)
  check_shifts(d)
  out = ml_collections.ConfigDict(d)
  check_splits(d, out)
  check_devices(d)
  if check_memory:
    from mesajax import memory
    memory.check(out)
  out.lock()
  return out


def identity(config) -> dict:
  """The part of a resolved config that defines a run (compared on resume)."""
  if kind(config) == "icl":
    from mesajax.icl.config import identity as icl_identity
    return icl_identity(config)
  d = config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(config)
  for dotted in RESUMABLE:
    *path, last = dotted.split(".")
    node = d
    for part in path:
      node = node.get(part, {})
    node.pop(last, None)
  return d
