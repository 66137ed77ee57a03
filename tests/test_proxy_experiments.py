"""The proxy-objective experiments: the shared harness (experiments/common.py), the quadratic's
optimum-location knobs, and the closed form behind the horizon experiment's known answer."""
import gzip
import json
import math
import os

import jax
import numpy as np
import pytest

from experiments import common
from experiments.horizon import wu
from mesajax.registry import make_task_family
from mesajax.report.rows import make_row, write_rows
from mesajax.tasks import data


# --- task knobs -------------------------------------------------------------------------------

def test_far_knobs_default_draw_unchanged():
  """far_frac = 0 (the default) draws θ* exactly as before the knob existed:
  optimum_scale · (third block of data.normals)."""
  fam = make_task_family("quadratic", dict(dim=5, optimum_scale=0.7))
  assert fam.far_frac == 0.0
  key = jax.random.PRNGKey(3)
  _, _, z = data.normals(key, (5,), (5, 5), (5,))
  np.testing.assert_array_equal(np.asarray(fam.sample(key)["theta_star"]), 0.7 * np.asarray(z))


def test_far_knobs_place_far_optima():
  near = make_task_family("quadratic", dict(dim=4, optimum_scale=0.1))
  mixed = near.replace(far_frac=0.3, far_scale=5.0)
  key = jax.random.PRNGKey(0)
  t_near, t_mixed = near.sample_batch(key, 1000), mixed.sample_batch(key, 1000)
  a, b = np.asarray(t_near["theta_star"]), np.asarray(t_mixed["theta_star"])
  ratio = np.linalg.norm(b, axis=1) / np.linalg.norm(a, axis=1)
  far = np.isclose(ratio, 50.0, rtol=1e-4)
  # every task is either unchanged or the same direction scaled by far_scale / optimum_scale
  assert np.all(far | np.isclose(ratio, 1.0, rtol=1e-5))
  np.testing.assert_allclose(b[far], 50.0 * a[far], rtol=1e-4)
  assert abs(far.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 1000)  # Binomial(1000, 0.3)
  np.testing.assert_array_equal(np.asarray(t_mixed["A"]), np.asarray(t_near["A"]))
  all_far = np.asarray(near.replace(far_frac=1.0, far_scale=5.0).sample_batch(key, 50)["theta_star"])
  np.testing.assert_allclose(all_far, 50.0 * a[:50], rtol=1e-4)


@pytest.mark.parametrize("bad", [dict(far_frac=1.5), dict(far_frac=-0.1), dict(far_scale=-1.0)])
def test_far_knobs_validated(bad):
  with pytest.raises(ValueError, match="quadratic: far_"):
    make_task_family("quadratic", bad)


# --- the Wu et al. closed form ----------------------------------------------------------------

def test_wu_closed_form_matches_simulation():
  fam = make_task_family("quadratic", dict(dim=4, cond=50.0, noise=0.3))
  h, z0_sq = wu.task_moments(fam, jax.random.PRNGKey(1), 6)
  for lr, t in ((0.05, 7), (0.6, 12)):
    exact = float(wu.expected_ratio([lr], t, h, z0_sq, 0.3)[0])
    sim = wu.simulate_ratio(lr, t, h, z0_sq, 0.3, num_runs=40000)
    assert abs(sim - exact) < 0.02 * exact, (lr, t, exact, sim)
  # noiseless, one coordinate: (1 - ηh)^(2T) exactly
  r = wu.expected_ratio([0.1], 5, np.array([[2.0]]), np.array([[3.0]]), 0.0)[0]
  assert math.isclose(r, 0.8 ** 10, rel_tol=1e-12)


def test_wu_best_lr_is_the_grid_minimum_and_noise_lowers_it():
  fam = make_task_family("quadratic", dict(dim=4, cond=100.0, noise=0.3))
  h, z0_sq = wu.task_moments(fam, jax.random.PRNGKey(2), 256)
  best, grid, vals = wu.best_lr(50, h, z0_sq, 0.3, num=500)
  assert vals.min() == wu.expected_ratio([best], 50, h, z0_sq, 0.3)[0]
  assert grid[0] < best < grid[-1]  # an interior optimum, not a grid edge
  quiet, _, _ = wu.best_lr(50, h, z0_sq, 0.0, num=500)
  assert quiet > best  # gradient noise penalises large rates


def test_sgd_schedule_uses_the_rate_of_its_piece():
  from mesajax.optimizers.base import make_context
  from mesajax.registry import make_optimizer
  opt = make_optimizer("sgd_schedule", dict(learning_rate=0.1, num_buckets=4))
  phi = {"log_lrs": np.log(np.array([0.5, 0.25, 0.125, 0.0625], np.float32))}
  g = {"theta": np.array([1.0, -2.0], np.float32)}
  for step, piece in ((0, 0), (4, 0), (5, 1), (12, 2), (19, 3), (25, 3)):  # T = 20: 5 steps each
    u, _ = opt.update(phi, opt.init(phi, g), g, g, make_context(step, 20))
    np.testing.assert_allclose(np.asarray(u["theta"]), -phi_rate(phi, piece) * g["theta"],
                               rtol=1e-6)
  flat = opt.with_learning_rate(opt.init_phi(None), 0.3)
  np.testing.assert_allclose(np.exp(np.asarray(flat["log_lrs"])), 0.3, rtol=1e-6)
  with pytest.raises(ValueError, match="num_buckets"):
    make_optimizer("sgd_schedule", dict(num_buckets=0))


def phi_rate(phi, piece):
  return float(np.exp(phi["log_lrs"][piece]))


def test_wu_schedule_closed_forms():
  """A constant schedule's R_T is the constant-rate closed form; Monte Carlo agrees with a varying
  schedule; the greedy schedule is optimal piece by piece and the joint optimum is at least as
  good overall, with the greedy rates below it in the middle (Wu et al.'s short-horizon bias)."""
  fam = make_task_family("quadratic", dict(dim=4, cond=100.0, noise=0.1))
  h, z0_sq = wu.task_moments(fam, jax.random.PRNGKey(3), 64)
  const = wu.schedule_ratio([0.2] * 5, 50, h, z0_sq, 0.1)
  assert math.isclose(const, float(wu.expected_ratio([0.2], 50, h, z0_sq, 0.1)[0]), rel_tol=1e-12)
  sched = np.array([0.8, 0.4, 0.2, 0.1, 0.05])
  rng = np.random.default_rng(0)
  z = np.broadcast_to(np.sqrt(z0_sq[:8]), (20000,) + h[:8].shape).copy()
  for lr in np.repeat(sched, 10):
    z = (1.0 - lr * h[:8]) * z - lr * 0.1 * rng.standard_normal(z.shape)
  sim = np.mean(np.sum(h[:8] * (z ** 2).mean(0), -1) / np.sum(h[:8] * z0_sq[:8], -1))
  exact = wu.schedule_ratio(sched, 50, h[:8], z0_sq[:8], 0.1)
  assert abs(sim - exact) < 0.02 * exact
  greedy = wu.greedy_schedule(5, 50, h, z0_sq, 0.1)
  first = lambda lr: wu.schedule_ratio([lr], 10, h, z0_sq, 0.1)  # piece 0 alone
  assert first(greedy[0]) <= min(first(greedy[0] * 1.01), first(greedy[0] / 1.01))
  best = wu.optimal_schedule(5, 50, h, z0_sq, 0.1)
  assert wu.schedule_ratio(best, 50, h, z0_sq, 0.1) < wu.schedule_ratio(greedy, 50, h, z0_sq, 0.1)
  assert np.all(greedy[1:4] < best[1:4])


@pytest.mark.slow
def test_wu_meta_training_finds_the_closed_form_optimum(tmp_path):
  """Known answer: learnable-lr SGD meta-trained on the final loss of a short horizon reaches the
  closed-form optimum of that horizon (within 25%)."""
  from configs.proxy_horizon import wu_config
  from mesajax import pipeline
  from mesajax.config import resolve
  c = wu_config()
  c.meta.num_seeds, c.meta.num_outer_steps, c.meta.num_tasks = 2, 300, 32
  c.eval.num_tasks, c.eval.num_tuning_tasks, c.eval.lr_grid_size = 8, 4, 4
  config = resolve(c)
  pipeline.train(config, str(tmp_path), progress=False)
  _, _, phi, _ = pipeline.load_learned(str(tmp_path))
  fam = make_task_family("quadratic", config.task.kwargs.to_dict())
  h, z0_sq = wu.task_moments(fam, jax.random.PRNGKey(5), 4096)
  best, _, _ = wu.best_lr(int(config.meta.horizon), h, z0_sq, float(config.task.kwargs.noise))
  lrs = np.exp(np.asarray(phi["log_lr"], np.float64))
  np.testing.assert_allclose(lrs, best, rtol=0.25)


# --- the harness ------------------------------------------------------------------------------

def _rows():
  rows = []
  for v, f in (("far0", 0.0), ("far50", 0.5)):
    for split in ("heldout", "all_far"):
      base = 1.0 + f + (split == "all_far")
      rows += [dict(make_row("eval_seeds", split, "lopt", "final_outer_loss", base, base - 0.1,
                             base + 0.1, n=8, seeds=2), variant=v, far_frac=f),
               dict(make_row("eval_seeds", split, "lopt", "final_outer_loss:seed_sd", 0.05, n=2),
                    variant=v, far_frac=f),
               dict(make_row("eval_seeds", split, "lopt", "final_outer_loss_diff", 0.3, 0.1, 0.5,
                             n=8, baseline="adam"), variant=v, far_frac=f)]
      for s in (0, 1):
        rows.append(dict(make_row("eval", split, "lopt", "final_outer_loss", base + s, n=8,
                                  role="learned", seed=s), variant=v, far_frac=f))
        rows.append(dict(make_row("objective_fit", split, "lopt", "w:l2", 0.2 * (s + 1), 0.0, 0.5,
                                  n=8, role="analysed", seed=s, null="permutation", p_value=0.01,
                                  clears_null=s == 1), variant=v, far_frac=f))
      rows.append(dict(make_row("eval", split, "adam", "final_outer_loss", 0.7, 0.6, 0.8, n=8,
                                role="baseline"), variant=v, far_frac=f))
      rows.append(dict(make_row("objective_fit", split, "adam", "w:l2", None, n=0,
                                role="control:tuned", undefined="excluded: aliased"),
                       variant=v, far_frac=f))
  return rows


def test_loss_and_analysis_tables_from_rows():
  rows = _rows()
  t = common.loss_table(rows, show_params=("far_frac",))
  lines = t.splitlines()
  assert lines[0].split(" | ")[:4] == ["| variant", "far_frac", "split", "lopt (seeds)"]
  assert len(lines) == 2 + 4  # header, rule, 2 variants x 2 splits
  assert "1.5 [1.4, 1.6] (S=2)" in t and "0.7 [0.6, 0.8]" in t and "0.3 [0.1, 0.5]" in t
  a = common.analysis_table(rows, [("objective_fit", "w:l2")])
  # two members summarised: mean 0.3, range, one of two clears its null
  assert "0.3 (range 0.2..0.4, 2/2 seeds)" in a and "1/2 seeds" in a
  assert "n/a (excluded: aliased)" in a


def test_regenerate_reads_rows_only(tmp_path, capsys):
  wd = tmp_path / "exp"
  wd.mkdir()
  write_rows(str(wd / "results.jsonl"), _rows())
  seen = {}

  def build(quick):  # must not be called by --regenerate
    raise AssertionError("build called")

  def report(workdir, rows, quick):
    seen["n"] = len(rows)
    common.sweep_figure(rows, "far_frac", os.path.join(workdir, "figures", "s.png"))
    common.metric_figure(rows, "objective_fit", "w:l2", "far_frac",
                         os.path.join(workdir, "figures", "w.png"))
    return common.write_readme(workdir, "t", [("tab", common.loss_table(rows))], "done")

  assert common.main("x", build, report, argv=["--workdir", str(wd), "--regenerate"]) == 0
  assert seen["n"] == len(_rows())
  text = (wd / "README.md").read_text()
  assert "## What the numbers show" in text and text.rstrip().endswith("done")
  assert (wd / "figures" / "s.png").stat().st_size > 0
  pub = tmp_path / "pub"
  assert common.main("x", build, report,
                     argv=["--workdir", str(wd), "--regenerate", "--publish", str(pub)]) == 0
  assert (pub / "README.md").exists() and (pub / "figures" / "w.png").exists()
  # The rows are published compressed; --regenerate on the published folder reads them back.
  assert not (pub / "results.jsonl").exists()
  with gzip.open(pub / "results.jsonl.gz", "rt") as f:
    assert json.loads(f.readline())["variant"] == "far0"
  seen.clear()
  assert common.main("x", build, report, argv=["--workdir", str(pub), "--regenerate"]) == 0
  assert seen["n"] == len(_rows())
  assert common.load_results(str(pub)) == common.load_results(str(wd))


def test_cli_errors_are_one_line(tmp_path, capsys):
  rc = common.main("x", lambda q: {}, None, argv=["--workdir", str(tmp_path), "--regenerate"])
  assert rc == 2 and "holds no rows" in capsys.readouterr().err
  f = tmp_path / "file"
  f.write_text("")
  assert common.main("x", lambda q: {}, None, argv=["--workdir", str(f)]) == 2
  assert "is not a directory" in capsys.readouterr().err
  # a bad variant config fails before anything compiles
  from configs.proxy_optimum import get_config
  c = get_config()
  c.task.kwargs.far_frac = 2.0
  rc = common.main("x", lambda q: {"bad": common.Variant(c)}, None,
                   argv=["--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert rc == 2 and "variant 'bad'" in err and "far_frac" in err and len(err.splitlines()) == 1
