"""The meta-training loop: resume, step, log, checkpoint, stop cleanly on a signal.

The host never blocks on the device except to log: step n+1 is dispatched before step n's metrics
are read (nanodo's habit), and only every ``meta.log_every`` steps. Checkpoints every
``meta.checkpoint_every`` steps and at the end. Resuming from the latest checkpoint continues
bit-for-bit (same RNG stream and truncation state). With ``meta.select_every`` > 0 the loop also
scores phi on full-horizon validation runs and keeps the best (``MetaTrainer.select``).

Reliability (docs/reliability.md):

* The run directory is locked (``mesajax.lock``) and nothing is written to it before the trainer
  is built from the (already validated) config.
* SIGINT / SIGTERM (``mesajax.interrupt``; run.py installs the handlers) only set a flag while the
  loop runs. After the current outer step the loop stops, flushes the pending metrics row, writes
  one checkpoint for the latest finished step if it is not already saved, and raises
  ``Interrupted`` (exit 130 / 143 in run.py).
* A state holding NaN/inf is never checkpointed (``checkpoint.NonFiniteState``; the last good
  checkpoint stays the latest).
* On resume (from the latest usable step, or ``checkpoint_step``), checkpoint steps past the
  restored one and ``metrics.jsonl`` rows past it (and a torn last line) are moved to
  ``DIR/set_aside/<time>/``, so the metrics always match the checkpoint.

TensorBoard (``meta.tensorboard = True`` and the optional ``tensorboardX`` package, extra
``tensorboard``): every metrics row is also written as scalars ``meta/<key>`` (a population's
per-member values as ``meta/<key>/seed<s>``) to event files in ``DIR/tensorboard/``; a resume
purges events past the restored step. ``tensorboard --logdir DIR/tensorboard`` shows the curves.

Several processes (``mesajax.distributed``): every process runs the loop (the outer step, the
selection and the checkpoints are collective); the run directory's files (config, metrics rows,
TensorBoard events, set-aside moves) and the progress bar are process 0's.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from mesajax import checkpoint, distributed, interrupt, lock, rundir
from mesajax.meta.outer import MetaState, MetaTrainer

METRICS = "metrics.jsonl"


def checkpoint_meta(config) -> dict:
  return {"config": json.loads(json.dumps(config.to_dict(), default=list)),
          "versions": rundir.versions()}


def load_or_init(trainer: MetaTrainer, workdir: str, step: int | None = None) -> MetaState:
  """The state to continue from: checkpoint ``step`` (latest usable when None), or a fresh one
  when the directory has no checkpoint."""
  if not checkpoint.all_steps(workdir):
    if step is not None:
      raise ValueError(f"--checkpoint {step}: {workdir} has no checkpoint")
    return trainer.init()
  return checkpoint.restore_state(workdir, trainer.abstract_state(), step)


class Scalars:
  """TensorBoard scalars beside ``metrics.jsonl`` (``meta.tensorboard``; module docstring). A
  no-op when off, on processes other than 0, or when ``tensorboardX`` is missing (one line)."""

  def __init__(self, config, workdir: str, start: int):
    self.writer = None
    if not bool(config.meta.get("tensorboard", False)) or not distributed.is_primary():
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      print("warning: meta.tensorboard is on but tensorboardX is not installed (pip install "
            "'mesajax[tensorboard]'); writing metrics.jsonl only", file=sys.stderr, flush=True)
      return
    self.writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"),
                                purge_step=start if start > 0 else None)

  def add(self, row: dict) -> None:
    if self.writer is None:
      return
    step = int(row["outer_step"])
    for key, value in row.items():
      if key == "outer_step":
        continue
      if isinstance(value, list):
        for s, v in enumerate(value):
          if isinstance(v, (int, float)) and not isinstance(v, bool):
            self.writer.add_scalar(f"meta/{key}/seed{s}", v, step)
      elif isinstance(value, (int, float)):  # bools as 0/1; None (non-finite) is skipped
        self.writer.add_scalar(f"meta/{key}", float(value), step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def _log(path, row, scalars: Scalars | None = None):
  if not distributed.is_primary():
    return
  if scalars is not None:
    scalars.add(row)
  with open(path, "a") as f:
    f.write(json.dumps(row, allow_nan=False) + "\n")
    f.flush()


def trim_metrics(workdir: str, step: int) -> int:
  """Keeps the ``metrics.jsonl`` rows up to outer step ``step``; moves later rows (and torn lines)
  to the set-aside folder. Returns the number of lines moved."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return 0
  keep, moved = [], []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        ok = isinstance(row, dict) and int(row.get("outer_step", 0)) <= step and line.endswith("\n")
      except (ValueError, TypeError):
        ok = False
      (keep if ok else moved).append(line if line.endswith("\n") else line + "\n")
  if not moved:
    return 0
  dest = checkpoint.set_aside_dir(workdir)
  os.makedirs(dest, exist_ok=True)
  with open(os.path.join(dest, METRICS), "a") as f:
    f.writelines(moved)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(moved)


def train(config, workdir: str, progress: bool = True, trainer: MetaTrainer | None = None,
          checkpoint_step: int | None = None):
  """Meta-trains ``config`` in ``workdir`` up to ``config.meta.num_outer_steps`` outer steps.

  Returns ``(trainer, state)``. Resumes from the latest usable checkpoint (or from
  ``checkpoint_step``) when the directory holds this config's run; raises ``ValueError`` when it
  holds another config's run, ``lock.Locked`` when another process holds it, and
  ``interrupt.Interrupted`` after a clean stop on SIGINT/SIGTERM.
  """
  trainer = trainer or MetaTrainer(config)  # builds everything that can fail; compiles nothing
  with lock.hold(workdir), interrupt.deferred():
    return _train(config, workdir, progress, trainer, checkpoint_step)


def _train(config, workdir, progress, trainer, checkpoint_step):
  distributed.on_primary(lambda: rundir.prepare(workdir, config))
  state = load_or_init(trainer, workdir, checkpoint_step)
  start, total = trainer.outer_step(state), int(config.meta.num_outer_steps)
  moved = checkpoint.set_aside(workdir, start, reason=f"train resumed from step {start}")
  dropped = distributed.on_primary(lambda: trim_metrics(workdir, start))
  primary, multi = distributed.is_primary(), distributed.process_count() > 1
  progress = progress and primary
  if (moved or dropped) and primary:
    print(f"note: set aside checkpoint steps / metrics rows past step {start} in "
          f"{checkpoint.set_aside_dir(workdir)}", file=sys.stderr, flush=True)
  meta = checkpoint_meta(config)
  metrics_path = os.path.join(workdir, METRICS)
  log_every, ckpt_every = int(config.meta.log_every), int(config.meta.checkpoint_every)
  select_every = int(config.meta.select_every)
  inner_per_outer = trainer.inner_steps_per_outer_step()
  bar = tqdm(total=total, initial=start, desc="meta-train", disable=not progress, leave=True)
  pending, t0 = None, time.perf_counter()
  last_saved = start if checkpoint.all_steps(workdir) else None
  scalars = Scalars(config, workdir, start)
  stalled = Stalled(str(config.meta.loss_transform), int(config.seed))
  report = lambda p: _report(p, metrics_path, bar, t0, inner_per_outer, start, scalars, stalled)
  try:
    for step in range(start, total):
      # Several processes agree on stopping (a collective that waits for the device) only every
      # log_every steps, so the host keeps dispatching ahead in between.
      if ((not multi or step % log_every == 0)
          and distributed.any_process(interrupt.pending() is not None)):
        break
      state, metrics = trainer.step(state)
      if pending is not None:  # read the previous step's metrics after dispatching this one
        report(pending)
        pending = None
      if (step + 1) % log_every == 0 or step + 1 == total:
        pending = (step + 1, metrics)
      bar.update(1)
      # Only at multiples of select_every, so a resumed run selects exactly as a straight one.
      if select_every and (step + 1) % select_every == 0:
        state, score = trainer.select(state)
        _log(metrics_path, {"outer_step": step + 1, "select_score": _finite_mean(score),
                            "best_score": _finite_mean(jax.device_get(state.best_score)),
                            **({"select_score_per_seed": [_finite(x) for x in score]}
                               if trainer.population else {})}, scalars)
      if (step + 1) % ckpt_every == 0 and step + 1 < total:
        if pending is not None:  # the metrics row of a checkpointed step is never lost
          report(pending)
          pending = None
        checkpoint.save(workdir, step + 1, state, meta)
        last_saved = step + 1
    if pending is not None:
      report(pending)
  finally:
    bar.close()
    scalars.close()
  jax.block_until_ready(state)
  step_now = trainer.outer_step(state)
  if step_now != last_saved and (step_now > 0 or step_now == total):
    checkpoint.save(workdir, step_now, state, meta)
  signum = interrupt.pending()
  if distributed.any_process(signum is not None) and signum is None:
    signum = 15  # another process was signalled (SIGTERM's code)
  if signum is not None:
    interrupt.clear()
    raise interrupt.Interrupted(
        signum, f"interrupted: checkpoint at outer step {step_now} in {workdir}; rerun the same "
                f"command to resume")
  return trainer, state


def _finite(x):
  x = float(x)
  return x if np.isfinite(x) else None  # JSON has no NaN/inf: null instead


def _finite_mean(x):
  """A scalar, or the mean over a population's members (None when any is non-finite)."""
  return _finite(np.mean(np.asarray(x, np.float64)))


class Stalled:
  """Warns once (stderr) about each population member whose meta-gradient is exactly zero.

  With ``meta.loss_transform = "clip"`` the per-step objective min(L/L0, 1) is flat wherever every
  loss in the truncation is at or above the task's initial loss; a member that starts there (an
  initialisation whose updates raise the loss) gets no meta-gradient and never moves. Its
  ``metrics.jsonl`` rows list it under ``zero_grad_members``; the run itself goes on (the other
  members are unaffected)."""

  def __init__(self, loss_transform: str, seed: int):
    self.loss_transform, self.seed, self.warned = loss_transform, seed, set()

  def __call__(self, step: int, grad_norm, skipped) -> list[int]:
    g = np.ravel(np.asarray(grad_norm, np.float64))
    ok = ~np.ravel(np.broadcast_to(np.asarray(skipped, bool), g.shape))
    zero = [int(i) for i in np.flatnonzero((g == 0.0) & ok)]
    new = [i for i in zero if i not in self.warned]
    if new and distributed.is_primary():
      self.warned.update(new)
      who = (f"member(s) {new} (seed {', '.join(str(self.seed + i) for i in new)})"
             if g.size > 1 else "the learned optimizer")
      why = ("every loss of its truncations is at or above the task's initial loss, where "
             "meta.loss_transform='clip' is flat, so it cannot train; meta.loss_transform='log' "
             "has no flat region" if self.loss_transform == "clip" else
             "it does not move while that lasts")
      print(f"warning: meta-gradient exactly 0 at outer step {step} for {who}: {why}",
            file=sys.stderr, flush=True)
    return zero


def _report(pending, path, bar, t0, inner_per_outer, start, scalars=None, stalled=None):
  if not distributed.is_primary():
    return
  step, metrics = pending
  m = jax.device_get(metrics)
  elapsed = time.perf_counter() - t0
  # A population logs the mean over its members (and each member's meta-loss).
  row = {"outer_step": step, "meta_loss": _finite_mean(m["meta_loss"]),
         "grad_norm": _finite_mean(m["grad_norm"]),
         "skipped": bool(np.any(m["skipped"])), "num_skipped": int(np.sum(m["num_skipped"])),
         "time_s": elapsed, "inner_steps": (step - start) * inner_per_outer}
  if np.ndim(m["meta_loss"]):
    row["meta_loss_per_seed"] = [_finite(x) for x in np.ravel(m["meta_loss"])]
  zero = stalled(step, m["grad_norm"], m["skipped"]) if stalled is not None else []
  if zero:
    row["zero_grad_members"] = zero
  nonfinite = [k for k in ("meta_loss", "grad_norm") if row[k] is None]
  if nonfinite:
    row["nonfinite"] = nonfinite
  _log(path, row, scalars)
  bar.set_postfix(meta_loss=f"{np.mean(m['meta_loss']):.4f}", skipped=row["num_skipped"])
