"""Proxy objectives, experiment 1 (optimum location): meta-train where "stay near the
initialisation" is a good proxy, then move every optimum far away.

Training tasks are rotated quadratics ``f(θ) = ½(θ − θ*)ᵀA(θ − θ*)`` (``mesajax/tasks/quadratic.py``,
d = 8, condition number 10) started at θ₀ = 0. A task's optimum is near the initialisation,
θ* = 0.1·N(0, I), except for a fraction ``far_frac`` of tasks whose optimum is far, θ* = 3·N(0, I).
The learned optimizer (per-parameter MLP, ``mlp_lopt``) sees the parameter value among its
features, so it can learn to pull θ toward 0 = θ₀: the proxy "shrink toward the initialisation"
(the dictionary term ½‖θ − θ₀‖², here equal to ½‖θ‖² because θ₀ = 0) coincides with the loss when
every optimum is near and parts from it when the optimum is far (Langosco et al. 2022, goal
misgeneralization). The shift ``all_far`` sets ``far_frac = 1``.

``get_config()`` is the ``far_frac = 0`` variant; ``experiments/optimum_location/run.py`` sweeps
``far_frac`` over 0, 0.05, 0.2, 0.5 (5 meta-training seeds each, one compiled population).

Launch (the whole experiment):
  python experiments/optimum_location/run.py --workdir runs/optimum_location [--quick]
One variant alone:
  python run.py --config configs/proxy_optimum.py --workdir runs/proxy_optimum
Expected runtime: the whole experiment (4 variants × 5 seeds) 6 min 5 s on a 2-core CPU at load
≈ 1.5 (2026-11-29; per-variant times in experiments/optimum_location/README.md).
CI size: ``--config configs/proxy_optimum.py:smoke`` runs in well under a minute.
"""
import ml_collections

from mesajax.config import base_config, get_config_with_arg

NEAR_SCALE = 0.1   # spread of a near optimum around θ₀ = 0
FAR_SCALE = 3.0    # spread of a far optimum
STAGES = ("nci", "objective_fit", "alignment")  # analyses the experiment reports


def get_config(arg=None):
  return get_config_with_arg(_config, arg, smoke_shift="all_far")


def _config():
  c = base_config()
  c.name = "lopt"
  c.seed = 0
  c.task.name = "quadratic"
  c.task.kwargs = ml_collections.ConfigDict(dict(
      dim=8, cond=10.0, optimum_scale=NEAR_SCALE, far_scale=FAR_SCALE, far_frac=0.0,
      init_scale=0.0))
  c.optimizer.name = "mlp_lopt"

  c.meta.num_seeds = 5           # meta-training seeds, one compiled population
  c.meta.num_tasks = 16
  c.meta.horizon = 100
  c.meta.unroll_length = 20
  c.meta.num_outer_steps = 300
  c.meta.select_every = 100      # keep the phi that scores best on full-horizon validation runs
  c.meta.select_tasks = 32
  c.meta.log_every = 20
  c.meta.checkpoint_every = 100

  c.eval.num_tasks = 64
  c.eval.num_tuning_tasks = 32
  c.eval.baselines = ("sgd", "adam")
  c.eval.lr_grid_min = 1e-4
  c.eval.lr_grid_max = 10.0
  c.eval.lr_grid_size = 11
  c.eval.curve_every = 10
  c.eval.n_boot = 500

  c.analysis.num_tasks = 32
  c.analysis.num_steps = 40
  c.analysis.num_points = 2
  c.analysis.num_perms = 20      # 20 draws: the smallest p is 1/21 < 0.05 (10 could never clear)
  c.analysis.n_boot = 500
  c.analysis.controls = ("noise_update",)

  c.shifts = ml_collections.ConfigDict({
      "all_far": {"task": {"far_frac": 1.0}},   # every optimum far from the initialisation
  })
  return c
