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
  for s in range(2):
    cfg = smoke_config(optimizer="sgd", loss_transform="none")
    cfg.unlock()
    cfg.seed = int(cfg.seed) + s
    single = MetaTrainer(cfg)
    st = single.init()
    for _ in range(3):
      st, _ = single.step(st)
    np.testing.assert_allclose(_phi_flat(jax.tree.map(lambda x: x[s], state.phi)),
                               _phi_flat(st.phi), rtol=1e-5, atol=1e-7)


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
  metrics rows list the stalled members and stderr says so once per member; the log transform has
  no flat region and flags nothing."""
  import json
  from mesajax.meta.train import train
  for transform, expect in (("clip", [0, 1]), ("log", None)):
    cfg = smoke_config(optimizer="sgd", num_seeds=2, loss_transform=transform,
                       num_outer_steps=4, log_every=2, select_every=0)
    cfg.unlock()
    cfg.optimizer.kwargs.learning_rate = 3.0
    wd = tmp_path / transform
    train(cfg, str(wd), progress=False)
    rows = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    logged = [r for r in rows if "meta_loss" in r]
    assert len(logged) == 2
    assert [r.get("zero_grad_members") for r in logged] == [expect, expect]
    err = capsys.readouterr().err
    if expect:
      assert err.count("meta-gradient exactly 0") == 1 and "loss_transform='log'" in err
      assert "member(s) [0, 1]" in err
    else:
      assert "meta-gradient exactly 0" not in err
