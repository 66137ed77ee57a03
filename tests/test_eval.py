"""Held-out evaluation, learning-rate tuning and bootstrap statistics (mesajax/eval/).

References are independent of the code under test: closed forms for gradient descent on quadratics
((I - eta A)^T e_0 in float64 numpy), textbook normal-theory intervals, and hand-counted fractions.
"""
import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest

from mesajax.eval import evaluate as ev
from mesajax.eval import stats, tuning
from mesajax.optimizers.base import Optimizer
from mesajax.optimizers.common import LogLearningRate
from mesajax.registry import make_optimizer, make_task_family
from mesajax.rollout import run_curve
from mesajax.report.rows import KEYS, append_rows, read_rows
from mesajax.splits import Split, purpose_key
from mesajax.tasks.base import TaskFamily

EIGS = (0.5, 2.0, 10.0)


# --- stand-ins following the task / optimizer interfaces ------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiagQuadratic(TaskFamily):
  """f(theta) = 1/2 sum_i lam_i (theta_i - theta*_i)^2, theta_0 = 0; theta* = 1 if fixed else N(0, I)."""
  name = "diag_quadratic"
  fixed_optimum: bool = True

  def sample(self, key):
    star = jnp.ones(len(EIGS)) if self.fixed_optimum else jax.random.normal(key, (len(EIGS),))
    return {"theta_star": star}

  def init(self, key, task):
    return {"theta": jnp.zeros(len(EIGS))}

  def train_loss_full(self, params, task):
    return 0.5 * jnp.sum(jnp.asarray(EIGS) * (params["theta"] - task["theta_star"]) ** 2)

  def train_loss(self, params, task, key):
    return self.train_loss_full(params, task)

  def outer_loss_full(self, params, task):
    return self.train_loss_full(params, task)


@dataclasses.dataclass(frozen=True)
class TinySGD(LogLearningRate, Optimizer):
  name = "sgd"
  learning_rate: float = 0.1

  def init(self, phi, params):
    return ()

  def update(self, phi, state, grads, params, ctx):
    return jax.tree.map(lambda g: -jnp.exp(phi["log_lr"]) * g, grads), state


@dataclasses.dataclass(frozen=True)
class NotTunable(Optimizer):
  name = "not_tunable"


def gd_curve(lr, star, T):
  """Closed-form GD losses on DiagQuadratic from theta_0 = 0: [T + 1] (float64)."""
  lam = np.asarray(EIGS)
  t = np.arange(T + 1)[:, None]
  return 0.5 * np.sum(lam * (1 - lr * lam) ** (2 * t) * np.asarray(star) ** 2, axis=1)


def eval_cfg(**kw):
  c = ml_collections.ConfigDict(dict(num_tasks=16, num_tuning_tasks=8, baselines=("sgd",),
                                     lr_grid_min=1e-3, lr_grid_max=1.0, lr_grid_size=13,
                                     curve_every=5, n_boot=200))
  c.update(kw)
  return c


# --- stats -----------------------------------------------------------------------------------------
def test_bootstrap_normal_known_case():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=400)
  v, lo, hi = stats.bootstrap_ci(x, n_boot=2000, seed=0)
  assert v == pytest.approx(x.mean())
  assert lo < x.mean() < hi and lo < 3.0 < hi
  expected_width = 2 * 1.96 * x.std(ddof=1) / math.sqrt(len(x))
  assert hi - lo == pytest.approx(expected_width, rel=0.1)
  assert (v, lo, hi) == stats.bootstrap_ci(x, n_boot=2000, seed=0)  # deterministic in the seed


def test_bootstrap_coverage():
  rng = np.random.default_rng(2)
  covered = 0
  for i in range(200):
    x = rng.normal(0.0, 1.0, size=50)
    _, lo, hi = stats.bootstrap_ci(x, n_boot=400, seed=i)
    covered += lo < 0.0 < hi
  assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_nonfinite_counts_as_inf():
  x = np.concatenate([np.linspace(1.0, 2.0, 99), [np.nan]])
  v, lo, hi = stats.bootstrap_ci(x, n_boot=500)
  assert v == np.inf and hi == np.inf
  assert np.isfinite(lo)  # ~37% of resamples miss the one failed task: the lower bound is finite
  v, lo, hi = stats.bootstrap_ci([1.0, np.inf, -np.inf, np.nan], n_boot=100)
  # 3 of 4 tasks failed: a resample is all-finite with probability 4⁻⁴ ≈ 0.4%, so even the 2.5%
  # quantile of the resampled means is +inf.
  assert (v, lo, hi) == (np.inf, np.inf, np.inf)
  assert stats.bootstrap_ci([4.0]) == (4.0, 4.0, 4.0)
  v, lo, hi = stats.bootstrap_ci(np.arange(11.0), stat=np.median)
  assert v == 5.0 and lo <= 5.0 <= hi
  with pytest.raises(ValueError):
    stats.bootstrap_ci([])


def test_bootstrap_mean_curve_matches_pointwise():
  rng = np.random.default_rng(3)
  c = rng.lognormal(size=(20, 6))
  c[3, 4:] = np.inf
  mean, lo, hi = stats.bootstrap_mean_curve(c, n_boot=300, seed=5)
  for j in range(6):
    ref = stats.bootstrap_ci(c[:, j], n_boot=300, seed=5)
    np.testing.assert_allclose([mean[j], lo[j], hi[j]], ref, rtol=1e-12)
  assert np.all(np.isinf(mean[4:]))


def test_diverged_and_overfit():
  """Divergence is a non-finite or exploding (> 100x initial) final loss; a finite run that ends
  above its start without exploding overfits."""
  initial, final = [1, 1, 1, 1, 1], [0.5, 2.0, 150.0, np.nan, np.inf]
  np.testing.assert_array_equal(stats.diverged(initial, final), [False, False, True, True, True])
  np.testing.assert_array_equal(stats.overfit(initial, final), [False, True, False, False, False])


# --- tuning ----------------------------------------------------------------------------------------
def test_tuning_picks_closed_form_optimum():
  T = 20
  cfg = eval_cfg()
  res = tuning.tune_lr(TinySGD(), TinySGD().init_phi(), DiagQuadratic(), T, cfg, 0, "heldout")
  lrs = np.exp(np.linspace(math.log(1e-3), math.log(1.0), 13))
  np.testing.assert_allclose(res.lrs, lrs, rtol=1e-12)
  # Closed form on the grid; a run ending above 100x its start diverged and scores +inf.
  final = np.array([gd_curve(lr, np.ones(3), T)[-1] for lr in lrs])
  closed = np.where(final > 100 * gd_curve(0.0, np.ones(3), 0)[0], np.inf, final)
  assert res.best_index == int(np.argmin(closed))
  np.testing.assert_allclose(res.mean_final_loss, closed, rtol=1e-3)
  assert np.isinf(res.mean_final_loss[-1])  # lr = 1 > 2 / 10: diverges on the stiff direction
  # The continuous optimum lies between the chosen rate's grid neighbours.
  fine = np.exp(np.linspace(math.log(1e-3), math.log(1.0), 4001))
  f_fine = np.array([gd_curve(lr, np.ones(3), T)[-1] for lr in fine])
  lr_opt = fine[np.argmin(f_fine)]
  assert lrs[res.best_index - 1] < lr_opt < lrs[res.best_index + 1]
  assert not res.at_grid_edge and not res.all_failed and res.num_tasks == 8


def test_tuning_edge_and_all_failed_flags():
  fam, opt = DiagQuadratic(), TinySGD()
  low = tuning.tune_lr(opt, opt.init_phi(), fam, 10, eval_cfg(lr_grid_min=1e-6, lr_grid_max=1e-5,
                                                              lr_grid_size=3), 0, "heldout")
  assert low.at_grid_edge and low.best_index == 2 and not low.all_failed
  high = tuning.tune_lr(opt, opt.init_phi(), fam, 10, eval_cfg(lr_grid_min=1.0, lr_grid_max=5.0,
                                                               lr_grid_size=3), 0, "heldout")
  assert high.all_failed and high.at_grid_edge and high.best_index == 0  # least bad: the smallest
  with pytest.raises(ValueError, match="no tunable learning rate"):
    tuning.grid_phi(NotTunable(), {"w": jnp.zeros(2)}, [0.1])


def test_tuning_grid_through_the_learning_rate_contract():
  """The grid sets the rate through ``with_learning_rate``; every other meta-parameter is kept."""
  phi_G = tuning.grid_phi(TinySGD(), {"log_lr": jnp.zeros([]), "beta": jnp.ones(3)}, [0.1, 0.2])
  np.testing.assert_allclose(np.exp(phi_G["log_lr"]), [0.1, 0.2], rtol=1e-6)
  np.testing.assert_array_equal(phi_G["beta"], np.ones((2, 3)))


def test_tuning_and_heldout_tasks_differ():
  fam = DiagQuadratic(fixed_optimum=False)
  t_tasks, t_keys = tuning.tuning_tasks(fam, 4, 0, "heldout")
  h_tasks, h_keys = ev.heldout_tasks(fam, 6, 0, "heldout")
  s_tasks, _ = ev.heldout_tasks(fam, 6, 0, "shifted")
  star = lambda t: np.asarray(t["task"]["theta_star"])  # noqa: E731
  assert not np.allclose(star(t_tasks), star(h_tasks)[:4])
  assert not np.allclose(star(s_tasks), star(h_tasks))
  # The same draws as the family's own sample_batch on the purpose stream, and as split_tasks.
  k_tasks, _ = jax.random.split(purpose_key(0, "heldout", "heldout"))
  np.testing.assert_array_equal(star(h_tasks), fam.sample_batch(k_tasks, 6)["theta_star"])
  both = ev.split_tasks(Split("heldout", fam, 10), eval_cfg(num_tasks=6, num_tuning_tasks=4), 0)
  np.testing.assert_array_equal(star(both["tune"][0]), star(t_tasks))
  np.testing.assert_array_equal(star(both["heldout"][0]), star(h_tasks))
  np.testing.assert_array_equal(both["tune"][1], t_keys)
  np.testing.assert_array_equal(both["heldout"][1], h_keys)


# --- evaluate ------------------------------------------------------------------------------------
def test_evaluate_rows_and_closed_form(tmp_path):
  T, cfg = 40, eval_cfg()
  split = Split("heldout", DiagQuadratic(fixed_optimum=False), T)
  rows, curves = ev.evaluate(TinySGD(), TinySGD(0.05).init_phi(), "tiny", split, cfg, seed=0)
  # Independent reference: closed-form GD losses for each held-out task.
  tasks, _ = ev.heldout_tasks(split.family, cfg.num_tasks, 0, "heldout")
  ref = np.stack([gd_curve(0.05, s, T)[::5]
                  for s in np.asarray(tasks["task"]["theta_star"], np.float64)])
  np.testing.assert_allclose(curves["outer_loss"], ref, rtol=2e-4, atol=1e-7)
  np.testing.assert_array_equal(curves["step"], np.arange(0, T + 1, 5))

  by = {r["metric"]: r for r in rows if r["analysis"] == "eval"}
  assert set(by) == {"final_outer_loss", "mean_outer_loss", "diverged_frac", "overfit_frac"}
  assert all(r["role"] == "baseline" for r in rows)  # TinySGD is not a learned optimizer
  assert by["final_outer_loss"]["value"] == pytest.approx(ref[:, -1].mean(), rel=1e-4)
  assert by["mean_outer_loss"]["value"] == pytest.approx(ref.mean(), rel=1e-4)
  assert by["diverged_frac"]["value"] == 0.0
  for r in by.values():
    assert r["split"] == "heldout" and r["optimizer"] == "tiny" and r["n"] == cfg.num_tasks
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
  curve_rows = [r for r in rows if r["analysis"] == "eval_curve"]
  assert [r["step"] for r in curve_rows] == list(range(0, T + 1, 5))
  assert curve_rows[-1]["value"] == pytest.approx(ref[:, -1].mean(), rel=1e-4)
  assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in curve_rows)

  path = tmp_path / "results.jsonl"
  append_rows(str(path), rows)
  df = pd.read_json(path, lines=True)
  assert set(KEYS) <= set(df.columns) and len(df) == len(rows)
  assert df.query("analysis == 'eval' and metric == 'final_outer_loss'")["value"].item() == \
      pytest.approx(by["final_outer_loss"]["value"])


def test_diverged_frac_absurd_and_tiny_lr():
  split = Split("heldout", DiagQuadratic(fixed_optimum=False), 20)
  cfg = eval_cfg()
  rows, _ = ev.evaluate(TinySGD(), TinySGD(100.0).init_phi(), "absurd", split, cfg, 0)
  by = {r["metric"]: r for r in rows if r["analysis"] == "eval"}
  assert by["diverged_frac"]["value"] == 1.0
  # +inf is stored as null and named in the row's nonfinite map (strict JSON, never 1e308)
  assert by["final_outer_loss"]["value"] is None
  assert by["final_outer_loss"]["nonfinite"]["value"] == "inf"
  json.dumps(rows, allow_nan=False)  # rows stay valid JSON
  rows, _ = ev.evaluate(TinySGD(), TinySGD(1e-3).init_phi(), "tiny", split, cfg, 0)
  by = {r["metric"]: r for r in rows if r["analysis"] == "eval"}
  assert by["diverged_frac"]["value"] == 0.0
  assert by["diverged_frac"]["ci_low"] == by["diverged_frac"]["ci_high"] == 0.0


def test_evaluate_compiles_once():
  """A second evaluation with other meta-parameters reuses the compiled program."""
  split, cfg = Split("heldout", DiagQuadratic(fixed_optimum=False), 20), eval_cfg(num_tasks=4)
  ev.evaluate(TinySGD(), TinySGD(0.1).init_phi(), "a", split, cfg, 0)
  n = ev._run_tasks._cache_size()
  rows, _ = ev.evaluate(TinySGD(), TinySGD(0.2).init_phi(), "b", split, cfg, 0)
  assert ev._run_tasks._cache_size() == n
  assert rows[0]["optimizer"] == "b"


def test_evaluate_all_with_stand_ins(monkeypatch, tmp_path):
  monkeypatch.setattr(ev, "make_optimizer", lambda name, kw=None: TinySGD())
  cfg = eval_cfg()
  splits = {"heldout": Split("heldout", DiagQuadratic(fixed_optimum=False), 20),
            "long": Split("long", DiagQuadratic(fixed_optimum=False), 40)}
  rows, curves = ev.evaluate_all(TinySGD(), TinySGD(1e-3).init_phi(), "learned", splits, cfg, 0,
                                 return_curves=True)
  for split, T in (("heldout", 20), ("long", 40)):
    opts = {r["optimizer"] for r in rows if r["analysis"] == "eval" and r["split"] == split}
    assert opts == {"learned", "sgd"}
    best = [r for r in rows if r["analysis"] == "tuning" and r["split"] == split
            and r["metric"] == "best_lr"]
    edge = [r for r in rows if r["analysis"] == "tuning" and r["split"] == split
            and r["metric"] == "at_grid_edge"]
    assert len(best) == 1 and len(edge) == 1 and edge[0]["value"] == 0.0
    # The tuned baseline beats the deliberately slow learned stand-in on every task.
    win = [r for r in rows if r["analysis"] == "eval_paired" and r["split"] == split
           and r["metric"] == "win_frac"][0]
    assert win["value"] == 0.0 and win["baseline"] == "sgd"
    diff = [r for r in rows if r["analysis"] == "eval_paired" and r["split"] == split
            and r["metric"] == "final_outer_loss_diff"][0]
    ref = curves[(split, "learned")]["final_outer_loss"] - curves[(split, "sgd")]["final_outer_loss"]
    assert diff["value"] == pytest.approx(ref.mean()) and diff["ci_low"] > 0
  # A longer horizon retunes on its own tuning tasks; its best rate is no larger.
  lr = {r["split"]: r["value"] for r in rows if r["metric"] == "best_lr"}
  assert lr["long"] <= lr["heldout"]
  append_rows(str(tmp_path / "r.jsonl"), rows)
  assert len(read_rows(str(tmp_path / "r.jsonl"))) == len(rows)


def test_eval_config_errors_are_caught_by_resolve():
  """The eval section is validated once, by ``mesajax.config.resolve``, before anything runs."""
  import os
  from mesajax.config import load, resolve
  quick = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.py")
  for override, message in (("eval.curve_every=7", "curve_every"),
                            ("eval.baselines=('sgd', 'lion')", "lion"),
                            ("name=sgd", "sgd"),
                            ("eval.lr_grid_min=5.0", "lr_grid")):
    with pytest.raises(ValueError, match=message):
      resolve(load(quick, [override]))


# --- with the real task family and baselines --------------------------------------------------------
def test_real_quadratic_sgd_matches_matrix_power():
  fam = make_task_family("quadratic", {"dim": 6, "cond": 10.0})
  split, cfg, lr, T = Split("heldout", fam, 30), eval_cfg(num_tasks=8), 0.5, 30
  rows, curves = ev.evaluate(make_optimizer("sgd"), {"log_lr": jnp.log(lr)}, "x", split, cfg, 0)
  tasks, _ = ev.heldout_tasks(fam, 8, 0, "heldout")
  A, star = np.asarray(tasks["task"]["A"], np.float64), np.asarray(tasks["task"]["theta_star"], np.float64)
  ref = []
  for a, s in zip(A, star):
    e = np.linalg.matrix_power(np.eye(6) - lr * a, T) @ (-s)
    ref.append(0.5 * e @ a @ e)
  np.testing.assert_allclose(curves["final_outer_loss"], ref, rtol=1e-3, atol=1e-8)


def test_real_matches_plain_run_curve():
  """Preset initial points (tuning.PresetInit) give exactly the runs of plain run_curve."""
  fam = make_task_family("quadratic", {"dim": 5, "init_scale": 1.0})
  opt, cfg = make_optimizer("adam", {"learning_rate": 0.05}), eval_cfg(num_tasks=4)
  _, curves = ev.evaluate(opt, opt.init_phi(), "adam", Split("heldout", fam, 20), cfg, 3)
  prepared, keys = ev.heldout_tasks(fam, 4, 3, "heldout")  # sampling is checked in another test
  tasks = prepared["task"]
  ref = jax.vmap(lambda t, k: run_curve(opt, opt.init_phi(), fam, t, k, 20, 20, 5)["outer_loss"])(
      tasks, keys)
  np.testing.assert_allclose(curves["outer_loss"], ref, rtol=1e-5)
  assert np.all(curves["outer_loss"][:, 0] > 0)


def test_real_evaluate_all_small():
  fam = make_task_family("quadratic", {"dim": 4, "cond": 10.0})
  cfg = eval_cfg(num_tasks=8, num_tuning_tasks=4, baselines=("sgd", "adam"), lr_grid_min=1e-3,
                 lr_grid_max=3.0, lr_grid_size=9, curve_every=10, n_boot=100)
  learned = make_optimizer("sgdm")  # stand-in for a learned optimizer
  rows = ev.evaluate_all(learned, learned.init_phi(), "quickstart", {"heldout": Split("heldout", fam, 50)},
                         cfg, 0)
  assert {r["optimizer"] for r in rows if r["analysis"] == "eval"} == {"quickstart", "sgd", "adam",
                                                                        "oracle"}
  # The quadratic's oracle is its minimiser: outer loss 0, and the paired gap is the learned loss.
  oracle = [r for r in rows if r["optimizer"] == "oracle"]
  assert len(oracle) == 1 and oracle[0]["role"] == "oracle" and abs(oracle[0]["value"]) < 1e-6
  gap = [r for r in rows if r["metric"] == "gap_to_oracle"][0]
  fin = [r for r in rows if r["analysis"] == "eval" and r["optimizer"] == "quickstart"
         and r["metric"] == "final_outer_loss"][0]
  assert gap["value"] == pytest.approx(fin["value"], rel=1e-5, abs=1e-7)
  best = {r["optimizer"]: r["value"] for r in rows if r["metric"] == "best_lr"}
  assert set(best) == {"sgd", "adam"} and all(1e-3 <= v <= 3.0 for v in best.values())


@pytest.mark.slow
def test_real_evaluate_all_quickstart_sized():
  """The quickstart-sized evaluation (dim-10 quadratic, 64 tasks, horizon 200 and 2000) is fast."""
  fam = make_task_family("quadratic", {"dim": 10, "cond": 10.0})
  cfg = eval_cfg(num_tasks=64, num_tuning_tasks=32, baselines=("sgd", "sgdm", "adam"),
                 lr_grid_min=1e-4, lr_grid_max=3.0, lr_grid_size=15, n_boot=1000)
  splits = {"heldout": Split("heldout", fam, 200), "horizon_x10": Split("horizon_x10", fam, 2000)}
  learned = make_optimizer("adam")  # stand-in for the learned optimizer
  t0 = time.perf_counter()
  rows = ev.evaluate_all(learned, learned.init_phi(), "quickstart", splits, cfg, 0)
  elapsed = time.perf_counter() - t0
  print(f"quickstart-sized evaluate_all: {elapsed:.1f} s, {len(rows)} rows")
  assert elapsed < 120  # on a loaded 2-core CPU; almost all of it is compilation
  names = {r["optimizer"] for r in rows if r["analysis"] == "eval"}
  assert names == {"quickstart", "sgd", "sgdm", "adam"}
  for r in rows:
    if r["analysis"] == "tuning" and r["metric"] == "at_grid_edge":
      assert r["value"] == 0.0, r  # the quickstart grid brackets every baseline's optimum
  div = [r for r in rows if r["analysis"] == "eval" and r["metric"] == "diverged_frac"
         and r["optimizer"] != "quickstart"]
  assert all(r["value"] == 0.0 for r in div)  # tuned baselines are stable on held-out tasks
