"""Tests for the optimizers: baselines against optax, learned optimizers against hand-built numpy
references, gradients through unrolls, as_optax in plain optax loops, no recompilation,
validation."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.optimizers.base import make_context
from mesajax.optimizers.baselines import SGD, SGDM, Adam, RMSProp
from mesajax.optimizers.features import TIME_SCALES
from mesajax.optimizers.mlp_lopt import DECAYS, MLPLOpt
from mesajax.optimizers.rnn_lopt import RNNLOpt
from mesajax.registry import OPTIMIZERS, make_optimizer, optimizer_class


def _params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,)),
          "s": jax.random.normal(k3, ())}


def _grads(key, params, scale):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, jnp.shape(x))
                                      for k, x in zip(keys, leaves)])


def _quad_loss(params):
  """A quadratic over a two-leaf pytree: ½ Σ_i d_i θ_i² + ⟨c, θ⟩ with fixed d, c (raveled θ)."""
  flat, _ = ravel_pytree(params)
  d = jnp.linspace(0.5, 2.0, flat.size)
  c = jnp.cos(jnp.arange(flat.size, dtype=jnp.float32))
  return 0.5 * jnp.sum(d * flat ** 2) + jnp.dot(c, flat)


SMALL = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -0.25, 1.0, 2.0])}
# Every registered optimizer at its declared test options (``test_kwargs``), plus variants: a new
# optimizer registered in ``mesajax.registry.OPTIMIZERS`` is picked up without editing this file.
ALL = [make_optimizer(n, optimizer_class(n).test_kwargs) for n in sorted(OPTIMIZERS)] + [
    RNNLOpt(cell="gru")]
LEARNED = [o for o in ALL if o.learned]


# --- baselines against optax -----------------------------------------------------------------

BASELINE_CASES = [
    (SGD(learning_rate=0.1), optax.sgd(0.1)),
    (SGD(learning_rate=0.05, weight_decay=0.01, clip_norm=1.0),
     optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(0.01), optax.sgd(0.05))),
    (SGDM(learning_rate=0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
    (SGDM(learning_rate=0.1, momentum=0.5, nesterov=True),
     optax.sgd(0.1, momentum=0.5, nesterov=True)),
    (Adam(learning_rate=1e-2), optax.adam(1e-2)),
    (Adam(learning_rate=3e-3, b1=0.5, b2=0.9, eps=1e-3),
     optax.adam(3e-3, b1=0.5, b2=0.9, eps=1e-3)),
    (RMSProp(learning_rate=1e-2), optax.rmsprop(1e-2)),
    # a large eps tells eps-inside-the-sqrt from eps-outside apart
    (RMSProp(learning_rate=1e-2, decay=0.8, eps=0.1), optax.rmsprop(1e-2, decay=0.8, eps=0.1)),
]


@pytest.mark.parametrize("opt,ref", BASELINE_CASES, ids=lambda x: getattr(x, "name", ""))
def test_baseline_matches_optax(opt, ref):
  opt.validate()
  phi = opt.init_phi(None)
  key = jax.random.PRNGKey(0)
  p_ours = p_ref = p_tx = _params(key)
  s_ours, s_ref = opt.init(phi, p_ours), ref.init(p_ref)
  tx = opt.as_optax(phi)
  s_tx = tx.init(p_tx)
  for t in range(20):
    # gradient scales straddle the clipping threshold so both branches are exercised
    g = _grads(jax.random.fold_in(key, t), p_ours, scale=0.05 + 0.2 * (t % 5))
    u_ours, s_ours = opt.update(phi, s_ours, g, p_ours, make_context(t, 20))
    u_ref, s_ref = ref.update(g, s_ref, p_ref)
    u_tx, s_tx = tx.update(g, s_tx, p_tx)
    chex.assert_trees_all_close(u_ours, u_ref, rtol=2e-5, atol=1e-7)
    chex.assert_trees_all_close(u_tx, u_ref, rtol=2e-5, atol=1e-7)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
    p_tx = optax.apply_updates(p_tx, u_tx)
  chex.assert_trees_all_close(p_ours, p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(p_tx, p_ref, rtol=1e-5, atol=1e-6)


def test_baseline_state_layouts():
  p = _params(jax.random.PRNGKey(1))
  assert Adam().init(None, p)._fields == ("m", "v", "count")
  assert Adam().init(None, p).count.dtype == jnp.int32
  assert SGDM().init(None, p)._fields == ("m",)
  assert RMSProp().init(None, p)._fields == ("v",)
  assert SGD().init(None, p) == ()
  chex.assert_trees_all_equal_shapes(Adam().init(None, p).m, p)


# --- every optimizer in a plain optax loop ---------------------------------------------------

@pytest.mark.parametrize("opt", ALL, ids=lambda o: f"{o.name}-{getattr(o, 'cell', '')}")
def test_as_optax_in_a_plain_optax_loop(opt):
  phi = opt.init_phi(jax.random.PRNGKey(0))
  tx = opt.as_optax(phi, horizon=10)
  params = SMALL
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(_quad_loss)(params)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(10):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and np.all(np.isfinite(ravel_pytree(params)[0]))
  assert int(state.step) == 10
  chex.assert_trees_all_equal_shapes(params, SMALL)
  assert not np.allclose(ravel_pytree(params)[0], ravel_pytree(SMALL)[0])
  if not opt.learned and not getattr(opt, "objective_free", False):
    # hand-designed rules descend this quadratic at their default rates (no-objective controls
    # such as a pure-noise update need not)
    assert losses[-1] < losses[0]


def test_as_optax_requires_params():
  tx = SGD().as_optax(SGD().init_phi(None))
  with pytest.raises(ValueError):
    tx.update(SMALL, tx.init(SMALL))


@pytest.mark.parametrize("opt", ALL, ids=lambda o: f"{o.name}-{getattr(o, 'cell', '')}")
def test_no_recompile(opt):
  """optax-style: the jitted update is traced once, whether called directly or via as_optax."""
  phi = opt.init_phi(jax.random.PRNGKey(0))
  grads = jax.tree.map(jnp.ones_like, SMALL)
  traces = {"update": 0, "optax": 0}

  def update(state, step):
    traces["update"] += 1
    return opt.update(phi, state, grads, SMALL, make_context(step, 10))

  tx = opt.as_optax(phi)

  def optax_update(state):
    traces["optax"] += 1
    return tx.update(grads, state, SMALL)

  f, g = jax.jit(update), jax.jit(optax_update)
  s = opt.init(phi, SMALL)
  for t in range(3):
    _, s = f(s, jnp.int32(t))
  s = tx.init(SMALL)
  for _ in range(3):
    _, s = g(s)
  assert traces == {"update": 1, "optax": 1}


# --- learned optimizers -----------------------------------------------------------------------

def test_mlp_lopt_has_reference_size():
  opt = MLPLOpt()
  phi = opt.init_phi(jax.random.PRNGKey(0))
  n = sum(x.size for x in jax.tree.leaves(phi))
  assert n == 19 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2 == 1762
  assert opt.num_inputs == 19
  assert all(isinstance(k, str) for k in phi) and all(
      isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(phi))


def _np_mlp_lopt_update(opt, phi, momenta, g, p, step):
  """Independent numpy reference for one leaf: broadcast 19 features, full MLP, reference step."""
  g, p = np.asarray(g, np.float64).reshape(-1), np.asarray(p, np.float64).reshape(-1)
  beta = np.asarray(opt.decays)[:, None]
  m = beta * np.asarray(momenta, np.float64).reshape(len(opt.decays), -1) + (1 - beta) * g
  x = np.concatenate([g[:, None], p[:, None], m.T], axis=1)
  x = x / np.sqrt(np.mean(x ** 2, axis=0, keepdims=True) + opt.norm_eps)
  tfeat = np.tanh(step / np.asarray(opt.time_scales) - 1.0)
  h = np.concatenate([x, np.broadcast_to(tfeat, (x.shape[0], tfeat.size))], axis=1)
  names = [f"hidden_{i}" for i in range(opt.hidden_layers)] + ["out"]
  for i, name in enumerate(names):
    h = h @ np.asarray(phi[name]["kernel"]) + np.asarray(phi[name]["bias"])
    if i < len(names) - 1:
      h = np.maximum(h, 0.0)
  return -h[:, 0] * np.exp(opt.exp_mult * h[:, 1]) * opt.step_mult, m


def test_mlp_lopt_matches_numpy_reference():
  opt = MLPLOpt(out_init_scale=1.0)
  phi = opt.init_phi(jax.random.PRNGKey(3))
  key = jax.random.PRNGKey(4)
  params = _params(key)
  state = opt.init(phi, params)
  state = state._replace(momenta=jax.tree.map(
      lambda m: jax.random.normal(jax.random.fold_in(key, m.size), m.shape), state.momenta))
  grads = _grads(jax.random.fold_in(key, 1), params, 1.0)
  step = 37
  u, new_state = jax.jit(opt.update)(phi, state, grads, params, make_context(step, 100))
  for name in params:
    u_ref, m_ref = _np_mlp_lopt_update(opt, phi, state.momenta[name], grads[name], params[name],
                                       step)
    np.testing.assert_allclose(np.asarray(u[name]).reshape(-1), u_ref, rtol=2e-4, atol=1e-8)
    np.testing.assert_allclose(np.asarray(new_state.momenta[name]).reshape(len(DECAYS), -1), m_ref,
                               rtol=1e-5, atol=1e-6)
  assert new_state.momenta["w"].shape == (len(DECAYS), 3, 4)
  assert opt.time_scales == TIME_SCALES


def test_mlp_lopt_per_leaf_scale_invariance():
  """Scaling one leaf's gradient and momenta by c leaves every update unchanged (per-leaf
  normalisation); a whole-tree normaliser would change the other leaves' features."""
  opt = MLPLOpt(out_init_scale=1.0)
  phi = opt.init_phi(jax.random.PRNGKey(5))
  key = jax.random.PRNGKey(6)
  params = _params(key)
  grads = _grads(jax.random.fold_in(key, 1), params, 1.0)
  momenta = jax.tree.map(lambda g: jax.random.normal(jax.random.fold_in(key, g.size),
                                                     (len(DECAYS),) + g.shape), grads)
  ctx = make_context(12, 100)
  update = jax.jit(opt.update)
  u, _ = update(phi, opt.init(phi, params)._replace(momenta=momenta), grads, params, ctx)
  c = 300.0
  grads_c = dict(grads, w=c * grads["w"])
  momenta_c = dict(momenta, w=c * momenta["w"])
  u_c, _ = update(phi, opt.init(phi, params)._replace(momenta=momenta_c), grads_c, params, ctx)
  chex.assert_trees_all_close(u_c, u, rtol=1e-4, atol=1e-9)
  # and the direction is not trivially constant: scaling the parameters does change it
  u_p, _ = update(phi, opt.init(phi, params)._replace(momenta=momenta), grads,
                      dict(params, w=params["w"] + 3.0), ctx)
  assert not np.allclose(u_p["w"], u["w"], rtol=1e-3)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_rnn_step(opt, phi, h, c, x, tfeat):
  """Independent numpy LSTM/GRU step on broadcast inputs [x, τ-features]."""
  hs = opt.hidden_size
  xin = np.concatenate([x, np.broadcast_to(tfeat, (x.shape[0], tfeat.size))], axis=1)
  gx = xin @ np.asarray(phi["wx"]["kernel"]) + np.asarray(phi["wx"]["bias"])
  gh = h @ np.asarray(phi["wh"]["kernel"])
  if opt.cell == "lstm":
    z = gx + gh
    i, f, g, o = (z[:, k * hs:(k + 1) * hs] for k in range(4))
    c = _np_sigmoid(f) * c + _np_sigmoid(i) * np.tanh(g)
    h = _np_sigmoid(o) * np.tanh(c)
  else:
    gh = gh + np.asarray(phi["wh"]["bias"])
    r = _np_sigmoid(gx[:, :hs] + gh[:, :hs])
    z = _np_sigmoid(gx[:, hs:2 * hs] + gh[:, hs:2 * hs])
    n = np.tanh(gx[:, 2 * hs:] + r * gh[:, 2 * hs:])
    h = (1 - z) * n + z * h
  out = h @ np.asarray(phi["head"]["kernel"])[:, 0] + np.asarray(phi["head"]["bias"])[0]
  return h, c, opt.step_mult * out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_lopt_matches_numpy_reference(cell):
  opt = RNNLOpt(cell=cell, out_init_scale=1.0)
  phi = opt.init_phi(jax.random.PRNGKey(7))
  key = jax.random.PRNGKey(8)
  params = {"w": jax.random.normal(key, (3, 4))}
  # magnitudes from 1e-6 to 10 with alternating signs: both preprocessing branches are used
  g = (10.0 ** jnp.linspace(-6, 1, 12) * jnp.where(jnp.arange(12) % 2, 1, -1)).reshape(3, 4)
  state = opt.init(phi, params)
  state = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.fold_in(key, 2), a.shape),
                       state)
  u, new = jax.jit(opt.update)(phi, state, {"w": g}, params, make_context(5, 100))
  gn, pn = np.asarray(g, np.float64).reshape(-1), np.asarray(params["w"], np.float64).reshape(-1)
  x = np.stack([gn / np.sqrt(np.mean(gn ** 2) + opt.norm_eps),
                pn / np.sqrt(np.mean(pn ** 2) + opt.norm_eps)], axis=1)
  big = np.abs(gn) >= np.exp(-10.0)  # Andrychowicz et al. preprocessing, p = 10
  pre = np.stack([np.where(big, np.log(np.abs(gn)) / 10.0, -1.0),
                  np.where(big, np.sign(gn), np.exp(10.0) * gn)], axis=1)
  assert big.any() and not big.all()
  x = np.concatenate([x, pre], axis=1)
  h0 = np.asarray(state.h["w"]).reshape(12, -1)
  c0 = np.asarray(state.c["w"]).reshape(12, -1) if cell == "lstm" else None
  h, c, u_ref = _np_rnn_step(opt, phi, h0, c0, x, np.tanh(5 / np.asarray(TIME_SCALES) - 1.0))
  np.testing.assert_allclose(np.asarray(u["w"]).reshape(-1), u_ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new.h["w"]).reshape(12, -1), h, rtol=1e-4, atol=1e-6)
  if cell == "lstm":
    np.testing.assert_allclose(np.asarray(new.c["w"]).reshape(12, -1), c, rtol=1e-4, atol=1e-6)
  else:
    assert new.c is None


@pytest.mark.parametrize("cell,size", [("lstm", 32), ("gru", 16)])
def test_rnn_hidden_state_is_in_ravel_order(cell, size):
  opt = RNNLOpt(cell=cell)
  assert opt.state_size == size
  params = {"z": jnp.arange(6.0).reshape(2, 3), "a": 10.0 + jnp.arange(4.0), "m": jnp.array(-1.0)}
  state = opt.init(opt.init_phi(jax.random.PRNGKey(0)), params)
  assert opt.hidden_state(state).shape == (11, size)
  tag = jax.tree.map(lambda p: jnp.repeat(p[..., None], opt.hidden_size, -1), params)
  state = state._replace(h=tag, c=jax.tree.map(lambda x: -x, tag) if cell == "lstm" else None)
  hid = opt.hidden_state(state)
  flat = ravel_pytree(params)[0]
  np.testing.assert_array_equal(hid[:, 0], flat)
  np.testing.assert_array_equal(hid[:, opt.hidden_size - 1], flat)
  if cell == "lstm":
    np.testing.assert_array_equal(hid[:, opt.hidden_size], -flat)


def _unrolled_loss(opt, phi, params, steps=5):
  def body(carry, t):
    params, state = carry
    loss, grads = jax.value_and_grad(_quad_loss)(params)
    u, state = opt.update(phi, state, grads, params, make_context(t, steps, loss))
    return (optax.apply_updates(params, u), state), loss
  (params, _), losses = jax.lax.scan(body, (params, opt.init(phi, params)), jnp.arange(steps))
  return losses.mean() + _quad_loss(params)


@pytest.mark.parametrize("opt", LEARNED, ids=lambda o: f"{o.name}-{getattr(o, 'cell', '')}")
def test_learned_small_at_init_and_differentiable(opt):
  phi = opt.init_phi(jax.random.PRNGKey(0))
  grads = jax.grad(_quad_loss)(SMALL)
  u, _ = jax.jit(opt.update)(phi, opt.init(phi, SMALL), grads, SMALL, make_context(0, 5))
  flat_u = ravel_pytree(u)[0]
  assert np.all(np.isfinite(flat_u)) and 0 < np.max(np.abs(flat_u)) < 1e-3
  meta_grad = jax.jit(jax.grad(lambda phi: _unrolled_loss(opt, phi, SMALL)))(phi)
  flat = ravel_pytree(meta_grad)[0]
  assert np.all(np.isfinite(flat)) and np.linalg.norm(flat) > 0
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(meta_grad))


def test_mlp_lopt_meta_gradient_matches_finite_differences():
  opt = MLPLOpt(out_init_scale=1.0, step_mult=0.05)
  phi = opt.init_phi(jax.random.PRNGKey(1))
  value_and_grad = jax.jit(jax.value_and_grad(lambda phi: _unrolled_loss(opt, phi, SMALL)))
  _, grad = value_and_grad(phi)
  flat, unravel = ravel_pytree(phi)
  v = jax.random.normal(jax.random.PRNGKey(2), flat.shape)
  v = v / jnp.linalg.norm(v)
  eps = 1e-2
  fd = (value_and_grad(unravel(flat + eps * v))[0]
        - value_and_grad(unravel(flat - eps * v))[0]) / (2 * eps)
  np.testing.assert_allclose(fd, jnp.dot(ravel_pytree(grad)[0], v), rtol=3e-2)
  # rematerialisation changes the schedule, not the values
  no_remat = MLPLOpt(out_init_scale=1.0, step_mult=0.05, remat=False)
  grad_plain = jax.jit(jax.grad(lambda phi: _unrolled_loss(no_remat, phi, SMALL)))(phi)
  chex.assert_trees_all_close(grad_plain, grad, rtol=1e-5, atol=1e-7)


def test_mlp_lopt_loss_feature():
  opt = MLPLOpt(use_loss_feature=True)
  assert opt.num_inputs == 20
  phi = opt.init_phi(jax.random.PRNGKey(0))
  state = opt.init(phi, SMALL)
  update = jax.jit(opt.update)
  _, state = update(phi, state, SMALL, SMALL, make_context(0, 5, loss=4.0))
  _, state = update(phi, state, SMALL, SMALL, make_context(1, 5, loss=2.0))
  assert float(state.loss_init) == 4.0
  assert MLPLOpt().init(None, SMALL).loss_init is None


# --- registry and validation -----------------------------------------------------------------

def test_registry_builds_every_optimizer():
  assert {"sgd", "sgdm", "adam", "rmsprop", "mlp_lopt", "rnn_lopt"} <= set(OPTIMIZERS)
  for name in OPTIMIZERS:
    assert make_optimizer(name).name == name


@pytest.mark.parametrize("opt", ALL, ids=lambda o: f"{o.name}-{getattr(o, 'cell', '')}")
def test_learning_rate_contract(opt):
  """Tunable optimizers set their rate through ``with_learning_rate`` (the first update of every
  tunable rule here is linear in the rate); the others refuse it."""
  phi = opt.init_phi(jax.random.PRNGKey(0))
  if not opt.tunable_lr:
    with pytest.raises(ValueError, match="no tunable learning rate"):
      opt.with_learning_rate(phi, 0.1)
    return
  g = jax.tree.map(jnp.ones_like, SMALL)
  u = lambda lr: ravel_pytree(opt.update(opt.with_learning_rate(phi, lr), opt.init(phi, SMALL), g,
                                         SMALL, make_context(0, 10))[0])[0]
  np.testing.assert_allclose(u(0.2), 2.0 * u(0.1), rtol=1e-5)
  lrs = jnp.asarray([0.1, 0.2, 0.4])
  assert jax.vmap(lambda lr: opt.with_learning_rate(phi, lr))(lrs) is not None  # vmappable


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_non_finite_options_are_refused(name):
  opt = make_optimizer(name, optimizer_class(name).test_kwargs)
  floats = [f.name for f in dataclasses.fields(opt) if isinstance(getattr(opt, f.name), float)]
  for field in floats:
    for bad in (float("nan"), float("inf")):
      with pytest.raises(ValueError, match="finite"):
        make_optimizer(name, {**optimizer_class(name).test_kwargs, field: bad})


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", {"learning_rate": 0.0}), ("sgd", {"learning_rate": -1.0}),
    ("sgd", {"weight_decay": -0.1}), ("sgd", {"clip_norm": -1.0}),
    ("sgdm", {"momentum": 1.0}), ("sgdm", {"momentum": -0.1}), ("sgdm", {"learning_rate": 0.0}),
    ("adam", {"b1": 1.0}), ("adam", {"b2": -0.5}), ("adam", {"learning_rate": -1e-3}),
    ("rmsprop", {"decay": 1.0}), ("rmsprop", {"eps": 0.0}),
    ("mlp_lopt", {"hidden_size": 0}), ("mlp_lopt", {"decays": (0.5, 1.0)}),
    ("mlp_lopt", {"step_mult": 0.0}), ("mlp_lopt", {"time_scales": (1.0, -3.0)}),
    ("rnn_lopt", {"cell": "transformer"}), ("rnn_lopt", {"hidden_size": 0}),
    ("rnn_lopt", {"step_mult": -0.01}),
])
def test_validate_rejects_bad_options(name, kwargs):
  with pytest.raises(ValueError):
    make_optimizer(name, kwargs)
