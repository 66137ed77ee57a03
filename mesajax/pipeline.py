"""The stages a run goes through, one library function each (``run.py`` only parses flags):

  train (meta-train, checkpoint) → evaluate (held-out + shifts, tuned baselines)
  → analyse (mesa-objective suite) → report (markdown + figures from the rows).

Every stage after ``train`` reads the checkpoint and config from the run directory, so it can be
rerun on any saved run, and learned and hand-designed optimizers take the same path.
"""
from __future__ import annotations

import os
import time

import ml_collections

from mesajax import checkpoint, rundir
from mesajax.config import resolve
from mesajax.registry import make_optimizer
from mesajax.report.rows import append_rows
from mesajax.splits import make_splits

RESULTS = "results.jsonl"


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  saved = rundir.read_config(workdir)
  if saved is None:
    raise ValueError(f"{workdir} holds no run (no config.json); train one with "
                     f"`python run.py --config CONFIG --workdir {workdir}`")
  return resolve(ml_collections.ConfigDict(saved))


def load_learned(workdir: str, step: int | None = None):
  """``(config, opt, phi, step)`` from a run directory's checkpoint (latest by default).

  ``phi`` is the selected ``best_phi`` when the run used selection (``meta.select_every`` > 0) and
  the last outer step's phi otherwise.
  """
  from mesajax.meta.outer import MetaTrainer
  config = load_run_config(workdir)
  trainer = MetaTrainer(config)
  state = checkpoint.restore_state(workdir, trainer.abstract_state(), step)
  selected = int(config.meta.select_every) > 0 and bool(state.best_score < float("inf"))
  return config, trainer.opt, (state.best_phi if selected else state.phi), int(state.step)


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


def train(config, workdir: str, progress: bool = True):
  from mesajax.meta.train import train as meta_train
  return meta_train(config, workdir, progress=progress)


def evaluate(workdir: str, step: int | None = None) -> list[dict]:
  from mesajax.eval.evaluate import evaluate_all
  config, opt, phi, _ = load_learned(workdir, step)
  rows = evaluate_all(opt, phi, config.name, make_splits(config), config.eval, int(config.seed))
  append_rows(os.path.join(workdir, RESULTS), rows)
  return rows


def analyze(workdir: str, step: int | None = None, config=None, optimizer: str | None = None):
  """Runs every analysis on the checkpointed learned optimizer of ``workdir`` or, with
  ``config`` and ``optimizer``, on a hand-designed optimizer on that config's family."""
  from mesajax.analysis.suite import run_analyses
  if optimizer is None:
    config, opt, phi, _ = load_learned(workdir, step)
    name = config.name
  else:
    os.makedirs(workdir, exist_ok=True)
    opt, phi = hand_designed(config, optimizer)
    name = optimizer
  rows = run_analyses(opt, phi, name, make_splits(config), config.analysis, int(config.seed))
  append_rows(os.path.join(workdir, RESULTS), rows)
  return rows


def report(workdir: str) -> str:
  from mesajax.report.report import write_report
  return write_report(workdir)


def run_all(config, workdir: str, progress: bool = True) -> str:
  """The main job: meta-train, evaluate, analyse, report. Returns the report's path."""
  _timed("meta-train", train, config, workdir, progress)
  _timed("evaluate", evaluate, workdir)
  _timed("analyse", analyze, workdir)
  path = _timed("report", report, workdir)
  print(f"report: {path}")
  return path
