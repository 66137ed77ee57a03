"""Known answer for hidden-state probes: a cell that embeds Adam's (m, v) linearly."""
import numpy as np

from mesajax.analysis import probes


def _adam_cell(seed=0, b=8, t=400, n=10, b1=0.9, b2=0.999):
  """Gradients with a drifting scale (so EMAs at different decays decorrelate), Adam's uncorrected
  moments m (β₁) and v (β₂), and a hidden state that is a random linear embedding of (m, v)."""
  rng = np.random.default_rng(seed)
  # Piecewise-constant log-scale with random jumps (about every 30 steps) in [-1.5, 1.5].
  jumps = rng.uniform(size=(b, t, n)) < 1 / 30
  levels = rng.uniform(-1.5, 1.5, (b, t, n))
  idx = np.maximum.accumulate(np.where(jumps, np.arange(t)[None, :, None], 0), axis=1)
  scale = np.exp(np.take_along_axis(levels, idx, axis=1))
  g = scale * rng.standard_normal((b, t, n)) + 0.3 * rng.standard_normal((b, 1, n))
  m, v = probes.ema(g, b1), probes.ema(g * g, b2)
  hidden = np.stack([m, v], -1) @ rng.standard_normal((2, 6))
  loss = np.exp(-np.arange(t) / 100.0)[None].repeat(b, 0) * rng.uniform(0.5, 2.0, (b, 1))
  return hidden, probes.targets(g, loss, np.ones((b, t)), horizon=t)


def test_ema_matches_recursion():
  x = np.arange(1.0, 5.0)[None, :, None]
  np.testing.assert_allclose(probes.ema(x, 0.5)[0, :, 0], [0.5, 1.25, 2.125, 3.0625])


def test_probes_find_adams_true_decays():
  hidden, tg = _adam_cell()
  res = probes.probe_all(hidden, tg, seed=0, n_boot=200)
  assert res["ema_g@0.9"]["r2"] > 0.999 and res["ema_g2@0.999"]["r2"] > 0.999
  for d in ("0.5", "0.99", "0.999"):
    assert res[f"ema_g@{d}"]["r2"] < 0.6, d
  for d in ("0.5", "0.9", "0.99"):
    assert res[f"ema_g2@{d}"]["r2"] < 0.8, d
  # The control (shuffled targets) is not predictable: selectivity ≈ R².
  assert res["ema_g@0.9"]["r2_control"] < 0.05
  np.testing.assert_allclose(res["ema_g@0.9"]["selectivity"], res["ema_g@0.9"]["r2"], atol=0.05)
  assert res["ema_g@0.9"]["r2_lo"] <= res["ema_g@0.9"]["r2"] <= res["ema_g@0.9"]["r2_hi"]
  assert res["ema_g@0.9"]["n"] == 2  # tasks 3 and 7 are the test fold


def test_a_state_without_gradient_memory_predicts_nothing():
  hidden, tg = _adam_cell(seed=1)
  rng = np.random.default_rng(2)
  res = probes.probe_all(rng.standard_normal(hidden.shape), tg, seed=0, n_boot=50)
  assert res["ema_g@0.9"]["r2"] < 0.05 and res["ema_g2@0.999"]["r2"] < 0.05


def test_step_folds_when_few_tasks():
  hidden, tg = _adam_cell(b=2, t=300)
  res = probes.probe_all(hidden, tg, seed=0, n_boot=50)
  assert res["ema_g@0.9"]["r2"] > 0.999 and res["ema_g@0.9"]["n"] == 1
