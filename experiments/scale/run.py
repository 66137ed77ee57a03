"""Proxy experiment 4: scale — does a learned optimizer meta-trained on small problems keep pursuing
the outer objective on a larger dimension or a wider network?

  python experiments/scale/run.py --workdir runs/scale [--quick] [--regenerate] [--publish DIR]

Two seed populations (five seeds each, ``configs/proxy_scale.py``) of the per-parameter MLP
optimizer, meta-trained on the validation loss:

* ``dim``: linear regression at d = 10 (n_train = 4·d, σ = 0.5), shifted to d = 20 and 40 at the
  same n_train / d (only the size changes; each weight of the solution shrinks as 1/√d);
* ``width``: a one-hidden-layer MLP student of width 8 on a random teacher's labels, shifted to
  widths 16 and 32.

For every variant and split: the population's final validation loss beside learning-rate-tuned
SGD, SGD+momentum and Adam (retuned per split; the learned optimizer is not), with seeds-then-tasks
bootstrap CIs and paired differences; the fitted implicit-objective weights, NCI and alignment of
every member, its untrained initialisation and tuned Adam and SGD as controls.

Writes ``DIR/results.jsonl``, ``DIR/README.md`` and ``DIR/figures/`` (generated from the rows);
``--regenerate`` rebuilds README and figures from the rows alone; ``--publish experiments/scale``
copies them into the repository. Full size: 14 min on a 2-core CPU (measured: README, timing);
``--quick``: the ``dim`` variant at smoke size with two seeds, Adam as the only baseline and
tuned control, no quasi-static stage; the numbers mean nothing at that size.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import proxy_scale as cfg  # noqa: E402
from experiments import common  # noqa: E402
from experiments.train_val import verdicts  # noqa: E402

CONTROLS = ("adam", "sgd")
# The analyses the tables use (the others: dense SPD metric, endpoint fit, hidden-state probes,
# are left out to fit the 15-minute budget; `python run.py analyze --workdir DIR/<variant>`
# adds them).
STAGES = ("nci", "quasi_static", "objective_fit", "alignment")
QUICK_STAGES = ("nci", "objective_fit", "alignment")
QUICK_VARIANTS = ("dim",)

INTRO = (
    "How to read it: a size proxy shows as a learned optimizer that matches or beats the tuned "
    "baselines at the meta-training size (`heldout`) and falls behind them as the dimension or "
    "width grows, with its update turning away from −∇L_val (cosine) or its effective step "
    "mis-scaled. The baselines are retuned at every size; the learned optimizer is not.")

FIT_ITEMS = [("objective_fit", "r2_heldout_steps"), ("objective_fit", "r2_gain_heldout_steps"),
             ("objective_fit", "w:l2"), ("objective_fit", "w:grad_norm_sq")]
ALIGN_ITEMS = [("nci", "nci"), ("alignment", "cos_u_neg_train_grad"),
               ("alignment", "cos_u_neg_outer_grad"), ("alignment", "descent_ratio_late"),
               ("quasi_static", "effective_step")]


def build(quick: bool) -> dict:
  names = QUICK_VARIANTS if quick else cfg.VARIANTS
  out = {}
  for name in names:
    c = cfg.get_config(f"{name},smoke" if quick else name)
    if quick:  # the CI size: as few compiled programs as possible
      c.meta.num_seeds = 2
      c.eval.baselines = CONTROLS[:1]
    out[name] = common.Variant(c, params={"family": str(c.task.name)})
  return out


def size_note(rows) -> str:
  """The parameter count of each split, from the analysis rows' dimension where present."""
  return ("Splits: `heldout` is the meta-training size; `dim_xM` multiplies d and n_train by M; "
          "`width_xM` multiplies the student's hidden width by M.")


def report(workdir: str, rows: list, quick: bool) -> str:
  figdir = os.path.join(workdir, "figures")
  figs = [verdicts.loss_bars(rows, os.path.join(figdir, "final_loss.png")),
          common.metric_figure(rows, "alignment", "cos_u_neg_outer_grad", None,
                               os.path.join(figdir, "cos_u_neg_outer_grad.png"))
          if common.select(rows, analysis="alignment", metric="cos_u_neg_outer_grad") else None]
  cd, cw = cfg.get_config("dim"), cfg.get_config("width")
  setup = (
      "Per-parameter MLP learned optimizer meta-trained with truncated backprop on the validation "
      f"loss (per step log(L/L0), `meta.loss_transform = {cd.meta.loss_transform!r}`; horizon "
      f"{cd.meta.horizon}, truncations of {cd.meta.unroll_length}), {cd.meta.num_seeds} seeds as "
      "one compiled population, selection by full-horizon validation runs: `dim` "
      f"{cd.meta.num_outer_steps} outer steps on {cd.meta.num_tasks} tasks per step, `width` "
      f"{cw.meta.num_outer_steps} on {cw.meta.num_tasks}. `dim`: linear regression, isotropic "
      "inputs, w* ~ N(0, I/d), σ = 0.5, n_train = 4d. `width`: MLP student (8 inputs, one tanh "
      "hidden layer, 4 classes) on a random tanh-MLP teacher's labels, 256 training rows, "
      "minibatches of 32. Baselines (SGD, SGD+momentum, Adam) are retuned on each split's own "
      "tuning tasks. " + size_note(rows) + f" Losses: mean over {cd.eval.num_tasks} held-out "
      "tasks (and seeds) with 95% CIs; Δ = learned − baseline on the same tasks (< 0: the learned "
      f"optimizer is better). Analyses on {cd.analysis.num_tasks} tasks per split; at every "
      f"width the objective fit uses the same {cw.analysis.fit_max_coords} randomly chosen "
      "coordinates (column `fit_coords` of the rows), and `width` runs no quasi-static reduction "
      "(its dense solves would take most of the 15-minute budget): its NCI and fit are on the "
      "raw update."
      + (" **--quick: smoke sizes, two seeds, one variant; the numbers mean nothing.**"
         if quick else ""))
  sections = [
      ("Setup", setup),
      ("Behavioural gap: final validation loss", common.loss_table(rows)),
      ("Validation loss averaged over the run", common.loss_table(rows, metric="mean_outer_loss")),
      ("Implicit objective (objective fit, out of sample)",
       "Training loss fixed at weight 1; `l2` = ½‖θ‖², `grad_norm_sq` = ½‖∇L_train‖². R² on "
       "held-out steps; the gain is over the training-loss-only fit, against a permutation null.\n\n"
       + common.analysis_table(rows, FIT_ITEMS)),
      ("NCI, alignment and effective step",
       "`effective_step`: the quasi-static effective step size of the update (stateful "
       "optimizers); `cos_u_neg_outer_grad`: mean cosine of the update with −∇L_val.\n\n"
       + common.analysis_table(rows, ALIGN_ITEMS)),
      ("Figures", common.figures_section(figs)),
      ("Timing (wall seconds on the machine that ran it)", common.timing_table(rows)),
  ]
  return common.write_readme(workdir, "Experiment 4: scale", sections,
                             verdicts.conclusion(rows, quick, intro=INTRO,
                                                 expected=() if quick else cfg.VARIANTS))


def main(argv=None) -> int:
  # --quick: one tuned control (each adds its own compiles); the full size runs Adam and SGD.
  return common.main(__doc__, build, report, controls=CONTROLS, stages=STAGES, argv=argv,
                     quick_controls=CONTROLS[:1], quick_stages=QUICK_STAGES)


if __name__ == "__main__":
  sys.exit(main())
