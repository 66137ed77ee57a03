"""Analyses of mesajax.icl on predictors with known answers: agreement metrics, the implied ridge
λ̂, undefined values, linear probes; and the pipeline end to end on a smoke config."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesajax.icl import analysis as A
from mesajax.icl import data, probes
from mesajax.icl import references as R

FAM = data.ICLRegression(d=4, N=8, sigma=0.5, inputs="normal")


@pytest.fixture(scope="module")
def tasks():
  return jax.jit(lambda k: FAM.sample_batch(k, 256, 8))(jax.random.PRNGKey(0))


def test_lambda_hat_recovers_planted_ridge_and_self_agreement(tasks):
  lam_L = R.ridge_grid(1e-3, 1e3, 61)
  planted = np.array([0.25, 4.0], np.float32)   # two "seeds": ridge with these penalties
  model_fn = lambda p, x, y, q: R.ridge_predict(x, y, q, p)
  refs = {"ridge_0.25": lambda x, y, q: R.ridge_predict(x, y, q, 0.25),
          "zero": lambda x, y, q: jnp.zeros(q.shape[0])}
  res = A.evaluate_models(model_fn, jnp.asarray(planted), refs, tasks, lam_L,
                          {"shuffled": A.rolled})
  lh = A.lambda_hat(res["spd_grid"]["model"], lam_L, n_boot=50)
  for got, want in zip(lh.per_seed, planted):
    assert abs(np.log10(got / want)) <= 0.05 + 1e-9  # the nearest grid point
  assert not lh.at_edge and lh.undefined is None
  same = res["pairs"]["model|ridge_0.25"]
  np.testing.assert_allclose(same["sens_cos"][0], 1.0, atol=1e-5)
  np.testing.assert_allclose(same["spd"][0], 0.0, atol=1e-8)
  np.testing.assert_allclose(same["ilwd"][0], 0.0, atol=1e-4)
  assert np.all(same["spd"][1] > 1e-3)
  # A predictor with zero sensitivity has no direction: the cosine is NaN (reported undefined).
  assert np.all(np.isnan(res["pairs"]["model|zero"]["sens_cos"]))
  # The shuffled-context null loses the ridge model's accuracy.
  assert res["loss"]["shuffled"][0].mean() > 2 * res["loss"]["model"][0].mean()


def test_lambda_hat_undefined_when_spd_is_flat_in_lambda():
  """Queries orthogonal to the context: every ridge_λ predicts 0, so SPD(model, ridge_λ) is the
  same for every λ and λ̂ is undefined with a reason, not an arbitrary argmin; a curve with a
  clear minimum (ridge at λ = 0.25 as the model, same tasks' shapes) stays defined."""
  fam = data.ICLRegression(d=6, N=3, sigma=0.5, inputs="normal", query="orthogonal")
  orth = jax.jit(lambda k: fam.sample_batch(k, 64, 6))(jax.random.PRNGKey(1))
  lam_L = R.ridge_grid(1e-3, 1e3, 31)
  gd = lambda p, x, y, q: R.gd_predict(x, y, q, p, 1) + q[:, 0]  # nonzero predictions, any λ
  res = A.evaluate_models(gd, jnp.asarray([0.5, 1.0]), {}, orth, lam_L)
  lh = A.lambda_hat(res["spd_grid"]["model"], lam_L, n_boot=50)
  assert lh.value is None and lh.lo is None and "flat" in lh.undefined
  assert lh.per_seed == [None, None]
  assert A.spd_flat(np.zeros(5)) and not A.spd_flat(np.array([1.0, 0.5, 1.0]))
  # The tolerance is relative: a curve varying by 1% of its scale is not flat at 1e-3.
  assert not A.spd_flat(1e-9 * np.array([1.0, 0.99, 1.0]))
  assert A.spd_flat(5.0 + 1e-6 * np.arange(4))


def test_undefined_rows_carry_a_reason():
  from mesajax.icl.pipeline import _rows_for
  rows = _rows_for("train", "m", "zero", "sens_cos", np.full((2, 5), np.nan), 50, "no direction")
  assert rows and all(r["value"] is None and r["undefined"] == "no direction" for r in rows)
  rows = _rows_for("train", "m", "r", "spd", np.array([[1.0, np.nan], [2.0, 3.0]]), 50, "x")
  assert rows[0]["value"] == pytest.approx(2.0) and rows[0]["dropped_nonfinite"] == 1


def test_probe_recovers_planted_feature_and_fails_on_shuffled_control():
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((600, 12))
  target = feats @ rng.standard_normal((12, 3)) + 0.05 * rng.standard_normal((600, 3))
  r2, r2_shuffled = probes.probe(feats, target)
  assert r2 > 0.99
  assert r2_shuffled < 0.1
  # an unrelated target is not recovered
  r2_noise, _ = probes.probe(feats, rng.standard_normal((600, 2)))
  assert r2_noise < 0.1


def test_gd_line_search_beats_neighbours():
  fam = data.ICLRegression(d=4, N=6)
  eta = R.line_search_gd(fam, 1, num_tasks=1024)
  tasks = jax.jit(lambda k: fam.sample_batch(k, 1024))(jax.random.PRNGKey(12345))
  losses = R._gd_losses(tasks, 1, jnp.asarray([eta / 1.5, eta, eta * 1.5], jnp.float32))
  assert losses[1] < losses[0] and losses[1] < losses[2]


@pytest.mark.slow  # ~30 s of compiles on an idle 2-core CPU (evaluator, probes, line search)
def test_pipeline_smoke_end_to_end(tmp_path):
  """train → evaluate → analyze → report on a tiny config, from the checkpoint."""
  import ml_collections
  from mesajax.icl import pipeline, report
  from mesajax.icl.config import default_config
  c = default_config()
  c.name = "smoke"
  c.icl.task.d, c.icl.task.N, c.icl.task.sigma, c.icl.task.inputs = 3, 4, 0.3, "normal"
  c.icl.num_steps, c.icl.batch_size, c.icl.num_seeds = 10, 16, 2
  c.icl.log_every, c.icl.checkpoint_every = 5, 5
  ev = c.icl.eval
  ev.num_tasks, ev.num_queries, ev.n_boot, ev.lam_num, ev.probe_tasks = 16, 4, 20, 11, 32
  ev.nulls = ("untrained", "shuffled_context")
  c.shifts = ml_collections.ConfigDict({"noise_x2": {"sigma": 0.6}})
  wd = str(tmp_path)
  pipeline.train(c, wd, progress=False)
  rows = pipeline.evaluate(wd)
  rows += pipeline.analyze(wd)
  keys = {"analysis", "split", "optimizer", "metric", "value", "ci_low", "ci_high", "n"}
  assert all(keys <= set(r) for r in rows)
  json.dumps(rows, allow_nan=False)
  assert all(r["value"] is not None or r.get("undefined") for r in rows)
  metrics = {(r["split"], r["metric"]) for r in rows}
  for split in ("train", "noise_x2"):
    for m in ("loss", "loss_ratio", "sens_cos", "spd", "ilwd", "lambda_hat", "lambda_star"):
      assert (split, m) in metrics
  assert ("train", "r2") in metrics and ("train", "r2_shuffled") in metrics
  md = report.report_section(rows)
  assert "λ̂" in md and "noise_x2" in md
  paths = report.make_figures(rows, str(tmp_path / "fig"))
  assert len(paths) == 2


def test_gpt_is_causal_and_shapes():
  """The softmax transformer predicts every yᵢ from its prefix only, and each query alone."""
  from flax import nnx
  from mesajax.icl import models
  m = models.make_model("gpt", 3, {"num_layers": 1, "num_heads": 1, "width": 16, "max_len": 8},
                        jax.random.PRNGKey(0))
  g, p = nnx.split(m)
  rng = np.random.default_rng(0)
  x, xq = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
  y = jnp.asarray(rng.standard_normal(5), jnp.float32)
  run = jax.jit(lambda p, y: (nnx.merge(g, p).train_predictions(x, y, xq)[0],
                              nnx.merge(g, p).hidden(x, y, xq)))
  pred, hid = run(p, y)
  assert pred.shape == (7,) and hid.shape == (2, 2, 16)
  pred2, _ = run(p, y.at[3].set(10.0))  # changing y₃ leaves the predictions of y₀..y₃ unchanged
  np.testing.assert_allclose(pred[:4], pred2[:4], atol=1e-6)
  assert not np.allclose(pred[4:], pred2[4:])


def test_icl_programs_hold_no_lapack_calls():
  """Batched LAPACK custom calls deadlock XLA:CPU in jaxlib 0.10 when as many run at once as the
  intra-op pool has threads (``mesajax.icl.linalg``); the evaluator of a mesa-layer (linear algebra
  in the model and in the ridge/OLS references) must lower without any."""
  from flax import nnx
  from mesajax.icl import models
  g, p = nnx.split(models.make_model("mesa", 3, {}, jax.random.PRNGKey(0)))
  fam = data.ICLRegression(d=3, N=2, sigma=0.5, inputs="normal", query="orthogonal")
  tasks = jax.jit(lambda k: fam.sample_batch(k, 4, 4))(jax.random.PRNGKey(0))
  params = jax.tree.map(lambda a: jnp.stack([a, a]), p.to_pure_dict())
  refs = {"ridge": lambda x, y, q: R.ridge_predict(x, y, q, 0.5), "ols": R.ols_predict}
  ev = A.make_evaluator(lambda pp, x, y, q: nnx.merge(g, pp)(x, y, q), refs,
                        R.ridge_grid(1e-3, 1e3, 5), {"shuffled": A.rolled})
  text = ev.run.lower(params, tasks).as_text() + jax.jit(
      lambda k: fam.sample_batch(k, 4, 4)).lower(jax.random.PRNGKey(0)).as_text()
  assert "custom_call" not in text or "lapack" not in text.lower()
