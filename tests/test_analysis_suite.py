"""The analysis driver end to end: known answers, nulls and undefined values through
``run_analyses``, and the row format."""
import dataclasses
import pathlib
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.analysis import suite
from mesajax.optimizers.base import Optimizer
from mesajax.optimizers.baselines import SGD, Adam, SGDM
from mesajax.optimizers.controls import NoiseUpdate, PrecondSGD, RandomField
from mesajax.report import analyses as report
from mesajax.report.rows import KEYS
from mesajax.splits import Split
from mesajax.tasks.quadratic import Quadratic


def _acfg(**kw):
  base = dict(suite.DEFAULTS)
  base.update(num_tasks=4, num_steps=24, num_points=2, num_probes=8, n_boot=50,
              endpoint_steps=400, num_perms=5, controls=())
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _splits(dim=4):
  fam = Quadratic(dim=dim, cond=5.0, init_scale=1.0)
  return {"heldout": Split("heldout", fam, 24)}


def _by(rows, analysis, metric, optimizer=None, **extra):
  hits = [r for r in rows if r["analysis"] == analysis and r["metric"] == metric
          and (optimizer is None or r["optimizer"] == optimizer)
          and all(r.get(k) == v for k, v in extra.items())]
  assert len(hits) == 1, (analysis, metric, len(hits))
  return hits[0]


def _no_silent_none(rows):
  for r in rows:
    assert all(k in r for k in KEYS)
    if r["value"] is None:
      assert r.get("undefined"), r


@dataclasses.dataclass(frozen=True)
class AdamWithHidden(Adam):
  """Adam whose per-parameter hidden state is its (m, v): a recurrent optimizer for the probes."""

  name = "adam_hidden"

  def hidden_state(self, state):
    return jnp.stack([ravel_pytree(state.m)[0], ravel_pytree(state.v)[0]], axis=1)


class _InitState(NamedTuple):
  theta0: dict


@dataclasses.dataclass(frozen=True)
class DecayToInit(Optimizer):
  """u = −η(g + λ(θ − θ₀)) with θ₀ stored in the state: the state map copies θ₀ forward, so its
  Jacobian has eigenvalue exactly 1 (conserved, not unstable)."""

  name = "decay_to_init"

  def init_phi(self, key=None):
    return {"log_lr": jnp.log(0.1)}

  def init(self, phi, params):
    return _InitState(params)

  def update(self, phi, state, grads, params, ctx):
    lr = jnp.exp(phi["log_lr"])
    return (jax.tree.map(lambda g, p, p0: -lr * (g + 0.1 * (p - p0)), grads, params, state.theta0),
            state)


def test_gradient_descent_known_answers_through_the_driver():
  opt = SGD(learning_rate=0.3)
  rows = suite.run_analyses(opt, {"log_lr": jnp.log(0.3)}, "sgd", _splits(), _acfg(), seed=0,
                            null_phi={"log_lr": jnp.log(0.1)})
  _no_silent_none(rows)
  main = [r for r in rows if r["optimizer"] == "sgd" and r["analysis"] not in ("paired",)]
  for r in main:
    assert r["analysis"] in suite.ROW_ANALYSES and r["split"] == "heldout"
  # Exact (dense, float64) NCI of a symmetric J: 0 to round-off, below the floor: no claim.
  nci_row = _by(main, "nci", "nci")
  assert nci_row["value"] < 1e-12 and nci_row["clears_null"] is False
  assert _by(main, "transverse", "transverse")["value"] < 1e-12
  assert _by(main, "nci_metric", "nci:own_diag")["value"] < 1e-12
  assert _by(main, "nci_metric", "nci:dense_spd")["value"] < 1e-6
  np.testing.assert_allclose(_by(main, "nci", "cos_u_neg_grad")["value"], 1.0, atol=1e-9)
  assert _by(main, "quasi_static", "eig_1")["undefined"].startswith("stateless")
  assert _by(main, "objective_fit", "w:train_loss")["value"] == 1.0
  for term in ("l2", "l2_init", "grad_norm_sq", "diag_quadratic"):
    r = _by(main, "objective_fit", f"w:{term}")
    assert r["value"] is None or abs(r["value"]) < 1e-6, term
  assert _by(main, "objective_fit", "w:outer_loss")["undefined"] == "excluded: aliased:train_loss"
  gain = _by(main, "objective_fit", "r2_gain_heldout_steps")
  assert abs(gain["value"]) < 1e-9 and gain["clears_null"] is False and "p_value" in gain
  assert _by(main, "objective_fit", "r2_heldout_steps")["value"] > 0.9999
  assert _by(main, "objective_fit", "frac_eta_positive")["value"] == 1.0
  assert _by(main, "endpoint_fit", "w:grad_norm_sq")["undefined"] == "excluded: vanishing"
  np.testing.assert_allclose(_by(main, "alignment", "frac_outer_descent")["value"], 1.0)
  # The untrained-φ null, on the same tasks, with paired rows.
  assert _by(rows, "nci", "nci", optimizer="sgd@init")["role"] == "null:init"
  paired = _by(rows, "paired", "alignment/cos_u_neg_train_grad", baseline="sgd@init")
  assert paired["n"] == 4 and abs(paired["value"]) < 1e-9
  text = report.report_section(rows)
  assert "nci" in text and "undefined: excluded: aliased:train_loss" in text
  assert "does **not** clear its null" in text


@pytest.mark.slow
def test_momentum_and_recurrent_probes_through_the_driver(tmp_path):
  acfg = _acfg()
  stages = ("nci", "quasi_static", "probes")
  rows = suite.run_analyses(SGDM(learning_rate=0.05, momentum=0.8), {"log_lr": jnp.log(0.05)},
                            "sgdm", _splits(), acfg, seed=1, stages=stages)
  np.testing.assert_allclose(_by(rows, "quasi_static", "eig_1")["value"], 0.8, atol=1e-9)
  np.testing.assert_allclose(_by(rows, "quasi_static", "effective_step")["value"], 0.05 / 0.2,
                             rtol=1e-6)
  assert _by(rows, "nci", "qs:nci")["value"] < 1e-9  # ū = −η/(1−β)∇f is a gradient field

  opt = AdamWithHidden(learning_rate=0.01, b1=0.9, b2=0.99)
  rows2 = suite.run_analyses(opt, opt.init_phi(None), "adam_hidden", _splits(), acfg, seed=0,
                             stages=stages)
  np.testing.assert_allclose(_by(rows2, "quasi_static", "eig_1")["value"], 0.99, atol=1e-9)
  np.testing.assert_allclose(_by(rows2, "quasi_static", "eig_2")["value"], 0.9, atol=1e-9)
  assert _by(rows2, "probes", "r2:ema_g@0.9")["value"] > 0.999
  paths = report.make_figures(rows + rows2, str(tmp_path))
  assert paths and all((tmp_path / p.split("/")[-1]).exists() for p in paths)
  _no_silent_none(rows + rows2)


@pytest.mark.slow
def test_controls_and_the_dense_spd_metric():
  """Pure noise: J = 0, NCI undefined with its reason (no metric condition number either).
  Random field: NCI high. Preconditioned GD with a dense SPD P: NCI > 0 in the identity and
  diagonal metrics, ≈ 0 in the best constant SPD metric, whose condition number is ≤ cond(P)."""
  acfg = _acfg(num_tasks=3)
  stages = ("nci", "dense_metric")
  splits = _splits(dim=5)
  rows = []
  for name, opt in (("noise_update", NoiseUpdate()), ("random_field", RandomField(scale=2.0)),
                    ("precond_sgd", PrecondSGD(learning_rate=0.1, cond=10.0))):
    rows += suite.run_analyses(opt, opt.init_phi(None), name, splits, acfg, seed=0,
                               stages=stages)
  _no_silent_none(rows)
  noise = _by(rows, "nci", "nci", "noise_update")
  assert noise["value"] is None and noise["undefined"].startswith("J = 0 at every point")
  assert _by(rows, "nci_metric", "metric_cond:fitted_diag", "noise_update")["value"] is None
  assert _by(rows, "nci", "nci", "random_field")["value"] > 0.3
  assert _by(rows, "nci", "nci", "random_field")["clears_null"] is True
  pre = _by(rows, "nci", "nci", "precond_sgd")
  assert pre["value"] > 0.05 and pre["clears_null"] is True
  assert _by(rows, "nci_metric", "nci:fitted_diag", "precond_sgd")["value"] > 0.01
  spd = _by(rows, "nci_metric", "nci:dense_spd", "precond_sgd")
  assert spd["value"] < 1e-6 and spd["clears_null"] is False
  assert _by(rows, "nci_metric", "metric_cond:dense_spd", "precond_sgd")["value"] <= 10.0 * 1.01
  assert _by(rows, "nci_metric", "nci:dense_spd", "random_field")["value"] > 0.05


def test_a_shared_control_cache_analyses_each_control_once_with_the_same_rows():
  """Seed-population members share the controls: with a control_cache the second member's call
  emits no control rows of its own, and its paired rows equal those of an uncached call."""
  acfg = _acfg(num_tasks=3, controls=("noise_update",))
  splits, stages = _splits(), ("nci",)
  members = [(SGD(), {"log_lr": jnp.log(0.05)}), (SGD(), {"log_lr": jnp.log(0.1)})]
  cache, cached = {}, []
  for opt, phi in members:
    cached.append(suite.run_analyses(opt, phi, "m", splits, acfg, seed=0, stages=stages,
                                     control_cache=cache))
  plain = suite.run_analyses(*members[1], "m", splits, acfg, seed=0, stages=stages)
  own = lambda rows: [r for r in rows if r["optimizer"] == "noise_update"]
  assert own(cached[0]) and not own(cached[1]) and own(plain)
  rest = lambda rows: sorted((r["analysis"], r["metric"], r["optimizer"], str(r["value"]))
                             for r in rows if r["optimizer"] != "noise_update")
  assert rest(cached[1]) == rest(plain)


def test_adam_quasi_static_own_metric_is_exact_in_float64():
  """Adam's ū = −ηg/(|g|+ε) has Jacobian −ηε/(|g|+ε)²·H, symmetric in its own diagonal metric; at
  the default ε = 1e-8 that cancellation needs float64 (float32 measured 0.55)."""
  opt = Adam(learning_rate=0.01)
  rows = suite.run_analyses(opt, opt.init_phi(None), "adam", _splits(), _acfg(), seed=0,
                            stages=("nci",))
  assert _by(rows, "nci", "qs:nci")["value"] > 0.01
  assert _by(rows, "nci_metric", "qs:nci:own_diag")["value"] < 1e-6


@pytest.mark.slow
def test_endpoint_fit_is_gated_on_stationarity_and_stored_state_is_not_unstable():
  rows = suite.run_analyses(SGD(learning_rate=0.01), {"log_lr": jnp.log(0.01)}, "sgd_slow",
                            _splits(), _acfg(endpoint_steps=5), seed=0,
                            stages=("endpoint_fit",))
  _no_silent_none(rows)
  w = _by(rows, "endpoint_fit", "w:l2")
  assert w["value"] is None and w["undefined"].startswith("not stationary: update_norm_end_rel=")
  opt = DecayToInit()
  rows = suite.run_analyses(opt, opt.init_phi(None), "decay_to_init", _splits(), _acfg(), seed=0,
                            stages=("quasi_static",))
  assert _by(rows, "quasi_static", "frac_unstable")["value"] == 0.0
  assert _by(rows, "quasi_static", "frac_conserved_dims")["value"] == 1.0
  assert _by(rows, "quasi_static", "eig_1")["undefined"].startswith("fewer than 1")


def test_every_knob_has_a_default():
  src = "".join(p.read_text() for p in
                pathlib.Path(suite.__file__).parent.glob("*.py"))
  used = set(re.findall(r"knob\(\s*\"(\w+)\"", src)) | set(re.findall(r"knob\(acfg, \"(\w+)\"",
                                                                     src))
  assert used and used <= set(suite.DEFAULTS), used - set(suite.DEFAULTS)
  assert suite.DEFAULTS["num_tasks"] >= 32


@dataclasses.dataclass(frozen=True)
class WeightDecayGD(Optimizer):
  """u = −η(∇L_train + λθ): gradient descent on L_train + λ·½‖θ‖² (known answer w:l2 = λ)."""

  name = "wd_gd"
  lam: float = 0.1

  def init_phi(self, key=None):
    return {"log_lr": jnp.log(0.2)}

  def init(self, phi, params):
    return ()

  def update(self, phi, state, grads, params, ctx):
    lr = jnp.exp(phi["log_lr"])
    return jax.tree.map(lambda g, p: -lr * (g + self.lam * p), grads, params), state


def test_objective_fit_on_a_coordinate_subset_keeps_the_known_answer():
  """Above fit_max_coords the fit sees a random subset of the coordinates; the weight of an exact
  objective is recovered from the subset as from all of them."""
  opt = WeightDecayGD(lam=0.1)
  run = lambda **kw: suite.run_analyses(opt, opt.init_phi(), "wd_gd", _splits(dim=8),
                                        _acfg(**kw), seed=0, stages=("objective_fit",))
  full, sub = run(), run(fit_max_coords=5)
  for rows, coords in ((full, "all 8"), (sub, "5 of 8 (uniform random subset)")):
    w = _by(rows, "objective_fit", "w:l2")
    np.testing.assert_allclose(w["value"], 0.1, rtol=1e-6)
    r2 = _by(rows, "objective_fit", "r2_heldout_steps")
    assert r2["value"] > 0.9999 and r2["fit_coords"] == coords


@dataclasses.dataclass(frozen=True)
class WeightDecayMomentum(Optimizer):
  """Heavy ball on L_train + λ·½‖θ‖²: m_t = (∇L + λθ)_t + β m_{t−1}, u = −η m_t. Its quasi-static
  update ū = −η/(1−β)(∇L + λθ) descends that objective exactly (known answer qs:w:l2 = λ)."""

  name = "wd_momentum"
  lam: float = 0.1
  beta: float = 0.5

  def init_phi(self, key=None):
    return {"log_lr": jnp.log(0.1)}

  def init(self, phi, params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(self, phi, state, grads, params, ctx):
    m = jax.tree.map(lambda g, p, t: g + self.lam * p + self.beta * t, grads, params, state)
    return jax.tree.map(lambda d: -jnp.exp(phi["log_lr"]) * d, m), m


def test_qs_weights_are_tested_against_the_qs_fit_s_own_permutation_null():
  """The ``qs:`` fit (ū instead of u) gets its own permutation null (ū of one task with another
  task's gradients), as the main fit does: a sign flip of per-task weights is not calibrated
  when tasks share structure. Known answer through the driver: qs:w:l2 = λ."""
  opt = WeightDecayMomentum()
  rows = suite.run_analyses(opt, opt.init_phi(), "wd_momentum", _splits(dim=8),
                            _acfg(null_stop_early=False), seed=0, stages=("objective_fit",))
  w = _by(rows, "objective_fit", "qs:w:l2")
  np.testing.assert_allclose(w["value"], 0.1, rtol=1e-6)
  for metric in ("qs:w:l2", "qs:r2_gain_heldout_steps"):
    row = _by(rows, "objective_fit", metric)
    assert row["null"].startswith("permutation: ū paired with another task's gradients (5 draws)")
    assert 0 < row["p_value"] <= 1
  assert _by(rows, "objective_fit", "qs:w:l2")["requires"] == \
      "qs:r2_gain_heldout_steps clears its null"
  _no_silent_none(rows)


def test_the_fits_null_draws_stop_once_the_gain_cannot_clear_with_the_same_decisions():
  """Sequential permutation null (Besag & Clifford 1991): the fit's draws stop once the gain's
  test is decided against it, so every row's decision is the one all the draws give, the gain's
  p-value is the sequential one, and the rows say how many draws were made."""
  opt = SGD(learning_rate=0.3)  # gain 0 exactly (GD descends the training loss): cannot clear
  run = lambda stop: suite.run_analyses(opt, {"log_lr": jnp.log(0.3)}, "sgd", _splits(),
                                        _acfg(num_perms=20, null_stop_early=stop), seed=0,
                                        stages=("objective_fit",))
  seq, full = run(True), run(False)
  assert [r["metric"] for r in seq] == [r["metric"] for r in full]
  for a, b in zip(seq, full):
    assert a.get("clears_null") == b.get("clears_null"), a["metric"]
    assert a["value"] == b["value"], a["metric"]  # the real fit is the same computation
  gain_s = _by(seq, "objective_fit", "r2_gain_heldout_steps")
  gain_f = _by(full, "objective_fit", "r2_gain_heldout_steps")
  made = int(re.search(r"\(stopped after (\d+) of 20 draws, 1 with a gain at least the "
                       r"observed: the gain cannot clear; sequential p-value\)$",
                       gain_s["null"]).group(1))
  assert made < 20
  assert gain_f["null"].endswith("(20 draws)") and gain_s["null_q95"] is None
  # max(h / L, (1 + h) / 21): never below what one such draw among all 20 gives.
  assert gain_s["p_value"] == pytest.approx(max(1 / made, 2 / 21))
  assert gain_f["p_value"] >= 2 / 21 and gain_s["clears_null"] is False
  w = [r for r in seq if r["metric"].startswith("w:") and r.get("p_value") is not None]
  assert w and all(r["null"].startswith(f"permutation: updates paired with another task's "
                                        f"gradients (stopped after {made} of 20 draws")
                   for r in w)


@pytest.mark.parametrize("n_perm", [5, 19, 20, 39, 59, 100, 199])
def test_sequential_stopping_gives_the_decision_of_all_the_draws(n_perm):
  """For any number of draws and level: after ``stop_hits`` draws at least as large the test
  with all of them cannot clear, while with one fewer it still could; the sequential p-value
  max(h/L, (1+h)/(1+R)) is then at least alpha. Checked on random draw sequences."""
  from mesajax.analysis import stages
  rng = np.random.default_rng(n_perm)
  for alpha in (0.01, 0.05, 0.1):
    h = stages.stop_hits(n_perm, alpha)
    assert (1 + h) / (1 + n_perm) >= alpha
    assert h == 1 or h / (1 + n_perm) < alpha  # h − 1 such draws could still clear
    for _ in range(200):
      obs, draws = rng.normal(), rng.normal(size=n_perm) - rng.uniform(0, 3)
      full = (1 + np.sum(draws >= obs)) / (1 + n_perm)
      hits = np.cumsum(draws >= obs)
      if hits[-1] < h:  # never stopped: the sequential test is the full one
        continue
      made = int(np.argmax(hits >= h)) + 1
      null = {"stopped": True, "hits": h, "n_perm": n_perm}
      p_seq = stages._gain_pvalue(obs, draws[:made], null)
      assert p_seq >= alpha and full >= alpha


def test_points_one_at_a_time_give_the_rows_of_the_vmapped_points(monkeypatch):
  """Above ``point_batch_mb`` the points run one at a time (``jax.lax.map``) instead of vmapped:
  the same estimators on the same probes, so the same rows up to round-off."""
  from mesajax.analysis import context
  modes = []
  real = context._points_fn

  def spy(*args):
    modes.append(args[7])  # ``sequential``
    return real(*args)

  monkeypatch.setattr(context, "_points_fn", spy)
  opt = SGDM(learning_rate=0.05, momentum=0.9)
  # n = 256 with probes (dense_max = 1): ~1.3 MiB of probe products, above 1 MiB.
  run = lambda mb: suite.run_analyses(opt, opt.init_phi(), "sgdm", _splits(dim=256),
                                      _acfg(dense_max=1, point_batch_mb=mb), seed=0,
                                      stages=("nci",))
  vmapped, one_by_one = run(256), run(1)
  assert modes == [False, True]
  assert [r["metric"] for r in vmapped] == [r["metric"] for r in one_by_one]
  compared = 0
  for a, b in zip(vmapped, one_by_one):
    if a["value"] is None:
      assert b["value"] is None and a.get("undefined") == b.get("undefined")
      continue
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-9, atol=1e-12, err_msg=a["metric"])
    compared += 1
  assert compared >= 10 and any(r["metric"] == "qs:nci" for r in vmapped)
