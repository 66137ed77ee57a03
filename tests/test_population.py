"""The outer step's guarantees: seed populations as one program, a finite guard on the updated
meta-parameters, and selection that starts from the scored initial phi."""
import jax
import jax.numpy as jnp
import numpy as np

from helpers import smoke_config
from mesajax.meta.outer import SCORE_CAP, MetaTrainer


def _phi_flat(phi):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(phi))])


def test_population_members_are_the_single_seed_runs():
  """Member s of an S-seed population follows the run a single-seed config with seed + s makes
  (same phi₀, tasks and minibatches), up to float32 reduction order; one compile for all seeds."""
  pop = MetaTrainer(smoke_config(optimizer="sgd", num_seeds=2, loss_transform="none"))
  traces = []
  inner = pop._step
  pop._step = lambda s: (traces.append(1), inner(s))[1]
  state = pop.init()
  for _ in range(3):
    state, metrics = pop.step(state)
  assert len(traces) == 1 and metrics["meta_loss"].shape == (2,)
  assert pop.inner_steps_per_outer_step() == 2 * pop.estimator.inner_steps_per_estimate()
  # Member 1 (seed + 1: the offset and the vmapped member axis both show; member 0 is the same
  # map at offset 0, and a third compile would add ~15 s to the suite).
  s = 1
  cfg = smoke_config(optimizer="sgd", loss_transform="none")
  cfg.unlock()
  cfg.seed = int(cfg.seed) + s
  single = MetaTrainer(cfg)
  st = single.init()
  for _ in range(3):
    st, _ = single.step(st)
  np.testing.assert_allclose(_phi_flat(jax.tree.map(lambda x: x[s], state.phi)),
                             _phi_flat(st.phi), rtol=1e-5, atol=1e-7)
  assert not np.allclose(_phi_flat(jax.tree.map(lambda x: x[0], state.phi)), _phi_flat(st.phi))


def test_non_finite_update_never_enters_phi():
  """An outer update that is non-finite while the loss and meta-gradient are finite (here: an
  outer optimizer whose update overflows) is skipped: phi and the outer state stay as they were
  and the skip is counted."""
  import optax
  trainer = MetaTrainer(smoke_config(optimizer="sgd"))
  real = trainer.outer_opt

  def overflowing_update(grads, state, params=None):
    updates, state = real.update(grads, state, params)
    return jax.tree.map(lambda u: u * jnp.inf, updates), state

  trainer.outer_opt = optax.GradientTransformation(real.init, overflowing_update)
  state = trainer.init()
  phi0, opt0 = _phi_flat(state.phi), _phi_flat(state.opt_state)
  state, metrics = trainer.step(state)
  assert bool(metrics["skipped"]) and int(state.num_skipped) == 1
  assert np.isfinite(float(metrics["meta_loss"])) and np.isfinite(float(metrics["grad_norm"]))
  np.testing.assert_array_equal(_phi_flat(state.phi), phi0)
  np.testing.assert_array_equal(_phi_flat(state.opt_state), opt0)


def test_selection_keeps_a_better_initial_phi():
  """best_phi starts as phi₀ and is scored at the first selection: a phi that diverges (scored at
  the cap) never replaces it."""
  trainer = MetaTrainer(smoke_config(optimizer="sgd"))
  state = trainer.init()
  phi0 = _phi_flat(state.phi)
  bad = jax.tree.map(lambda x: x + 50.0, state.phi)  # exp(log_lr + 50): every run explodes
  state, score = trainer.select(state._replace(phi=bad))
  assert score == SCORE_CAP
  np.testing.assert_array_equal(_phi_flat(state.best_phi), phi0)
  assert float(state.best_score) < SCORE_CAP



def test_member_with_zero_meta_gradient_is_flagged(tmp_path, capsys):
  """SGD at lr 3 diverges on the smoke regression, so every truncation's loss is above its initial
  value: the clipped objective min(L/L0, 1) is flat there and the meta-gradient is exactly 0. The
  metrics rows list such members and stderr names each once; a skipped step or a non-zero gradient
  is not flagged."""
  import json
  from mesajax.meta import train as tr
  cfg = smoke_config(optimizer="sgd", num_seeds=2, loss_transform="clip")
  cfg.unlock()
  cfg.optimizer.kwargs.learning_rate = 3.0
  trainer = MetaTrainer(cfg)
  _, metrics = trainer.step(trainer.init())
  assert np.all(np.asarray(metrics["grad_norm"]) == 0.0)
  assert np.all(np.asarray(metrics["meta_loss"]) == 1.0)

  path = str(tmp_path / "metrics.jsonl")
  stalled = tr.Stalled("clip", seed=7)
  fake = lambda g, skipped: {"meta_loss": np.ones(3), "grad_norm": np.asarray(g),
                             "skipped": np.asarray(skipped), "num_skipped": np.zeros(3, int)}
  for step, (g, skipped) in enumerate([([0.0, 0.5, 0.0], [False, False, True]),
                                       ([0.0, 0.5, 0.0], [False, False, False])], 1):
    tr._report((step, fake(g, skipped)), path, tr.tqdm(disable=True), 0.0, 1, 0, None, stalled)
  rows = [json.loads(x) for x in open(path)]
  assert [r.get("zero_grad_members") for r in rows] == [[0], [0, 2]]
  err = capsys.readouterr().err
  assert err.count("meta-gradient exactly 0") == 2 and "loss_transform='log'" in err
  assert "member(s) [0] (seed 7)" in err and "member(s) [2] (seed 9)" in err
