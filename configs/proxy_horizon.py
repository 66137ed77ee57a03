"""Proxy objectives, experiment 3 (horizon): meta-train on a short inner horizon, evaluate at ten
times that horizon; beside it, Wu et al. 2018's short-horizon bias as a known answer.

Both parts use noisy rotated quadratics (``mesajax/tasks/quadratic.py``: d = 8, condition number
100, optimum θ* ~ N(0, I), θ₀ = 0, additive Gaussian gradient noise of std 0.3 per coordinate).

* ``get_config()``: the per-parameter MLP optimizer (a 5-seed population) meta-trained with an
  inner horizon of T = 20 steps on the mean validation loss; the shift ``horizon_x10`` runs the
  same tasks for 200 steps. A short horizon rewards whatever lowers the loss quickly (the proxy)
  and never shows what happens after step 20, where the noise floor and slow directions dominate.
* ``wu_schedule_config(full=...)``: a piecewise-constant schedule (``sgd_schedule``, 10 pieces over
  T = 100, gradient noise 0.1) meta-trained greedily (truncations of one piece) or on full unrolls:
  Wu et al.'s short-horizon bias for schedules, with closed forms in ``experiments/horizon/wu.py``.
* ``wu_config()``: SGD whose only meta-parameter is log η (``sgd``, ``LogLearningRate``),
  meta-trained on the final outer loss of a T = 10-step horizon (full unrolls, no truncation,
  ``loss_transform = none``), evaluated at 10 T. The expected meta-objective has a closed form
  (``experiments/horizon/wu.py``), which gives the learning rate meta-training should find and the
  best learning rate for the long horizon.

Launch (the whole experiment):
  python experiments/horizon/run.py --workdir runs/horizon [--quick]
One part alone:
  python run.py --config configs/proxy_horizon.py --workdir runs/proxy_horizon
Expected runtime: the whole experiment (lopt, wu, wu_greedy, wu_full) 3 min 50 s on a 2-core CPU
at load ≈ 2 (2026-11-29; per-variant times in experiments/horizon/README.md).
CI size: ``--config configs/proxy_horizon.py:smoke``.
"""
import ml_collections

from mesajax.config import base_config, get_config_with_arg

T_SHORT_LOPT = 20
T_SHORT_WU = 10
T_SCHEDULE = 100      # horizon of the schedule part (Wu et al.'s schedules)
WU_PIECES = 10        # pieces of the meta-learned schedule (10 steps each)
WU_SCHEDULE_NOISE = 0.1
HORIZON_MULT = 10
STAGES = ("nci", "objective_fit", "alignment")
TASK = dict(dim=8, cond=100.0, eig_max=1.0, optimum_scale=1.0, init_scale=0.0, noise=0.3)


def get_config(arg=None):
  return get_config_with_arg(_config, arg, smoke_shift="horizon_x10")


def wu_config(arg=None):
  return get_config_with_arg(_wu_config, arg, smoke_shift="horizon_x10")


def wu_schedule_config(arg=None, full: bool = False):
  """A learning-rate *schedule* meta-trained greedily (``full=False``: truncations of one piece) or
  on the final loss of the whole horizon (``full=True``: full unrolls)."""
  return get_config_with_arg(lambda: _wu_schedule_config(full), arg, smoke_shift="horizon_x10")


def _common(c):
  c.seed = 0
  c.task.name = "quadratic"
  c.task.kwargs = ml_collections.ConfigDict(dict(TASK))
  c.meta.num_seeds = 5
  c.eval.num_tasks = 64
  c.eval.num_tuning_tasks = 32
  c.eval.curve_every = 10
  c.eval.n_boot = 500
  c.shifts = ml_collections.ConfigDict({"horizon_x10": {"horizon_mult": HORIZON_MULT}})
  return c


def _config():
  c = _common(base_config())
  c.name = "lopt"
  c.optimizer.name = "mlp_lopt"
  c.meta.num_tasks = 16
  c.meta.horizon = T_SHORT_LOPT
  c.meta.unroll_length = T_SHORT_LOPT
  c.meta.num_outer_steps = 300
  c.meta.select_every = 100
  c.meta.select_tasks = 32
  c.meta.checkpoint_every = 100
  c.eval.baselines = ("sgd", "adam")
  c.eval.lr_grid_min = 1e-4
  c.eval.lr_grid_max = 3.0
  c.eval.lr_grid_size = 12
  c.analysis.num_tasks = 32
  c.analysis.num_steps = 20
  c.analysis.num_points = 2
  c.analysis.num_perms = 20      # 20 draws: the smallest p is 1/21 < 0.05 (10 could never clear)
  c.analysis.n_boot = 500
  c.analysis.controls = ("noise_update",)
  return c


def _meta_learned_rate(c):
  """What the two Wu et al. parts share: meta-train on the final outer loss, untransformed (its
  expectation is the closed form of ``experiments/horizon/wu.py``), meta-gradients unclipped, the
  last φ kept (no selection: no extra bias); evaluation beside SGD tuned on a grid up to the
  stability edge."""
  c.meta.outer_objective = "final_outer"
  c.meta.loss_transform = "none"
  c.meta.outer_lr = 0.03
  c.meta.outer_clip = 0.0
  c.meta.select_every = 0
  c.eval.baselines = ("sgd",)
  c.eval.lr_grid_min = 1e-3
  c.eval.lr_grid_max = 1.9
  c.eval.lr_grid_size = 24
  return c


def _wu_config():
  c = _common(base_config())
  c.name = "meta_sgd"
  c.optimizer.name = "sgd"
  c.optimizer.kwargs = ml_collections.ConfigDict(dict(learning_rate=0.1))  # initial η
  c.meta.num_tasks = 64
  c.meta.horizon = T_SHORT_WU
  c.meta.unroll_length = T_SHORT_WU         # full unrolls: the objective is exactly R_T(η)
  c.meta.num_outer_steps = 400
  c.meta.checkpoint_every = 200
  return _meta_learned_rate(c)


def _wu_schedule_config(full: bool):
  """Wu et al. 2018's short-horizon bias for schedules: ``sgd_schedule`` (K = 10 pieces of 10 steps
  over T = 100) on the same quadratics with gradient noise 0.1 (at 0.3 the noise floor reached
  within a piece dominates both objectives and the two schedules differ less), meta-trained either
  with truncations of one piece and the loss at each truncation's end (greedy: each piece is
  optimised for the loss 10 steps ahead) or with full 100-step unrolls (each piece for the final
  loss). Closed forms of both: ``experiments/horizon/wu.py``."""
  c = _common(base_config())
  c.name = "sched_full" if full else "sched_greedy"
  c.task.kwargs.noise = WU_SCHEDULE_NOISE
  c.optimizer.name = "sgd_schedule"
  c.optimizer.kwargs = ml_collections.ConfigDict(dict(learning_rate=0.1, num_buckets=WU_PIECES))
  c.meta.num_tasks = 128
  c.meta.horizon = T_SCHEDULE
  c.meta.unroll_length = T_SCHEDULE if full else T_SCHEDULE // WU_PIECES
  c.meta.num_outer_steps = 600
  c.meta.checkpoint_every = 300
  return _meta_learned_rate(c)
