"""The analysis driver end to end: known answers through ``run_analyses`` and the row format."""
import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.analysis import report, suite
from mesajax.optimizers.baselines import SGD, Adam, SGDM
from mesajax.report.rows import KEYS
from mesajax.splits import Split
from mesajax.tasks.quadratic import Quadratic


def _acfg(**kw):
  base = dict(num_tasks=4, num_steps=24, num_points=2, num_probes=8, n_boot=50,
              endpoint_steps=400)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _splits():
  fam = Quadratic(dim=4, cond=5.0, init_scale=1.0)
  return {"heldout": Split("heldout", fam, 24)}


def _by(rows, analysis, metric):
  hits = [r for r in rows if r["analysis"] == analysis and r["metric"] == metric]
  assert len(hits) == 1, (analysis, metric, len(hits))
  return hits[0]


@dataclasses.dataclass(frozen=True)
class AdamWithHidden(Adam):
  """Adam whose per-parameter hidden state is its (m, v): a recurrent optimizer for the probes."""

  name = "adam_hidden"

  def hidden_state(self, state):
    return jnp.stack([ravel_pytree(state.m)[0], ravel_pytree(state.v)[0]], axis=1)


def test_gradient_descent_known_answers_through_the_driver():
  rows = suite.run_analyses(SGD(learning_rate=0.3), {"log_lr": jnp.log(0.3)}, "sgd", _splits(),
                            _acfg(), seed=0)
  for r in rows:
    assert all(k in r for k in KEYS)
    assert r["analysis"] in suite.ANALYSES and r["split"] == "heldout" and r["optimizer"] == "sgd"
  assert _by(rows, "nci", "nci")["value"] < 1e-4
  assert _by(rows, "transverse", "transverse")["value"] < 1e-4
  assert _by(rows, "nci_metric", "nci:own_diag")["value"] < 1e-4
  np.testing.assert_allclose(_by(rows, "nci", "cos_u_neg_grad")["value"], 1.0, atol=1e-5)
  assert _by(rows, "quasi_static", "state_dim")["value"] == 0
  np.testing.assert_allclose(_by(rows, "objective_fit", "w:train_loss")["value"], 1.0)
  for term in ("l2", "l2_init", "grad_norm_sq", "dist_opt", "diag_quadratic"):
    assert abs(_by(rows, "objective_fit", f"w:{term}")["value"]) < 1e-2, term
  assert _by(rows, "objective_fit", "w:outer_loss")["excluded"] == "aliased:train_loss"
  assert _by(rows, "objective_fit", "r2")["value"] > 0.9999
  r = _by(rows, "objective_fit", "w:train_loss")
  assert r["n"] == 4 and r["ci_low"] <= r["value"] <= r["ci_high"]
  assert _by(rows, "endpoint_fit", "w:grad_norm_sq")["excluded"] == "vanishing"
  np.testing.assert_allclose(_by(rows, "alignment", "cos_u_neg_train_grad")["value"], 1.0,
                             atol=1e-5)
  assert not [r for r in rows if r["analysis"] == "probes"]
  text = report.report_section(rows)
  assert "nci" in text and "objective_fit" in text


def test_momentum_and_recurrent_probes_through_the_driver(tmp_path):
  acfg = _acfg()
  rows = suite.run_analyses(SGDM(learning_rate=0.05, momentum=0.8), {"log_lr": jnp.log(0.05)},
                            "sgdm", _splits(), acfg, seed=1)
  np.testing.assert_allclose(_by(rows, "quasi_static", "eig_1")["value"], 0.8, atol=1e-5)
  np.testing.assert_allclose(_by(rows, "quasi_static", "effective_step")["value"], 0.05 / 0.2,
                             rtol=1e-3)
  assert _by(rows, "nci", "qs:nci")["value"] < 1e-4  # ū = −η/(1−β)∇f is a gradient field

  opt = AdamWithHidden(learning_rate=0.01, b1=0.9, b2=0.99)
  rows2 = suite.run_analyses(opt, opt.init_phi(None), "adam_hidden", _splits(), acfg, seed=0)
  assert {r["analysis"] for r in rows2} == set(suite.ANALYSES)
  np.testing.assert_allclose(_by(rows2, "quasi_static", "eig_1")["value"], 0.99, atol=1e-5)
  np.testing.assert_allclose(_by(rows2, "quasi_static", "eig_2")["value"], 0.9, atol=1e-5)
  # The hidden state holds m = EMA_0.9(g) exactly (a column of the state).
  assert _by(rows2, "probes", "r2:ema_g@0.9")["value"] > 0.999
  paths = report.make_figures(rows + rows2, str(tmp_path))
  assert paths and all((tmp_path / p.split("/")[-1]).exists() for p in paths)


def test_validate_rejects_bad_settings():
  with pytest.raises(ValueError, match="num_tasks"):
    suite.validate(_acfg(num_tasks=1))
  with pytest.raises(ValueError, match="num_points"):
    suite.validate(_acfg(num_points=100))
