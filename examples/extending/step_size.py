"""Example analysis (docs/extending.md): the effective step size along the trajectories,

  s_t = ‖u_t‖ / ‖∇L_train(θ_t)‖,   per task the mean over steps, and its coefficient of variation,

so plain gradient descent with learning rate η gives s = η with zero variation (the known answer
``tests/test_extending.py`` checks), and a learned schedule shows up as a varying s_t.

This file is the whole analysis: one stage function ``(SplitContext) -> rows`` plus one line in the
``ANALYSES`` table of ``mesajax/registry.py``::

    "step_size": "examples.extending.step_size:step_size_stage",

The context (``mesajax.analysis.context.SplitContext``) already holds the split's full-batch
trajectories (``ctx.traj``: parameters, dictionary values and gradients at every step; the
training-loss gradient is ``ctx.traj["grads"][:, :, ctx.train_ix]``) and the exact updates
(``ctx.updates``); ``ctx.rows.add(analysis, metric, per_task_values)`` turns one value per task into
a row with its bootstrap CI (and an ``undefined`` reason when no task gives a finite value).
"""
from __future__ import annotations

import numpy as np


def step_size_stage(ctx) -> list[dict]:
  start = len(ctx.rows.rows)
  u_BxTxN = np.asarray(ctx.updates, np.float64)
  g_BxTxN = np.asarray(ctx.traj["grads"][:, :-1, ctx.train_ix], np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    s_BxT = np.linalg.norm(u_BxTxN, axis=-1) / np.linalg.norm(g_BxTxN, axis=-1)
    s_BxT = np.where(np.isfinite(s_BxT), s_BxT, np.nan)
    mean_B = np.nanmean(s_BxT, axis=1)
    cv_B = np.nanstd(s_BxT, axis=1) / mean_B
  ctx.rows.add("step_size", "effective_step", mean_B,
               undefined="the training gradient is zero at every step")
  ctx.rows.add("step_size", "effective_step_cv", cv_B,
               undefined="the training gradient is zero at every step")
  return ctx.rows.rows[start:]
