"""Proxy experiment 4, scale: meta-trained on small problems, shifted to a larger dimension or a
wider network.

A learned optimizer meta-trained at one size can learn a rule that is only right at that size —
for instance a step length in parameter units, when the distance to a good solution per coordinate
shrinks as the dimension grows — while the outer objective is the same at every size. Learned
optimizers are known to degrade on models larger than they were meta-trained on (VeLO beyond
~5e8 parameters; Metz et al. 2022).

Variants (``get_config("VARIANT")``; ``experiments/scale/run.py`` runs both):

* ``dim`` (default): linear regression (``linreg``) at d = 10 with n_train = 4·d = 40 and label
  noise σ = 0.5, shifted to d = 20 and d = 40 with n_train = 4·d (the ratio n/d, and so the
  spectrum of the training Hessian and the amount of overfitting, stays the same: only the size
  changes). The teacher is w* ~ N(0, I/d), so the loss scale does not depend on d but each weight
  of the solution shrinks as 1/√d.
* ``width``: a one-hidden-layer MLP student (``mlp``: 8 inputs, 4 classes, tanh, width 8,
  108 parameters) on a random-MLP teacher's labels, shifted to widths 32 and 64 (420 and 836
  parameters).

Both meta-train on the validation loss (``mean_outer``) with five seeds as one compiled
population (``meta.num_seeds = 5``).

Launch (one variant through the main job; the experiment script adds the tables and figures):
  python run.py --config configs/proxy_scale.py:width --workdir runs/scale_width
  python experiments/scale/run.py --workdir runs/scale [--quick]
Expected runtime: over the 15-minute budget (2026-11-29, 2-core CPU): ``dim`` 9.5 min (its
analyses 6.5 min of it); ``width`` 8 min to meta-train and 2 min to evaluate, and its analyses
(widths up to 64: 836 parameters, matrix-free quasi-static reduction) did not finish within 25
minutes beside other jobs. See experiments/scale/README.md.
CI size: ``configs/proxy_scale.py:smoke`` (or ``:VARIANT,smoke``) shrinks everything to seconds.
"""
import ml_collections

from mesajax.config import get_config_with_arg

VARIANTS = ("dim", "width")
DIM, N_PER_DIM = 10, 4
WIDTH = 8


def get_config(arg=None):
  """``arg``: ``""``, ``"smoke"``, a variant name, or ``"VARIANT,smoke"``."""
  parts = [p for p in (arg or "").split(",") if p]
  variants = [p for p in parts if p in VARIANTS]
  rest = [p for p in parts if p not in VARIANTS]
  if len(variants) > 1 or len(rest) > 1 or (rest and rest[0] != "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; use one of {list(VARIANTS)}, "
                     f"optionally followed by ',smoke'")
  variant = variants[0] if variants else VARIANTS[0]
  return get_config_with_arg(lambda: _config(variant), "smoke" if rest else None)


def _config(variant: str):
  from configs import quickstart
  c = quickstart.get_config()  # the quickstart's meta-training and analysis sizes
  c.name = "scale"  # the same row name in every variant (tables join variants on it)
  c.meta.outer_objective = "mean_outer"
  c.meta.num_seeds = 5
  c.meta.num_outer_steps = 500   # the 15-minute budget; selection keeps the best phi
  c.meta.select_every = 100
  c.eval.num_tasks = 64
  c.analysis.num_tasks = 32
  if variant == "dim":
    c.task.name = "linreg"
    c.task.kwargs = ml_collections.ConfigDict(
        dict(dim=DIM, n_train=N_PER_DIM * DIM, n_val=200, noise=0.5))
    shifts = {f"dim_x{m}": {"task": {"dim": m * DIM, "n_train": m * N_PER_DIM * DIM}}
              for m in (2, 4)}
  else:
    c.task.name = "mlp"
    c.task.kwargs = ml_collections.ConfigDict(
        dict(dim=8, n_classes=4, width=WIDTH, depth=1, teacher_width=32, n_train=256,
             n_val=512, batch_size=32))
    shifts = {f"width_x{m}": {"task": {"width": m * WIDTH}} for m in (4, 8)}
  c.shifts = ml_collections.ConfigDict(shifts)
  return c
