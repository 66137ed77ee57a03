"""The stages a run goes through, one library function each (``run.py`` only parses flags):

  train (meta-train, checkpoint) → evaluate (held-out + shifts, tuned baselines)
  → analyse (mesa-objective suite) → report (markdown + figures from the rows).

Every stage after ``train`` reads the checkpoint and config from the run directory, so it can be
rerun on any saved run, and learned and hand-designed optimizers take the same path.

Every stage holds the run directory's lock (``mesajax.lock``). Result rows carry ``stage`` and
``checkpoint`` (the step they were computed from) and are written with
``mesajax.report.rows.replace_rows``: a rerun replaces its own rows instead of appending duplicates.
"""
from __future__ import annotations

import os
import time

import ml_collections

from mesajax import checkpoint, lock, rundir
from mesajax.config import kind as config_kind
from mesajax.config import resolve
from mesajax.registry import make_optimizer
from mesajax.report.rows import remove_rows, replace_rows
from mesajax.splits import make_splits

RESULTS = "results.jsonl"


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} does not exist" if not os.path.exists(workdir)
                     else f"--workdir {workdir} is not a directory")
  saved = rundir.read_config(workdir)
  if saved is None:
    raise ValueError(f"{workdir} holds no run (no config.json); train one with "
                     f"`python run.py --config CONFIG --workdir {workdir}`")
  return resolve(ml_collections.ConfigDict(saved))


def load_learned(workdir: str, step: int | None = None):
  """``(config, opt, phi, step)`` from a run directory's checkpoint (latest by default).

  ``phi`` is the selected ``best_phi`` when the run used selection (``meta.select_every`` > 0) and
  the last outer step's phi otherwise. For a seed population (``meta.num_seeds`` > 1) every leaf
  of ``phi`` has a leading member axis (each member's own selection).
  """
  import jax
  import jax.numpy as jnp
  from mesajax.meta.outer import MetaTrainer
  config = load_run_config(workdir)
  trainer = MetaTrainer(config)
  state = checkpoint.restore_state(workdir, trainer.abstract_state(), step)
  if int(config.meta.select_every) > 0:
    scored = jnp.isfinite(state.best_score)  # per member: selection has run
    phi = jax.tree.map(lambda b, p: jnp.where(scored.reshape(scored.shape + (1,) * (b.ndim - scored.ndim)),
                                              b, p), state.best_phi, state.phi)
  else:
    phi = state.phi
  return config, trainer.opt, phi, trainer.outer_step(state)


def hand_designed(config, name: str):
  """A hand-designed optimizer by name; options from ``config.optimizer.kwargs`` when the config's
  optimizer has that name, else the optimizer's defaults."""
  kwargs = config.optimizer.kwargs.to_dict() if config.optimizer.name == name else {}
  opt = make_optimizer(name, kwargs)
  if opt.learned:
    raise ValueError(f"--optimizer {name!r} is a learned optimizer: analyse its run directory "
                     f"instead (python run.py analyze --workdir DIR)")
  import jax
  return opt, opt.init_phi(jax.random.PRNGKey(int(config.seed)))


def _timed(label, fn, *args, **kwargs):
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  print(f"{label}: {time.perf_counter() - t0:.1f} s")
  return out


def _icl():
  from mesajax.icl import pipeline as icl_pipeline
  return icl_pipeline


def _icl_rows(workdir: str, step: int | None, stage: str) -> list[dict]:
  """An in-context learner's evaluation (the model, its nulls and the references on every split)
  or analysis (layer probes) rows, computed from its checkpoint."""
  from mesajax.icl import probes
  from mesajax.icl import train as icl_train
  config, trainer, state = icl_train.load(workdir, step)
  if stage == "evaluate":
    return _icl().evaluate_state(config, trainer, state, workdir)
  return probes.probe_rows(config, trainer, state)


def is_icl(config) -> bool:
  return config_kind(config) == "icl"


def train(config, workdir: str, progress: bool = True, checkpoint_step: int | None = None):
  """Meta-trains (resuming from the latest usable checkpoint, or from ``checkpoint_step``: later
  steps, their metrics rows and result rows are set aside under ``DIR/set_aside/``). An in-context
  learner's config (``kind = "icl"``) trains that model (``mesajax.icl.pipeline``)."""
  from mesajax.meta.train import train as meta_train
  rundir.check_workdir(workdir)
  if is_icl(config):
    if checkpoint_step is not None:
      raise ValueError("--checkpoint with `train` is for meta-training runs, not in-context learners")
    with lock.hold(workdir):
      return _icl().train(config, workdir, progress=progress)
  with lock.hold(workdir):
    if checkpoint_step is not None:
      rundir.check_same(workdir, config)
      steps = checkpoint.all_steps(workdir)
      if checkpoint_step not in steps:
        raise ValueError(f"--checkpoint {checkpoint_step}: no such checkpoint in "
                         f"{checkpoint.checkpoint_dir(workdir)}; saved steps: {steps}")
      _set_aside_results(workdir, checkpoint_step)
    return meta_train(config, workdir, progress=progress, checkpoint_step=checkpoint_step)


def _set_aside_results(workdir, step):
  import json
  from mesajax import distributed
  if not distributed.is_primary():  # rows are written once, by process 0
    return
  gone = remove_rows(os.path.join(workdir, RESULTS),
                     lambda r: isinstance(r.get("checkpoint"), int) and r["checkpoint"] > step)
  if gone:
    dest = checkpoint.set_aside_dir(workdir)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, RESULTS), "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in gone)


def evaluate(workdir: str, step: int | None = None) -> list[dict]:
  from mesajax.eval.evaluate import evaluate_all
  run_config = load_run_config(workdir)  # one line before taking the lock when DIR holds no run
  with lock.hold(workdir):
    if is_icl(run_config):
      rows = _icl_rows(workdir, step, "evaluate")
      return replace_rows(os.path.join(workdir, RESULTS), rows, stage="evaluate", checkpoint=None)
    config, opt, phi, at = load_learned(workdir, step)
    if int(config.meta.num_seeds) > 1:
      from mesajax.eval.population import evaluate_population
      rows = evaluate_population(opt, phi, config.name, make_splits(config), config.eval,
                                 int(config.seed))
    else:
      rows = evaluate_all(opt, phi, config.name, make_splits(config), config.eval,
                          int(config.seed))
    return replace_rows(os.path.join(workdir, RESULTS), rows, stage="evaluate", checkpoint=at)


def analyze(workdir: str, step: int | None = None, config=None, optimizer: str | None = None,
            stages=None):
  """Runs every analysis on the checkpointed learned optimizer of ``workdir`` or, with
  ``config`` and ``optimizer``, on a hand-designed optimizer on that config's family.

  ``stages``: only these analyses (names in ``mesajax.registry.ANALYSES``; None: all). In a seed
  population every member is analysed with its own untrained null; the no-objective controls
  do not depend on the member, so they are analysed once and each member's paired rows reuse them.
  """
  stages = None if stages is None else tuple(stages)
  from mesajax.analysis.suite import run_analyses
  if optimizer is None:
    run_config = load_run_config(workdir)  # one line before taking the lock when DIR holds no run
  else:
    rundir.check_workdir(workdir)
  with lock.hold(workdir):
    if optimizer is None and is_icl(run_config):
      rows = _icl_rows(workdir, step, "analyze")
      return replace_rows(os.path.join(workdir, RESULTS), rows, stage="analyze", checkpoint=None)
    if optimizer is None:
      config, opt, phi, at = load_learned(workdir, step)
      name = config.name
    else:
      opt, phi = hand_designed(config, optimizer)
      name, at = optimizer, None
    splits = make_splits(config)
    if optimizer is not None:
      rows = run_analyses(opt, phi, name, splits, config.analysis, int(config.seed),
                          stages=stages)
    else:
      # The untrained learned optimizer (the phi meta-training started from) is the null every
      # learned-optimizer finding is compared with, on the same tasks (paired rows).
      import jax
      from mesajax.meta.outer import MetaTrainer
      phi0 = MetaTrainer(config).initial_phi()
      rows, shared = [], {}
      members = range(int(config.meta.num_seeds)) if int(config.meta.num_seeds) > 1 else [None]
      for s in members:  # every member of a seed population
        take = (lambda t: t) if s is None else (lambda t, s=s: jax.tree.map(lambda x: x[s], t))
        out = run_analyses(opt, take(phi), name, splits, config.analysis, int(config.seed),
                           null_phi=take(phi0), stages=stages, control_cache=shared)
        # rows carry the member's own meta-training seed (config.seed + s); a control's own rows
        # (written once, by the first member) belong to no member
        rows += out if s is None else [r if r.get("role") == "control"
                                       else dict(r, seed=int(config.seed) + s) for r in out]
    return replace_rows(os.path.join(workdir, RESULTS), rows, stage="analyze", checkpoint=at)


def report(workdir: str) -> str:
  """Writes ``DIR/report.md`` (and figures) from the rows; ``ValueError`` when ``DIR`` holds no
  run or no results."""
  from mesajax.report.report import write_report
  from mesajax.report.rows import read_rows
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} does not exist")
  if rundir.read_config(workdir) is None and not os.path.exists(os.path.join(workdir, RESULTS)):
    raise ValueError(f"{workdir} holds no run (no config.json, no {RESULTS}); nothing to report")
  if not read_rows(os.path.join(workdir, RESULTS)):
    raise ValueError(f"{workdir} has no result rows yet; run `evaluate` or `analyze` first")
  with lock.hold(workdir):
    return write_report(workdir)


def run_all(config, workdir: str, progress: bool = True,
            checkpoint_step: int | None = None) -> str:
  """The main job: meta-train, evaluate, analyse, report. Returns the report's path."""
  rundir.check_workdir(workdir)
  with lock.hold(workdir):
    _timed("meta-train", train, config, workdir, progress, checkpoint_step)
    _timed("evaluate", evaluate, workdir)
    _timed("analyse", analyze, workdir)
    path = _timed("report", report, workdir)
  print(f"report: {path}")
  return path
