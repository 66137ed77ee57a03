"""The stages of an ICL run, one function each (the lead's ``run.py`` only parses flags):

  train(config, workdir)  → checkpoints of a seed population (+ null models, see below)
  evaluate(workdir)       → rows: query loss of the model, its nulls and every reference; agreement
                            metrics (pred_diff, sens_cos, sens_diff, SPD, ILWD) against every
                            reference; the implied ridge λ̂ beside λ*; on the training distribution
                            and on every shift of ``config.shifts``
  analyze(workdir)        → rows: linear probes per layer (``probes``)
  report_section(rows), make_figures(rows, outdir)  (``mesajax.icl.report``)

Every stage after ``train`` reads the config and the checkpoint from the run directory. References
are fitted on the TRAINING distribution (line-searched GD step sizes, fitted GD++ parameters, the
training prior's Bayes ridge λ* = σ²/τ²) and held fixed under shift, as the model is.

Nulls (``icl.eval.nulls``): ``untrained`` (the seeds' initial parameters), ``shuffled_context``
(the trained model with the context labels rolled by one, so x–y pairs are broken) and
``single_task`` (the same model trained on one fixed task, ``num_pretrain_tasks = 1``, trained by
``train`` into ``DIR/nulls/single_task``).
"""
from __future__ import annotations

import copy
import os
import zlib

import jax
import numpy as np

from mesajax.eval.stats import bootstrap_ci
from mesajax.icl import analysis as A
from mesajax.icl import config as cfg
from mesajax.icl import references as R
from mesajax.icl import train as T
from mesajax.report.rows import append_rows, make_row

RESULTS = "results.jsonl"
SINGLE_TASK_DIR = os.path.join("nulls", "single_task")


def single_task_config(config):
  c = copy.deepcopy(config)
  c.name = f"{config.name}/single_task"
  c.icl.task.num_pretrain_tasks = 1
  c.icl.num_seeds = min(2, int(config.icl.num_seeds))
  c.icl.eval.nulls = ()
  return c


def train(config, workdir: str, progress: bool = True):
  """Trains the population (and the single-task null if requested). Returns ``(trainer, state)``."""
  cfg.validate(config)
  out = T.train(config, workdir, progress=progress)
  if "single_task" in tuple(config.icl.eval.nulls):
    T.train(single_task_config(config), os.path.join(workdir, SINGLE_TASK_DIR), progress=progress)
  return out


def build_references(config) -> tuple[dict, dict]:
  """``(predictors, info)``: the reference algorithms fitted on the training distribution."""
  fam = cfg.task_family(config)
  k = int(config.icl.eval.gd_steps)
  eta1 = R.line_search_gd(fam, 1)
  lam_star = fam.bayes_lambda
  refs = {"gd_1": lambda x, y, q, e=eta1: R.gd_predict(x, y, q, e, 1)}
  info = {"eta_gd_1": eta1, "lambda_star_train": lam_star}
  if k > 1:
    eta_k = R.line_search_gd(fam, k)
    refs[f"gd_{k}"] = lambda x, y, q, e=eta_k: R.gd_predict(x, y, q, e, k)
    info[f"eta_gd_{k}"] = eta_k
    if int(config.icl.eval.gdpp_iters) > 0:
      eta_K, gamma_K = R.fit_gd_pp(fam, k, iters=int(config.icl.eval.gdpp_iters))
      refs[f"gdpp_{k}"] = lambda x, y, q, e=eta_K, g=gamma_K: R.gd_pp_predict(x, y, q, e, g)
      info[f"eta_gdpp_{k}"], info[f"gamma_gdpp_{k}"] = eta_K.tolist(), gamma_K.tolist()
  refs["ridge_bayes"] = lambda x, y, q, lam=lam_star: R.ridge_predict(x, y, q, lam)
  refs["ols"] = R.ols_predict
  return refs, info


def split_key(seed: int, split: str):
  """Evaluation tasks: their own key stream per split (never the training stream)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed + 7919), zlib.crc32(split.encode()))


def _ci(values, n_boot, seed=0):
  v = np.asarray(values, np.float64).reshape(-1)
  fin = v[np.isfinite(v)]
  if fin.size == 0:
    return None
  return bootstrap_ci(fin, n_boot=n_boot, seed=seed) + (fin.size,)


def _rows_for(split, who, ref, metric, arr_SxT, n_boot, undefined_reason, **extra):
  """Pooled row (CI over seeds × tasks) and one row per seed; non-finite entries are dropped and
  a value with no finite entry is ``None`` with ``undefined``."""
  rows = []
  arr = np.asarray(arr_SxT, np.float64)
  arr = arr[None] if arr.ndim == 1 else arr
  groups = [(None, arr)] + [(s, arr[s]) for s in range(arr.shape[0])] if arr.shape[0] > 1 \
      else [(None, arr)]
  for seed, a in groups:
    ci = _ci(a, n_boot)
    kw = dict(extra, reference=ref, seed=seed)
    if ci is None:
      rows.append(make_row("icl", split, who, metric, None, None, None, a.size,
                           undefined=undefined_reason, **kw))
    else:
      v, lo, hi, n = ci
      if n < a.size:
        kw["dropped_nonfinite"] = int(a.size - n)
      rows.append(make_row("icl", split, who, metric, v, lo, hi, n, **kw))
  return rows


def evaluate(workdir: str, step: int | None = None) -> list[dict]:
  """Rows for the training distribution and every shift; appended to ``DIR/results.jsonl``."""
  config, trainer, state = T.load(workdir, step)
  rows = evaluate_state(config, trainer, state, workdir)
  append_rows(os.path.join(workdir, RESULTS), rows)
  return rows


def _models(config, trainer, state, workdir):
  """``{who: (trainer, params_S, variants)}`` for the model and its nulls. Parameters are handed
  to the evaluator as host arrays: restored and freshly initialised device arrays differ in
  placement (committed or not), which made the jitted evaluator compile twice per split."""
  host = lambda p: jax.tree.map(np.asarray, p)
  nulls = tuple(config.icl.eval.nulls)
  variants = {"shuffled_context": A.rolled} if "shuffled_context" in nulls else {}
  out = {config.name: (trainer, host(state.params), variants)}
  if "untrained" in nulls:
    out["untrained"] = (trainer, host(trainer.init().params), {})
  path = os.path.join(workdir, SINGLE_TASK_DIR)
  if "single_task" in nulls:
    _, t1, s1 = T.load(path)
    out["single_task"] = (t1, host(s1.params), {})
  return out


def evaluate_state(config, trainer, state, workdir=".") -> list[dict]:
  ev = config.icl.eval
  n_boot, seed = int(ev.n_boot), int(config.seed)
  refs, info = build_references(config)
  lam_L = R.ridge_grid(float(ev.lam_lo), float(ev.lam_hi), int(ev.lam_num))
  train_step = int(state.step)
  common = {"model": config.icl.model, "step": train_step}
  rows = [make_row("icl", "train", k, "fitted_param", v if not isinstance(v, list) else None,
                   n=None, values=v if isinstance(v, list) else None, **common)
          for k, v in info.items()]
  fams = cfg.shift_families(config)
  models = _models(config, trainer, state, workdir)
  main_tr, _, main_variants = models[config.name]
  # One jitted evaluator for every split and parameter set (recompiled only when shapes change).
  evaluator = A.make_evaluator(main_tr.predict, refs, lam_L, main_variants)
  for split, fam in fams.items():
    tasks = jax.jit(lambda k, fam=fam: fam.sample_batch(k, int(ev.num_tasks), int(ev.num_queries))
                    )(split_key(seed, split))
    lam_star = fam.bayes_lambda
    ref_done = False
    for base_who, (tr, params, variants) in models.items():
      res = evaluator(params, tasks)
      if base_who != config.name:  # nulls: the model itself only, not its variants
        res = {"ref_loss": res["ref_loss"],
               **{k: {w: v for w, v in res[k].items() if w.split("|")[0] == "model"}
                  for k in ("loss", "pairs", "spd_grid")}}
      if not ref_done:
        for name, arr in res["ref_loss"].items():
          rows += _rows_for(split, name, None, "loss", arr, n_boot, "non-finite loss", **common)
        ref_done = True
      for who, arr in res["loss"].items():
        label = base_who if who == "model" else who
        rows += _rows_for(split, label, None, "loss", arr, n_boot, "non-finite loss", **common)
        for name, ref_arr in res["ref_loss"].items():
          ref_mean = float(np.mean(ref_arr))
          if ref_mean < 1e-6:
            ratio_S = np.full(arr.shape[0], np.nan)
            reason = f"reference loss {ref_mean:.1e} ≈ 0 (it solves the tasks exactly): unbounded ratio"
          else:
            ratio_S, reason = arr.mean(1) / ref_mean, "non-finite loss"
          rows += _rows_for(split, label, name, "loss_ratio", ratio_S[:, None], n_boot, reason,
                            **common)
      for pair, metrics in res["pairs"].items():
        who, name = pair.split("|")
        label = base_who if who == "model" else who
        for metric, arr in metrics.items():
          reason = {"sens_cos": "a sensitivity ∂ŷ/∂x_q is zero on every task (no direction)",
                    "ilwd": "fewer probe queries than dimensions"}.get(metric, "non-finite")
          if metric == "ilwd" and int(ev.num_queries) < fam.d:
            arr = np.full_like(arr, np.nan)
          rows += _rows_for(split, label, name, metric, arr, n_boot, reason, **common)
      for who, spd in res["spd_grid"].items():
        label = base_who if who == "model" else who
        lh = A.lambda_hat(spd, lam_L, n_boot=n_boot, seed=seed)
        extra = dict(common, lambda_star=lam_star, at_grid_edge=bool(lh.at_edge), reference="ridge")
        if lh.undefined:
          extra["undefined"] = lh.undefined
        rows.append(make_row("icl", split, label, "lambda_hat", lh.value, lh.lo, lh.hi,
                             int(np.prod(spd.shape[:2])), seed=None, **extra))
        if spd.shape[0] > 1:
          for s, lam in enumerate(lh.per_seed):
            ex = dict(extra)
            ex.pop("undefined", None)
            if lam is None:
              ex["undefined"] = "this seed's SPD(model, ridge_λ) is flat in λ"
            rows.append(make_row("icl", split, label, "lambda_hat", lam, None, None,
                                 spd.shape[1], seed=s, **ex))
        curve = spd.mean(axis=(0, 1))
        ex = {k: v for k, v in extra.items() if k != "undefined"}
        rows.append(make_row("icl", split, label, "spd_min", float(curve.min()), n=None,
                             seed=None, spd_range=float(curve.max() - curve.min()), **ex))
    rows.append(make_row("icl", split, "bayes", "lambda_star", lam_star, n=None,
                         lambda_star_train=info["lambda_star_train"], **common))
  return rows


def analyze(workdir: str, step: int | None = None) -> list[dict]:
  """Linear probes per layer (``mesajax.icl.probes``); rows appended to ``DIR/results.jsonl``."""
  from mesajax.icl import probes
  config, trainer, state = T.load(workdir, step)
  rows = probes.probe_rows(config, trainer, state)
  append_rows(os.path.join(workdir, RESULTS), rows)
  return rows
