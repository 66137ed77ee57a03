"""Meta-gradient estimators against exact meta-gradients on small quadratic problems."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import DiagSGD
from mesajax.meta.estimators import make_estimator
from mesajax.meta.truncation import Unroller
from mesajax.registry import make_task_family

DIM = 4


def _cos(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _setup(kind, num_tasks, horizon, k, sigma=0.02):
  family = make_task_family("quadratic", {"dim": DIM, "cond": 10.0})
  opt = DiagSGD(dim=DIM, learning_rate=0.2)
  unroller = Unroller(opt, family, horizon, k, "mean_outer", "none")
  est = make_estimator(kind, unroller, num_tasks, sigma)
  phi = opt.init_phi(jax.random.PRNGKey(1))
  state = est.init(phi, jax.random.PRNGKey(2))
  return family, opt, unroller, est, phi, state


def _at_step_zero(state):
  """Every trajectory at its start (no staggering), so the truncations line up."""
  fix = lambda ts: ts._replace(inner=ts.inner._replace(step=jnp.zeros_like(ts.inner.step)))
  if hasattr(state, "xi"):  # PES: both branches stacked in state.ts
    return state._replace(ts=fix(state.ts))
  return fix(state)


def test_tbptt_equals_hand_written_backprop():
  """One truncation covering the whole horizon: TBPTT is exact backprop; compare with a plain
  Python-loop implementation of the same inner run (independent of the scan/vmap code)."""
  family, opt, unroller, est, phi, state = _setup("tbptt", 3, 6, 6)
  state = _at_step_zero(state)
  _, loss, grad = jax.jit(est.estimate)(phi, state, jax.random.PRNGKey(3))

  def reference(phi):
    total = 0.0
    for i in range(3):
      task = jax.tree.map(lambda x: x[i], state.task)
      theta = state.inner.params["theta"][i]
      norm = family.outer_loss_full({"theta": theta}, task)
      losses = []
      for _ in range(6):
        g = jax.grad(lambda t: family.train_loss_full({"theta": t}, task))(theta)
        theta = theta - jnp.exp(phi["log_lr"]) * g
        losses.append(family.outer_loss_full({"theta": theta}, task) / norm)
      total += sum(losses) / 6
    return total / 3

  ref_loss, ref_grad = jax.value_and_grad(reference)(phi)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad["log_lr"], ref_grad["log_lr"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["es", "pes"])
def test_es_pes_match_exact_gradient_one_truncation(kind):
  n = 2048
  _, _, unroller, est, phi, state = _setup(kind, n, 10, 10)
  state = _at_step_zero(state)
  _, _, grad = jax.jit(est.estimate)(phi, state, jax.random.PRNGKey(4))
  ts = est.trajectories(state)
  keys = jax.random.split(jax.random.PRNGKey(0), n)  # the losses are deterministic (noise = 0)
  exact = jax.grad(lambda p: jnp.mean(jax.vmap(unroller.unroll, (None, 0, 0))(p, ts, keys)[1]))(phi)
  assert _cos(grad["log_lr"], exact["log_lr"]) >= 0.9


def test_pes_unbiased_across_truncations_tbptt_not():
  """Horizon of two truncations. The exact gradient of the second truncation's loss flows through
  the first truncation too: PES (accumulated perturbations) recovers it, TBPTT (state held fixed)
  does not."""
  n, k = 4096, 8
  _, _, unroller, pes, phi, pes_state = _setup("pes", n, 2 * k, k, sigma=0.02)
  pes_state = _at_step_zero(pes_state)
  tb = make_estimator("tbptt", unroller, n)
  ts0 = pes.trajectories(pes_state)
  keys = jax.random.split(jax.random.PRNGKey(0), n)

  def second_truncation_loss(p):
    ts1, _ = jax.vmap(unroller.unroll, (None, 0, 0))(p, ts0, keys)
    return jnp.mean(jax.vmap(unroller.unroll, (None, 0, 0))(p, ts1, keys)[1])

  exact = jax.grad(second_truncation_loss)(phi)["log_lr"]
  step_pes = jax.jit(pes.estimate)
  s, _, _ = step_pes(phi, pes_state, jax.random.PRNGKey(5))
  _, _, g_pes = step_pes(phi, s, jax.random.PRNGKey(6))
  ts1, _ = jax.vmap(unroller.unroll, (None, 0, 0))(phi, ts0, keys)
  _, _, g_tb = jax.jit(tb.estimate)(phi, ts1, jax.random.PRNGKey(7))
  rel = lambda g: float(np.linalg.norm(g - exact) / np.linalg.norm(exact))
  assert _cos(g_pes["log_lr"], exact) >= 0.9
  assert rel(g_pes["log_lr"]) < 0.4
  # TBPTT misses the path through the first truncation: a large, systematic error.
  assert rel(g_tb["log_lr"]) > 2 * rel(g_pes["log_lr"])
  assert rel(g_tb["log_lr"]) > 0.3
