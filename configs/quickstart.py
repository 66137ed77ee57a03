"""Quickstart: meta-train a per-parameter MLP optimizer on small, overfitting linear regressions.

Each task is a linear regression with fewer training points than a well-determined fit needs
(d = 10, n_train = 20, label noise 0.5); the inner optimizer sees only the training loss, while the
outer objective is the *validation* loss. A learned optimizer can therefore profit from implicit
regularisation (Metz et al. 2019/2020) — exactly the kind of mesa-objective (training loss plus a
regulariser) that the analyses are built to detect — and the shifts (ten times more data, no
noise, twice the dimension, ten times the horizon) are where that proxy and the outer objective can
part ways.

Launch (the README's main job; also what ``python run.py`` with no arguments runs):
  python run.py --config configs/quickstart.py --workdir runs/quickstart
Expected runtime: about 3 minutes on a 2-core CPU (meta-train, evaluate, analyse, report).
CI size: ``--config configs/quickstart.py:smoke`` shrinks everything to a few seconds.
"""
import ml_collections

from mesajax.config import get_config_with_arg
from mesajax.registry import optimizer_kwargs, task_kwargs


def get_config(arg=None):
  return get_config_with_arg(_config, arg)


def _config():
  c = ml_collections.ConfigDict()
  c.name = "quickstart"  # the learned optimizer's name in result rows
  c.seed = 0

  # Task family, by registry name, with its knobs (see mesajax/tasks/*.py).
  c.task = ml_collections.ConfigDict()
  c.task.name = "linreg"
  # Every knob is listed (defaults from the family), so any can be set from the command line.
  c.task.kwargs = ml_collections.ConfigDict(
      task_kwargs("linreg", dim=10, n_train=20, n_val=200, noise=0.5))

  # Optimizer to meta-train, by registry name, with its static options.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "mlp_lopt"
  c.optimizer.kwargs = ml_collections.ConfigDict(optimizer_kwargs("mlp_lopt"))

  # Meta-training (mesajax/meta/).
  c.meta = ml_collections.ConfigDict()
  c.meta.num_tasks = 32          # task batch (sharded over devices)
  c.meta.horizon = 200           # inner horizon T of every task
  c.meta.unroll_length = 20      # truncation length K (T % K == 0)
  c.meta.estimator = "tbptt"     # tbptt | es | pes
  c.meta.sigma = 0.01            # ES/PES perturbation std
  c.meta.outer_objective = "mean_outer"  # mean_train | mean_outer | final_outer
  c.meta.loss_transform = "clip"  # clip (normalise by the initial loss, clip at 1) | log | none
  c.meta.outer_lr = 3e-3
  c.meta.outer_clip = 1.0        # global-norm clip of the meta-gradient (0: off)
  c.meta.num_outer_steps = 2000
  c.meta.num_devices = 1         # task-batch axis sharded over this many devices
  c.meta.select_every = 100     # score phi on full-horizon validation runs; keep the best (0: off)
  c.meta.select_tasks = 64       # validation tasks for that selection (own key stream)
  c.meta.log_every = 20
  c.meta.checkpoint_every = 250

  # Held-out evaluation (mesajax/eval/).
  c.eval = ml_collections.ConfigDict()
  c.eval.num_tasks = 64          # held-out tasks
  c.eval.num_tuning_tasks = 32   # separate tasks for the baselines' learning-rate grid search
  c.eval.baselines = ("sgd", "sgdm", "adam")
  c.eval.lr_grid_min = 1e-5
  c.eval.lr_grid_max = 3.0
  c.eval.lr_grid_size = 16
  c.eval.curve_every = 5
  c.eval.n_boot = 1000

  # Mesa-objective analyses (mesajax/analysis/).
  c.analysis = ml_collections.ConfigDict()
  c.analysis.num_tasks = 16
  c.analysis.num_steps = 100     # trajectory length for objective fit / alignment / probes
  c.analysis.num_points = 4      # points per trajectory for the Jacobian analyses
  c.analysis.num_probes = 64     # Gaussian probe pairs per point (NCI estimators)
  c.analysis.n_boot = 1000

  # Shift suite: each entry is a named split (task knob overrides and/or a horizon multiplier).
  c.shifts = ml_collections.ConfigDict({
      "n_train_x10": {"task": {"n_train": 200}},   # large data: train ≈ validation
      "noiseless": {"task": {"noise": 0.0}},       # realisable: zero loss is reachable
      "dim_x2": {"task": {"dim": 20}},             # n_train / dim halves: more overfitting
      "horizon_x10": {"horizon_mult": 10},         # 10x longer than meta-trained on
  })
  return c
