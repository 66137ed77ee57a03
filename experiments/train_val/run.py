"""Proxy experiment 2: train versus validation — does a learned optimizer pursue the training loss
where it stood in for the validation loss, once the two part ways?

  python experiments/train_val/run.py --workdir runs/train_val [--quick] [--regenerate]
                                      [--publish DIR]

Three seed populations (five seeds each, ``configs/proxy_train_val.py``) of the per-parameter MLP
optimizer on linear regression (d = 10, label noise σ = 0.5):

* ``large_to_small``: meta-trained on the validation loss with n_train = 100 (train ≈ validation),
  shifted to n_train = 20 (``small_data``) and to σ = 2 (``label_noise``), where minimising the
  training loss overfits;
* ``small_to_large`` (the reverse): meta-trained on the validation loss with n_train = 20, where
  paying off needs regularisation, shifted to n_train = 100 (``large_data``) and σ = 0
  (``noiseless``), where regularisation only costs;
* ``train_objective``: n_train = 20 meta-trained on the training loss itself, the positive control
  (an optimizer told to pursue the proxy).

For every variant and split: the population's final validation loss beside learning-rate-tuned
SGD, SGD+momentum and Adam (tuned per split) and the Bayes-optimal ridge predictor (the oracle),
with seeds-then-tasks bootstrap CIs and paired differences; the fitted implicit-objective weights,
NCI and the inner–outer alignment of every member, of its untrained initialisation, and of tuned
Adam and SGD run through the same analyses as controls.

Writes ``DIR/results.jsonl`` (tidy rows, column ``variant``), ``DIR/README.md`` (tables and the
conclusion, generated from the rows) and ``DIR/figures/``; ``--regenerate`` rebuilds README and
figures from ``DIR/results.jsonl`` alone; ``--publish experiments/train_val`` copies them into the
repository. Full size: about 15 minutes on a 2-core CPU (README: measured); ``--quick``: the
``large_to_small`` variant at smoke size with two seeds, Adam as the only baseline and tuned
control, no quasi-static stage; the numbers mean nothing at that size.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import proxy_train_val as cfg  # noqa: E402
from experiments import common  # noqa: E402
from experiments.train_val import verdicts  # noqa: E402

CONTROLS = ("adam", "sgd")
# The analyses the tables use (the others: dense SPD metric, endpoint fit, hidden-state probes,
# are left out to fit the 15-minute budget; `python run.py analyze --workdir DIR/<variant>`
# adds them).
STAGES = ("nci", "quasi_static", "objective_fit", "alignment")
QUICK_STAGES = ("nci", "objective_fit", "alignment")
QUICK_VARIANTS = ("large_to_small",)

INTRO = (
    "How to read it: the proxy signature is a learned optimizer that matches or beats the tuned "
    "baselines on `heldout` (where it was meta-trained) and falls behind them on a shift where "
    "the training loss and the validation loss part ways, with its late descent ratio turning "
    "negative there (it keeps descending the training loss while climbing the validation loss). "
    "The baselines are retuned on every split (their tuned rate can stop early); the learned "
    "optimizer is not: that asymmetry is the point of a shift. `train_objective` is the positive "
    "control: meta-trained on the training loss itself, it should show the signature in "
    "distribution.")

FIT_ITEMS = [("objective_fit", "r2_heldout_steps"), ("objective_fit", "r2_gain_heldout_steps"),
             ("objective_fit", "w:l2"), ("objective_fit", "w:grad_norm_sq"),
             ("objective_fit", "w:outer_loss"), ("objective_fit", "w:param_error")]
ALIGN_ITEMS = [("nci", "nci"), ("alignment", "cos_u_neg_train_grad"),
               ("alignment", "cos_u_neg_outer_grad"), ("alignment", "descent_ratio_late"),
               ("alignment", "frac_outer_descent")]


def build(quick: bool) -> dict:
  names = QUICK_VARIANTS if quick else cfg.VARIANTS
  out = {}
  for name in names:
    c = cfg.get_config(f"{name},smoke" if quick else name)
    if quick:  # the CI size: as few compiled programs as possible
      c.meta.num_seeds = 2
      c.eval.baselines = CONTROLS[:1]
    out[name] = common.Variant(c, params={
        "trained_n_train": int(c.task.kwargs.n_train),
        "trained_on": str(c.meta.outer_objective)})
  return out


def report(workdir: str, rows: list, quick: bool) -> str:
  figdir = os.path.join(workdir, "figures")
  figs = [verdicts.loss_bars(rows, os.path.join(figdir, "final_loss.png")),
          common.metric_figure(rows, "alignment", "descent_ratio_late", None,
                               os.path.join(figdir, "descent_ratio_late.png"))
          if common.select(rows, analysis="alignment", metric="descent_ratio_late") else None]
  setup = (
      "Linear regression, d = 10, isotropic inputs, teacher w* ~ N(0, I/d), label noise σ = 0.5 "
      "unless a split says otherwise; ½-MSE loss; the inner optimizer sees only the training loss. "
      "Per-parameter MLP learned optimizer, meta-trained with truncated backprop for 500 outer "
      "steps (horizon 200, truncations of 20), five seeds as one compiled population; "
      "selection by full-horizon "      "validation runs except in `train_objective`, which never sees the validation loss. "
      "Baselines (SGD, SGD+momentum, Adam) have their learning rate tuned on each split's own "
      "tuning tasks by final validation loss (a tuned rate acts as early stopping); the oracle is "
      "the Bayes posterior mean (ridge with λ = σ²d). Losses: mean over 64 held-out tasks (and "
      "over seeds for the learned population) with 95% CIs, seeds-then-tasks for the population; "
      "Δ = learned − baseline on the same tasks (< 0: the learned optimizer is better)."
      + (" **--quick: smoke sizes, two seeds, one variant; the numbers mean nothing.**"
         if quick else ""))
  sections = [
      ("Setup", setup),
      ("Behavioural gap: final validation loss", common.loss_table(rows)),
      ("Validation loss averaged over the run", common.loss_table(rows, metric="mean_outer_loss")),
      ("Implicit objective (objective fit, out of sample)",
       "Updates regressed on −η_t·M·∇(Σ_k w_k φ_k) over the dictionary (training loss fixed at "
       "weight 1; `l2` = ½‖θ‖², `grad_norm_sq` = ½‖∇L_train‖², `outer_loss` = the validation "
       "loss the inner optimizer never sees, `param_error` = ½‖w − w*‖², with isotropic inputs "
       "the population excess risk). R² on "
       "held-out steps; the gain is over the training-loss-only fit, against a permutation null. "
       "Population rows: mean over members (range, members clearing the null).\n\n"
       + common.analysis_table(rows, FIT_ITEMS)),
      ("NCI and inner–outer alignment",
       "NCI: antisymmetric share of the update Jacobian (0: a gradient field). "
       "`descent_ratio_late` = Σ⟨u, ∇L_val⟩ / Σ⟨u, ∇L_train⟩ over the last quarter of the "
       "analysed steps (< 0: the update climbs the validation loss while descending the training "
       "loss: overfitting). `frac_outer_descent`: share of steps that lower the validation loss.\n\n"
       + common.analysis_table(rows, ALIGN_ITEMS)),
      ("Figures", common.figures_section(figs)),
      ("Timing (wall seconds on the machine that ran it)", common.timing_table(rows)),
  ]
  return common.write_readme(workdir, "Experiment 2: train versus validation", sections,
                             verdicts.conclusion(rows, quick, intro=INTRO,
                                                 expected=() if quick else cfg.VARIANTS))


def main(argv=None) -> int:
  # --quick: one tuned control (each adds its own compiles); the full size runs Adam and SGD.
  return common.main(__doc__, build, report, controls=CONTROLS, stages=STAGES, argv=argv,
                     quick_controls=CONTROLS[:1], quick_stages=QUICK_STAGES)


if __name__ == "__main__":
  sys.exit(main())
