"""Proxy experiment 2, train versus validation: where the training loss stands in for the outer
(validation) loss, and where it stops doing so.

Linear regression (``linreg``: d = 10, isotropic Gaussian inputs, teacher w* ~ N(0, I/d), label
noise σ; loss ½ mean squared error). The inner optimizer only ever sees the training loss; the
outer objective is the mean validation loss over each truncation (``mean_outer``). How well the
training loss stands in for it depends on the regime: with n_train = 10·d points, ordinary least
squares ends only ≈ σ²d/(2(n − d − 1)) above the noise floor σ²/2 (train ≈ validation), while with
n_train = 2·d, or much more label noise, minimising the training loss overfits.

Variants (``get_config("VARIANT")``; ``experiments/train_val/run.py`` runs all three):

* ``large_to_small`` (default): meta-trained on the validation loss in the large-data regime
  (n_train = 100, σ = 0.5), where train and validation losses move together; shifted to small data
  (``small_data``: n_train = 20) and to label noise (``label_noise``: σ = 2, n_train = 100), where
  minimising the training loss overfits.
* ``small_to_large`` (the reverse): meta-trained on the validation loss in the small-data regime
  (n_train = 20, σ = 0.5), where paying off needs regularisation; shifted to large data
  (``large_data``: n_train = 100) and to noiseless labels (``noiseless``: σ = 0), where
  regularisation only costs.
* ``train_objective``: the small-data regime meta-trained on the *training* loss (``mean_train``):
  an optimizer told to pursue the proxy, the positive control for the analyses.

Each variant meta-trains five seeds as one compiled population (``meta.num_seeds = 5``).

Launch (one variant through the main job; the experiment script adds the tables and figures):
  python run.py --config configs/proxy_train_val.py:small_to_large --workdir runs/tv_small
  python experiments/train_val/run.py --workdir runs/train_val [--quick]
Expected runtime: the whole experiment (three variants × 5 seeds) 14 min 38 s on a 2-core CPU at
load 1.5–3 (2026-11-29; per-variant times in experiments/train_val/README.md).
CI size: ``configs/proxy_train_val.py:smoke`` (or ``:VARIANT,smoke``) shrinks everything to seconds.
"""
import ml_collections

from mesajax.config import get_config_with_arg

VARIANTS = ("large_to_small", "small_to_large", "train_objective")
DIM, NOISE, SMALL_N, LARGE_N = 10, 0.5, 20, 100


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
  c.name = "train_val"  # the same row name in every variant (tables join variants on it)
  large = variant == "large_to_small"
  c.task.name = "linreg"
  c.task.kwargs = ml_collections.ConfigDict(
      dict(dim=DIM, n_train=LARGE_N if large else SMALL_N, n_val=200, noise=NOISE))
  c.meta.outer_objective = "mean_train" if variant == "train_objective" else "mean_outer"
  # Selection scores phi by the validation loss: off for the variant that must never see it.
  c.meta.select_every = 0 if variant == "train_objective" else 100
  c.meta.num_seeds = 5
  c.meta.num_outer_steps = 500   # the 15-minute budget; selection keeps the best phi
  c.eval.num_tasks = 64
  c.analysis.num_tasks = 32
  c.analysis.num_perms = 20
  if large:
    shifts = {"small_data": {"task": {"n_train": SMALL_N}},   # n = 2d: OLS overfits
              "label_noise": {"task": {"noise": 2.0}}}        # σ x4: ridge's λ* = σ²d = 40
  else:
    shifts = {"large_data": {"task": {"n_train": LARGE_N}},   # train ≈ validation
              "noiseless": {"task": {"noise": 0.0}}}          # realisable: no regulariser helps
  c.shifts = ml_collections.ConfigDict(shifts)
  return c
