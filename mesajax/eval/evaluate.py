"""Held-out evaluation: full-horizon inner runs on unseen tasks, with bootstrap CIs over tasks.

For each split (``mesajax.splits``) the held-out tasks and the per-task init / minibatch keys come
from ``purpose_key(seed, "heldout", split)``, a stream that meta-training and tuning never use, and
are the *same* for every optimizer (common random numbers, so differences are paired by task). Each
optimizer runs for the split's full horizon T, vmapped over tasks (``mesajax.rollout.run_curve``;
in ``evaluate_all`` the learned optimizer and the tuned baselines of a split share one compiled
program, compiled once per set of optimizers / family / horizon / task count), recording the
full-batch outer loss L_out every ``curve_every`` steps: points t = 0, e, 2e, ..., T. Tasks and
their initial points are drawn once per split (``tasks.views.prepare_tasks`` / ``tasks.views.PresetInit``)
and shared by all optimizers and by every compiled run.

Per task m the metrics are

  final_outer_loss_m = L_out(theta_T),
  mean_outer_loss_m  = mean over the recorded points t = 0, e, ..., T of L_out(theta_t),
  diverged_m         = [L_out(theta_T) non-finite  or  L_out(theta_T) > 100 · L_out(theta_0)],
  overfit_m          = [not diverged  and  L_out(theta_T) > L_out(theta_0)],

and each is reported as its mean over tasks with a 95% percentile bootstrap CI over tasks
(``stats.bootstrap_ci``: non-finite losses count as +inf). Curve rows (analysis ``eval_curve``,
metric ``outer_loss``, extra key ``step``) hold the mean over tasks at each recorded step with a
95% bootstrap CI of that mean (same task resamples at every step).

``evaluate_all`` adds hand-designed baselines, each with its learning rate tuned per split on
separate tuning tasks (``mesajax.eval.tuning``), and paired comparisons of the learned optimizer
against each baseline on the same tasks (analysis ``eval_paired``, extra key ``baseline``):
``final_outer_loss_diff`` = mean_m (L_learned,m - L_baseline,m) with its bootstrap CI, and
``win_frac`` = the fraction of tasks on which the learned optimizer ends strictly lower.

Every row carries ``role``: ``learned`` or ``baseline`` (from the optimizer class's ``learned``
attribute) or ``oracle``. Where the task family has an oracle (``TaskFamily.oracle``), its outer
loss on the same held-out tasks is a reference row (optimizer ``oracle``) and the learned
optimizer's paired gap to it an ``eval_paired`` row (``gap_to_oracle``): every table shows the gap
to the best achievable loss.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mesajax.eval import stats, tuning
from mesajax.splits import purpose_keys, purpose_tasks
from mesajax.tasks.views import PresetInit, prepare_tasks
from mesajax.registry import make_optimizer
from mesajax.report.rows import make_row
from mesajax.rollout import run_curve

PyTree = Any


def role(opt) -> str:
  """The default row label of an optimizer, from its class (the one place that knows):
  ``learned`` or ``baseline``. ``evaluate_all`` labels the meta-trained optimizer of a run
  ``learned`` whatever its class (a meta-trained learning rate is learned too), its tuned
  baselines ``baseline``, and oracle rows ``oracle``."""
  return "learned" if getattr(opt, "learned", False) else "baseline"


@functools.partial(jax.jit, static_argnames=("opts", "family", "horizon", "every"))
def _run_tasks(opts, phis, family, tasks, keys, horizon, every):
  """Outer-loss curves ``[M, T // every + 1]`` on ``M`` tasks for each optimizer of ``opts``, in one
  compiled program (compiling several optimizers together is cheaper than one by one)."""
  def curves(opt, phi):
    def one(task, key):
      return run_curve(opt, phi, family, task, key, horizon, horizon, every)["outer_loss"]
    return jax.vmap(one)(tasks, keys)
  return tuple(curves(o, p) for o, p in zip(opts, phis))


def heldout_tasks(family, num_tasks: int, seed: int, split_name: str):
  """``(prepared, run_keys)``: the split's held-out tasks (``prepared["task"]``, as
  ``family.sample_batch`` would draw them from ``purpose_key(seed, "heldout", split_name)``), their
  initial points and init / minibatch keys (``tasks.views.PresetInit``)."""
  return purpose_tasks(family, seed, "heldout", split_name, num_tasks)


def split_tasks(split, cfg_eval, seed: int):
  """``{"tune": (prepared, keys), "heldout": (prepared, keys)}`` for one split, prepared in one call
  (the same as ``tuning.tuning_tasks`` / ``heldout_tasks``; one sampler compile per split)."""
  n_tune, n_held = int(cfg_eval.num_tuning_tasks), int(cfg_eval.num_tasks)
  tk_tune, rk_tune = purpose_keys(seed, "tune", split.name, n_tune)
  tk_held, rk_held = purpose_keys(seed, "heldout", split.name, n_held)
  tasks = prepare_tasks(split.family, jnp.concatenate([tk_tune, tk_held]),
                               jnp.concatenate([rk_tune, rk_held]))
  take = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], tasks)  # noqa: E731
  return {"tune": (take(0, n_tune), rk_tune), "heldout": (take(n_tune, n_tune + n_held), rk_held)}


def _metric_rows(per_task: Mapping[str, np.ndarray], opt_name, split, cfg_eval, seed, kind,
                 analysis="eval"):
  rows = []
  for metric, values in per_task.items():
    v, lo, hi = stats.bootstrap_ci(values, n_boot=int(cfg_eval.n_boot), seed=seed)
    rows.append(make_row(analysis, split.name, opt_name, metric, v, lo, hi, n=len(values),
                         horizon=split.horizon, role=kind))
  return rows


def evaluate(opt, phi: PyTree, opt_name: str, split, cfg_eval, seed: int, tasks=None):
  """Runs ``opt`` with ``phi`` on the held-out tasks of ``split`` for its full horizon.

  ``tasks``: optional precomputed ``heldout_tasks(split.family, cfg_eval.num_tasks, seed, split.name)``.
  Returns ``(rows, curves)``: tidy rows (module docstring) and a dict of numpy arrays ``step [P]``,
  ``outer_loss [M, P]`` (per task, per recorded step), ``final_outer_loss``, ``mean_outer_loss``,
  ``diverged`` (``[M]`` each).
  """
  return evaluate_many([(opt, phi, opt_name)], split, cfg_eval, seed, tasks)[0]


def evaluate_many(entries, split, cfg_eval, seed: int, tasks=None) -> list[tuple[list, dict]]:
  """``evaluate`` for several ``(opt, phi, opt_name[, role])`` on the same held-out tasks, compiled
  together (the role defaults to ``role(opt)``)."""
  entries = [tuple(e) if len(e) == 4 else (*e, role(e[0])) for e in entries]
  every, horizon = int(cfg_eval.curve_every), int(split.horizon)
  if tasks is None:
    tasks = heldout_tasks(split.family, int(cfg_eval.num_tasks), seed, split.name)
  tasks, keys = tasks
  opts, phis, names, kinds = zip(*entries)
  # The tasks are inputs: splits differing only in sample-only knobs share the compiled program.
  outs = _run_tasks(tuple(opts), tuple(phis), PresetInit(split.family.program_key()), tasks, keys,
                    horizon, every)
  return [_summarise(np.asarray(o, np.float64), name, split, cfg_eval, seed, kind)
          for o, name, kind in zip(outs, names, kinds)]


def _summarise(outer_MxP: np.ndarray, opt_name: str, split, cfg_eval, seed: int, kind: str):
  """Rows and per-task arrays from one optimizer's held-out curves ``[M, P]``."""
  every = int(cfg_eval.curve_every)
  final_M = outer_MxP[:, -1]
  with np.errstate(invalid="ignore", over="ignore"):
    mean_M = outer_MxP.mean(axis=1)
  diverged_M = stats.diverged(outer_MxP[:, 0], final_M)
  per_task = {"final_outer_loss": final_M, "mean_outer_loss": mean_M,
              "diverged_frac": diverged_M.astype(np.float64),
              "overfit_frac": stats.overfit(outer_MxP[:, 0], final_M).astype(np.float64)}
  rows = _metric_rows(per_task, opt_name, split, cfg_eval, seed, kind)

  step_P = np.arange(outer_MxP.shape[1]) * every
  mean_P, lo_P, hi_P = stats.bootstrap_mean_curve(outer_MxP, n_boot=int(cfg_eval.n_boot), seed=seed)
  rows += [make_row("eval_curve", split.name, opt_name, "outer_loss", m, lo, hi, n=len(final_M),
                    step=int(s), role=kind) for s, m, lo, hi in zip(step_P, mean_P, lo_P, hi_P)]
  curves = {"step": step_P, "outer_loss": outer_MxP, "final_outer_loss": final_M,
            "mean_outer_loss": mean_M, "diverged": diverged_M}
  return rows, curves


def paired_rows(learned_name: str, learned: Mapping, baseline_name: str, baseline: Mapping,
                split, cfg_eval, seed: int) -> list[dict]:
  """Paired comparison on the same held-out tasks (module docstring).

  ``final_outer_loss_diff`` is ``None`` with an ``undefined`` reason when some task is non-finite
  for either optimizer (the difference of two failures is undefined); ``win_frac`` treats a
  non-finite loss as +inf.
  """
  a = stats.as_loss_array(learned["final_outer_loss"])
  b = stats.as_loss_array(baseline["final_outer_loss"])
  n = len(a)
  extra = dict(baseline=baseline_name, horizon=split.horizon)
  if np.all(np.isfinite(a)) and np.all(np.isfinite(b)):
    v, lo, hi = stats.bootstrap_ci(a - b, n_boot=int(cfg_eval.n_boot), seed=seed)
  else:
    v = lo = hi = None
    extra["undefined"] = (f"non-finite final loss on {int(np.sum(~np.isfinite(a)))} task(s) for "
                          f"{learned_name} and {int(np.sum(~np.isfinite(b)))} for {baseline_name}")
  w, wlo, whi = stats.bootstrap_ci((a < b).astype(np.float64), n_boot=int(cfg_eval.n_boot), seed=seed)
  return [make_row("eval_paired", split.name, learned_name, "final_outer_loss_diff", v, lo, hi, n=n,
                   **extra),
          make_row("eval_paired", split.name, learned_name, "win_frac", w, wlo, whi, n=n, **extra)]


def tuning_rows(name: str, result: tuning.TuningResult, split) -> list[dict]:
  """Rows for one baseline's grid search: best_lr, at_grid_edge (1/0), all_failed (1/0), and the
  selection score at every grid point (metric ``grid_mean_final_outer_loss``, extra key ``lr``)."""
  n = result.num_tasks
  rows = [make_row("tuning", split.name, name, "best_lr", result.best_lr, n=n, horizon=split.horizon,
                   lr_grid_min=float(result.lrs[0]), lr_grid_max=float(result.lrs[-1]),
                   lr_grid_size=len(result.lrs)),
          make_row("tuning", split.name, name, "at_grid_edge", float(result.at_grid_edge), n=n),
          make_row("tuning", split.name, name, "all_failed", float(result.all_failed), n=n)]
  rows += [make_row("tuning", split.name, name, "grid_mean_final_outer_loss", s, n=n, lr=float(lr),
                    failed_frac=float(f))
           for lr, s, f in zip(result.lrs, result.mean_final_loss, result.failed_frac)]
  return rows


def _as_split_list(splits) -> list:
  if isinstance(splits, Mapping):
    return list(splits.values())
  if hasattr(splits, "family") and hasattr(splits, "horizon"):
    return [splits]
  return list(splits)


def evaluate_all(opt, phi: PyTree, learned_name: str, splits, cfg_eval, seed: int,
                 baseline_kwargs: Mapping[str, Mapping] | None = None, return_curves: bool = False):
  """Evaluates the learned optimizer and every tuned baseline of ``cfg_eval.baselines`` per split.

  Args:
    opt, phi: the (meta-trained) optimizer and its meta-parameters.
    learned_name: the name its rows carry (the config name); must differ from the baselines'.
    splits: a ``{name: Split}`` dict (``mesajax.splits.make_splits``), a list of splits, or one.
    cfg_eval: ``config.eval``.
    seed: the run's seed (selects the tune / heldout key streams).
    baseline_kwargs: optional ``{baseline_name: options}`` passed to ``make_optimizer`` (e.g.
      Adam's betas); the learning rate is always tuned.
    return_curves: also return ``{(split, optimizer): curves}``.

  Returns rows (``eval``, ``eval_curve``, ``eval_paired``, ``tuning``), or ``(rows, curves)``.
  A baseline whose best rate sits at the edge of the grid is logged as a warning and flagged in
  its ``at_grid_edge`` row.
  """
  split_list = _as_split_list(splits)
  baseline_kwargs = dict(baseline_kwargs or {})
  baselines = {}
  for name in cfg_eval.baselines:  # build (and validate) every baseline before compiling anything
    b = make_optimizer(name, baseline_kwargs.get(name))
    baselines[name] = (b, b.init_phi(jax.random.PRNGKey(0)))
    tuning.grid_phi(b, baselines[name][1], [1.0])  # a baseline must have a tunable learning rate

  rows, all_curves = [], {}
  for split in split_list:
    tasks = split_tasks(split, cfg_eval, seed)
    results = tuning.tune_many(
        [b for b, _ in baselines.values()], [p for _, p in baselines.values()], split.family,
        split.horizon, cfg_eval, seed, split.name, tasks["tune"]) if baselines else []
    entries = [(opt, phi, learned_name, "learned")]
    for (name, (b, base_phi)), result in zip(baselines.items(), results):
      if result.at_grid_edge or result.all_failed:
        logging.warning("baseline %s on split %s: best lr %.3g is at the edge of the grid [%.3g, %.3g]%s",
                        name, split.name, result.best_lr, result.lrs[0], result.lrs[-1],
                        " and every rate failed on some tuning task" if result.all_failed else "")
      rows += tuning_rows(name, result, split)
      entries.append((b, b.with_learning_rate(base_phi, result.best_lr), name, "baseline"))
    evaluated = evaluate_many(entries, split, cfg_eval, seed, tasks["heldout"])
    learned_curves = evaluated[0][1]
    for (_, _, name, _), (r, curves) in zip(entries, evaluated):
      rows += r
      all_curves[(split.name, name)] = curves
      if name != learned_name:
        rows += paired_rows(learned_name, learned_curves, name, curves, split, cfg_eval, seed)
    rows += oracle_rows(split, tasks["heldout"][0], learned_name, learned_curves, cfg_eval, seed)
  return (rows, all_curves) if return_curves else rows


@functools.partial(jax.jit, static_argnames=("family",))
def _oracle_losses(family, tasks):
  """Outer loss of the family's oracle parameters on each task, or None without an oracle."""
  return jax.vmap(lambda t: family.outer_loss_full(family.oracle(t), t))(tasks)


def oracle_rows(split, prepared, learned_name: str, learned: Mapping, cfg_eval, seed: int):
  """The best achievable reference on the held-out tasks, when the family has one
  (``TaskFamily.oracle``: e.g. the Bayes posterior mean of a linear regression, the minimiser of a
  quadratic): its final outer loss (optimizer ``oracle``, role ``oracle``) and the learned
  optimizer's paired gap to it, mean_m (L_learned,m − L_oracle,m) (``eval_paired`` row
  ``gap_to_oracle``)."""
  family, tasks = split.family, prepared["task"]
  one = jax.tree.map(lambda x: x[0], tasks)
  if jax.eval_shape(family.oracle, one) is None:
    return []
  loss_M = np.asarray(_oracle_losses(family, tasks), np.float64)
  v, lo, hi = stats.bootstrap_ci(loss_M, n_boot=int(cfg_eval.n_boot), seed=seed)
  rows = [make_row("eval", split.name, "oracle", "final_outer_loss", v, lo, hi, n=len(loss_M),
                   horizon=split.horizon, role="oracle")]
  a = stats.as_loss_array(learned["final_outer_loss"])
  if np.all(np.isfinite(a)):
    v, lo, hi = stats.bootstrap_ci(a - loss_M, n_boot=int(cfg_eval.n_boot), seed=seed)
    rows.append(make_row("eval_paired", split.name, learned_name, "gap_to_oracle", v, lo, hi,
                         n=len(a), baseline="oracle", horizon=split.horizon))
  else:
    rows.append(make_row("eval_paired", split.name, learned_name, "gap_to_oracle", None, n=len(a),
                         baseline="oracle", horizon=split.horizon,
                         undefined=f"non-finite final loss on {int(np.sum(~np.isfinite(a)))} task(s)"))
  return rows
