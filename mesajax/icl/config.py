"""Default ICL config and its validator: every bad value is a one-line ``ValueError`` raised before
anything compiles.

Layout (``ml_collections.ConfigDict``)::

  kind = "icl"; name; seed
  icl.model, icl.model_kwargs          registry name (``models.MODELS``) and its options
  icl.task.{d, N, tau, sigma, inputs, input_scale, input_cond, orthant, weights, sparsity,
            num_pretrain_tasks, pool_seed, query}          (``data.ICLRegression`` knobs)
  icl.{num_steps, batch_size, lr, decay_steps, grad_clip, num_seeds, log_every, checkpoint_every}
  icl.eval.{num_tasks, num_queries, n_boot, gd_steps, gdpp_iters, lam_lo, lam_hi, lam_num,
            probe_tasks, nulls}
  shifts.<name> = {task knob: value, ...}   evaluated beside the training distribution
"""
from __future__ import annotations

import math

import ml_collections

from mesajax.icl.data import ICLRegression
from mesajax.icl.models import MODELS

# Changing these does not change what has been computed, so a run may resume with new values.
RESUMABLE = ("icl.num_steps", "icl.log_every", "icl.checkpoint_every")
NULLS = ("untrained", "shuffled_context", "single_task")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "icl"
  c.name = "icl"
  c.seed = 0
  c.icl = ml_collections.ConfigDict()
  c.icl.model = "lsa"
  c.icl.model_kwargs = ml_collections.ConfigDict({"num_layers": 1, "num_heads": 2,
                                                  "init_scale": 0.1})
  c.icl.task = ml_collections.ConfigDict(ICLRegression().knobs())
  c.icl.num_steps = 3000
  c.icl.batch_size = 256
  c.icl.lr = 1e-3
  c.icl.decay_steps = 0          # cosine decay of lr to 1% over this many steps (0: constant)
  c.icl.grad_clip = 1.0          # global-norm clip per seed (0: off)
  c.icl.num_seeds = 5            # training seeds, trained as one vmapped population
  c.icl.log_every = 100
  c.icl.checkpoint_every = 1000
  c.icl.eval = ml_collections.ConfigDict()
  c.icl.eval.num_tasks = 512     # evaluation tasks per seed and split
  c.icl.eval.num_queries = 32    # probe queries per task (SPD, ILWD need >= d)
  c.icl.eval.n_boot = 1000
  c.icl.eval.gd_steps = 1        # K of the K-step GD and GD++ references (default: layers)
  c.icl.eval.gdpp_iters = 300
  c.icl.eval.lam_lo = 1e-3
  c.icl.eval.lam_hi = 1e3
  c.icl.eval.lam_num = 61
  c.icl.eval.probe_tasks = 1024  # tasks for the linear probes (half fit, half held out)
  c.icl.eval.nulls = ("untrained", "shuffled_context")
  c.shifts = ml_collections.ConfigDict()
  return c


SMOKE = {"num_steps": 40, "decay_steps": 40, "num_seeds": 2, "batch_size": 64, "log_every": 10,
         "checkpoint_every": 20}
SMOKE_EVAL = {"num_tasks": 32, "num_queries": 12, "n_boot": 50, "gdpp_iters": 20, "lam_num": 21,
              "probe_tasks": 64}


def shrink(config, arg):
  """Config-file helper: ``arg`` None/"" returns ``config``; "smoke" shrinks training and
  evaluation to a CPU smoke run of seconds and keeps one shift (big_vision's ``runlocal``)."""
  if arg in (None, ""):
    return config
  if arg != "smoke":
    raise ValueError(f"unknown config argument {arg!r}; the only one is 'smoke'")
  for k, v in SMOKE.items():
    config.icl[k] = v
  for k, v in SMOKE_EVAL.items():
    config.icl.eval[k] = v
  config.shifts = ml_collections.ConfigDict(dict(list(config.shifts.to_dict().items())[:1]))
  return config


def task_family(config, **overrides) -> ICLRegression:
  knobs = {**config.icl.task.to_dict(), **overrides}
  knobs = {k: (bool(v) if k == "orthant" else v) for k, v in knobs.items()}
  fam = ICLRegression().replace(**knobs)
  return fam


def shift_families(config) -> dict:
  """``{"train": family, <shift>: shifted family, ...}`` (validated)."""
  base = task_family(config)
  out = {"train": base}
  for name, over in config.shifts.to_dict().items():
    if name == "train":
      raise ValueError("config.shifts: 'train' is reserved for the training distribution")
    if not isinstance(over, dict):
      raise ValueError(f"config.shifts.{name} must be a dict of task knobs, got {over!r}")
    try:
      out[name] = base.replace(**over)
    except ValueError as e:
      raise ValueError(f"config.shifts.{name}: {e}") from None
  return out


def _int(c, path, lo=1, hi=None):
  v = _get(c, path)
  if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ValueError(f"config.{path} must be an int {rng}, got {v!r}")
  return v


def _num(c, path, lo=None, lo_open=False, hi=None):
  v = _get(c, path)
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and not (lo is not None and (v <= lo if lo_open else v < lo))
  ok = ok and not (hi is not None and v > hi)
  if not ok:
    rng = " and ".join(x for x in ((f"> {lo}" if lo_open else f">= {lo}") if lo is not None else "",
                                   f"<= {hi}" if hi is not None else "") if x)
    raise ValueError(f"config.{path} must be a finite number{' ' + rng if rng else ''}, got {v!r}")
  return float(v)


def _get(c, path):
  node = c
  for part in path.split("."):
    if part not in node:
      raise ValueError(f"config.{path} is missing")
    node = node[part]
  return node


def validate(config) -> ml_collections.ConfigDict:
  """Checks every field; returns the config. Raises a one-line ``ValueError`` on the first error."""
  if _get(config, "kind") != "icl":
    raise ValueError(f"config.kind must be 'icl', got {config.kind!r}")
  if not isinstance(config.get("name"), str) or not config.name:
    raise ValueError("config.name must be a non-empty string")
  _int(config, "seed", lo=0)
  if _get(config, "icl.model") not in MODELS:
    raise ValueError(f"config.icl.model must be one of {sorted(MODELS)}, got {config.icl.model!r}")
  kw = config.icl.model_kwargs.to_dict()
  for k, v in kw.items():
    if isinstance(v, float) and not math.isfinite(v):
      raise ValueError(f"config.icl.model_kwargs.{k} must be finite, got {v!r}")
    if k in ("num_layers", "num_heads", "width", "max_len"):
      _int(config, f"icl.model_kwargs.{k}", lo=1, hi=4096)
  import inspect
  allowed = set(inspect.signature(MODELS[config.icl.model].__init__).parameters) - {"self", "d", "rngs"}
  unknown = sorted(set(kw) - allowed)
  if unknown:
    raise ValueError(f"config.icl.model_kwargs: model {config.icl.model!r} has no option(s) "
                     f"{unknown}; options: {sorted(allowed)}")
  fams = shift_families(config)  # validates the task knobs and every shift
  if config.icl.model == "gpt":
    max_len = kw.get("max_len", 64)
    for name, fam in fams.items():
      if fam.N > max_len:
        raise ValueError(f"split {name!r}: N={fam.N} exceeds icl.model_kwargs.max_len={max_len}")
  _int(config, "icl.num_steps", lo=0)
  _int(config, "icl.batch_size", hi=1 << 20)
  _num(config, "icl.lr", lo=0.0, lo_open=True, hi=10.0)
  _num(config, "icl.grad_clip", lo=0.0)
  _int(config, "icl.decay_steps", lo=0)
  _int(config, "icl.num_seeds", hi=1024)
  _int(config, "icl.log_every")
  _int(config, "icl.checkpoint_every")
  _int(config, "icl.eval.num_tasks", lo=2)
  _int(config, "icl.eval.num_queries", lo=1)
  _int(config, "icl.eval.n_boot", lo=10)
  _int(config, "icl.eval.gd_steps", lo=1, hi=64)
  _int(config, "icl.eval.gdpp_iters", lo=0)
  lo = _num(config, "icl.eval.lam_lo", lo=0.0, lo_open=True)
  hi = _num(config, "icl.eval.lam_hi", lo=0.0, lo_open=True)
  if hi <= lo:
    raise ValueError(f"config.icl.eval.lam_hi ({hi}) must exceed config.icl.eval.lam_lo ({lo})")
  _int(config, "icl.eval.lam_num", lo=2)
  _int(config, "icl.eval.probe_tasks", lo=8)
  for null in config.icl.eval.nulls:
    if null not in NULLS:
      raise ValueError(f"config.icl.eval.nulls: unknown null {null!r}; known: {list(NULLS)}")
  return config


def identity(config) -> dict:
  """The part of a config that defines a run (compared on resume)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  d = {**d, "icl": dict(d["icl"])}
  for path in RESUMABLE:
    d["icl"].pop(path.split(".")[1], None)
  return d
