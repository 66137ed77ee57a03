"""The meta-training loop: resume, step, log, checkpoint.

The host never blocks on the device except to log: step n+1 is dispatched before step n's metrics
are read (nanodo's habit), and only every ``meta.log_every`` steps. Checkpoints every
``meta.checkpoint_every`` steps, at the end, and on interruption (Ctrl-C saves, then re-raises), so
nothing is lost. Resuming from the latest checkpoint continues bit-for-bit (same RNG stream and
truncation state). With ``meta.select_every`` > 0 the loop also scores phi on full-horizon
validation runs and keeps the best (``MetaTrainer.select``).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from mesajax import checkpoint, rundir
from mesajax.meta.outer import MetaState, MetaTrainer


def checkpoint_meta(config) -> dict:
  return {"config": json.loads(json.dumps(config.to_dict(), default=list)),
          "versions": rundir.versions()}


def load_or_init(trainer: MetaTrainer, workdir: str, step: int | None = None) -> MetaState:
  if checkpoint.latest_step(workdir) is None:
    return trainer.init()
  return checkpoint.restore_state(workdir, trainer.abstract_state(), step)


def _log(path, row):
  with open(path, "a") as f:
    f.write(json.dumps(row, allow_nan=False) + "\n")
    f.flush()


def train(config, workdir: str, progress: bool = True, trainer: MetaTrainer | None = None):
  """Meta-trains ``config`` in ``workdir`` up to ``config.meta.num_outer_steps`` outer steps.

  Returns ``(trainer, state)``. Resumes from the latest checkpoint when the directory holds this
  config's run; raises ``ValueError`` when it holds another config's run.
  """
  rundir.prepare(workdir, config)
  trainer = trainer or MetaTrainer(config)
  state = load_or_init(trainer, workdir)
  start, total = int(state.step), int(config.meta.num_outer_steps)
  meta = checkpoint_meta(config)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  log_every, ckpt_every = int(config.meta.log_every), int(config.meta.checkpoint_every)
  select_every = int(config.meta.select_every)
  inner_per_outer = trainer.inner_steps_per_outer_step()
  bar = tqdm(total=total, initial=start, desc="meta-train", disable=not progress, leave=True)
  pending, t0, last_saved = None, time.perf_counter(), start
  try:
    for step in range(start, total):
      state, metrics = trainer.step(state)
      if pending is not None:  # read the previous step's metrics after dispatching this one
        _report(pending, metrics_path, bar, t0, inner_per_outer, start)
        pending = None
      if (step + 1) % log_every == 0 or step + 1 == total:
        pending = (step + 1, metrics)
      bar.update(1)
      # Only at multiples of select_every, so a resumed run selects exactly as a straight one.
      if select_every and (step + 1) % select_every == 0:
        state, score = trainer.select(state)
        _log(metrics_path, {"outer_step": step + 1, "select_score": score,
                            "best_score": float(state.best_score)})
      if (step + 1) % ckpt_every == 0 and step + 1 < total:
        checkpoint.save(workdir, step + 1, state, meta)
        last_saved = step + 1
    if pending is not None:
      _report(pending, metrics_path, bar, t0, inner_per_outer, start)
    if int(state.step) != last_saved:
      checkpoint.save(workdir, int(state.step), state, meta)
  except KeyboardInterrupt:
    bar.close()
    jax.block_until_ready(state)
    checkpoint.save(workdir, int(state.step), state, meta)
    print(f"interrupted: saved checkpoint at outer step {int(state.step)} in {workdir}")
    raise
  bar.close()
  return trainer, state


def _report(pending, path, bar, t0, inner_per_outer, start):
  step, metrics = pending
  m = jax.device_get(metrics)
  elapsed = time.perf_counter() - t0
  finite = lambda x: float(x) if np.isfinite(x) else None  # JSON has no NaN: null instead
  row = {"outer_step": step, "meta_loss": finite(m["meta_loss"]), "grad_norm": finite(m["grad_norm"]),
         "skipped": bool(m["skipped"]), "num_skipped": int(m["num_skipped"]),
         "time_s": elapsed, "inner_steps": (step - start) * inner_per_outer}
  _log(path, row)
  bar.set_postfix(meta_loss=f"{float(m['meta_loss']):.4f}", skipped=row["num_skipped"])
