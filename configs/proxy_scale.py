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
  108 parameters) on a random-MLP teacher's labels, shifted to widths 16 and 32 (212 and 420
  parameters).

Both meta-train on the validation loss (``mean_outer``, per step log(L/L0)) with five seeds as one
compiled population (``meta.num_seeds = 5``). The sizes below (outer steps, task batch, analysis
tasks, points and coordinates) are what fits the experiment in 15 minutes on a 2-core CPU; each
is commented with what it trades away.

Launch (one variant through the main job; the experiment script adds the tables and figures):
  python run.py --config configs/proxy_scale.py:width --workdir runs/scale_width
  python experiments/scale/run.py --workdir runs/scale [--quick]
Expected runtime: 14 min (13 min 59 s on a 2-core CPU, 2026-11-29, jax 0.10.2, nothing else
running): ``dim`` 5 min (meta-train 43 s, evaluate 30 s, analyses 178 s, tuned controls 48 s),
``width`` 8.8 min (meta-train 133 s, evaluate 99 s, analyses 225 s, tuned controls 72 s).
CI size: ``configs/proxy_scale.py:smoke`` (or ``:VARIANT,smoke``) shrinks everything to seconds.
"""
import ml_collections

from mesajax.config import get_config_with_arg

VARIANTS = ("dim", "width")
DIM, N_PER_DIM = 10, 4
WIDTH = 8
WIDTH_MULTS = (2, 4)
FIT_COORDS = 40


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
  # log(L/L0) instead of the quickstart's min(L/L0, 1): the clipped objective is flat wherever every
  # step's loss is above its initial value, and one of five width members (seed 2) started there and
  # never received a meta-gradient (meta-loss exactly 1.0 for 500 outer steps).
  c.meta.loss_transform = "log"
  c.meta.num_seeds = 5
  # 300 outer steps (the quickstart: 2000): the members' selection scores move by about 1% after
  # step 300 at d = 10 (0.3175 -> 0.3144 by step 500, measured); selection keeps the best phi.
  c.meta.num_outer_steps = 300
  c.meta.select_every = 100
  c.eval.num_tasks = 64
  # 16 analysis tasks per split (the quickstart: 32): the objective fit and its 20-draw permutation
  # null dominate this experiment's cost (12 analysed optimizers per split), and 16 tasks keep the
  # whole experiment within 15 minutes; the CIs over tasks are correspondingly wider.
  c.analysis.num_tasks = 16
  c.analysis.qs_fit_steps = 12   # steps per task at which u-bar is solved for its fit (default 25)
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
    shifts = {f"width_x{m}": {"task": {"width": m * WIDTH}} for m in WIDTH_MULTS}
    c.meta.num_tasks = 16          # half the quickstart's task batch: an MLP step costs more
    # 200 outer steps: selection scores 0.2649 (step 100), 0.2505 (200), 0.2464 (300), measured.
    c.meta.num_outer_steps = 200
    # The objective fit on a fixed random subset of FIT_COORDS coordinates at every width (the
    # same estimator at every size: w is K numbers fitted from sums over coordinates), and no
    # quasi-static reduction (its dense d_s x d_s solves at d_s = 3 n_params, 636 floats at width
    # x2, would take most of the budget): NCI and the fit are on the raw update.
    c.analysis.fit_max_coords = FIT_COORDS
    c.analysis.qs_max_state = 0
    c.analysis.qs_matfree = False
    # The Jacobian analyses at 2 points of 50-step trajectories, dense up to 128 parameters (the
    # meta-training width) and with 64 Gaussian probe pairs above: at 4 points of 100 steps, dense
    # at every width, the Jacobian points took 8 of the 12 minutes the analyses measured (the
    # width x4 split alone 7.4 minutes).
    c.analysis.num_steps = 50
    c.analysis.num_points = 2
    c.analysis.dense_max = 128
  c.shifts = ml_collections.ConfigDict(shifts)
  return c
