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
Expected runtime: about 2 min on an idle 2-core AMD EPYC (meta-train ~18 s, evaluate ~12 s, analyse
~81 s, report ~3 s; 4 min 12 s on a slower 2-core CPU), less on a rerun (compilation cache).
CI size: ``--config configs/quickstart.py:smoke`` shrinks everything to a few seconds.
"""
import ml_collections

from mesajax.config import base_config, get_config_with_arg


def get_config(arg=None):
  return get_config_with_arg(_config, arg, smoke_shift="n_train_x10")


def _config():
  c = base_config()  # every knob with its default (mesajax/config.py); only changes below
  c.name = "quickstart"  # the learned optimizer's name in result rows

  # Task family by registry name; only the knobs that matter here (the rest: family defaults).
  c.task.name = "linreg"
  c.task.kwargs = ml_collections.ConfigDict(dict(dim=10, n_train=20, n_val=200, noise=0.5))
  c.optimizer.name = "mlp_lopt"   # per-parameter MLP, default options

  c.meta.num_outer_steps = 2000
  c.meta.select_every = 100      # score phi on full-horizon validation runs; keep the best
  c.analysis.num_tasks = 32      # the analysis-validity work needs >= 32 tasks per CI

  # Shift suite: each entry is a named split (task knob overrides and/or a horizon multiplier).
  c.shifts = ml_collections.ConfigDict({
      "n_train_x10": {"task": {"n_train": 200}},   # large data: train ≈ validation
      "noiseless": {"task": {"noise": 0.0}},       # realisable: zero loss is reachable
      "dim_x2": {"task": {"dim": 20}},             # n_train / dim halves: more overfitting
      "horizon_x10": {"horizon_mult": 10},         # 10x longer than meta-trained on
  })
  return c
