"""Task families: one shared smoke test over the registry, then closed-form checks per family."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mesajax.registry import TASKS, make_task_family
from mesajax.registry import task_class as registry_class
from mesajax.tasks import classifier, data
from mesajax.tasks import quadratic as quad_lib
from mesajax.tasks import regression as reg_lib

# Sizes, shifted knob values and GD step sizes come from each family's own declarations
# (``test_kwargs``, ``test_shift``, ``gd_lr`` on its class): a new family registered in
# ``mesajax.registry.TASKS`` is picked up here without editing this file.
N_TASKS, GD_STEPS = 3, 5


def _family(name, **overrides):
  cls = registry_class(name)
  return make_task_family(name, {**cls.test_kwargs, **overrides})


def _run(family, key):
  """Everything the rollouts use, vmapped over N_TASKS tasks, in one jitted function."""
  k_task, k_init, k_loss = jax.random.split(key, 3)
  tasks = family.sample_batch(k_task, N_TASKS)
  params = jax.vmap(family.init)(jax.random.split(k_init, N_TASKS), tasks)
  keys = jax.random.split(k_loss, N_TASKS)
  losses = {
      "train": jax.vmap(family.train_loss)(params, tasks, keys),
      "outer": jax.vmap(family.outer_loss)(params, tasks, keys),
      "train_full": jax.vmap(family.train_loss_full)(params, tasks),
      "outer_full": jax.vmap(family.outer_loss_full)(params, tasks),
  }
  for pname, phi in family.proxies().items():
    losses[f"proxy_{pname}"] = jax.vmap(phi)(params, tasks)
  grads = jax.vmap(jax.grad(family.train_loss))(params, tasks, keys)

  def gd_step(p, _):
    g = jax.vmap(jax.grad(family.train_loss_full))(p, tasks)
    return jax.tree.map(lambda a, b: a - type(family).gd_lr * b, p, g), None

  final, _ = jax.lax.scan(gd_step, params, None, length=GD_STEPS)
  losses["train_full_after_gd"] = jax.vmap(family.train_loss_full)(final, tasks)
  return params, grads, losses


def _trace_light(family, key):
  tasks = family.sample_batch(key, N_TASKS)
  params = jax.vmap(family.init)(jax.random.split(key, N_TASKS), tasks)
  keys = jax.random.split(key, N_TASKS)
  train = jax.vmap(family.train_loss)(params, tasks, keys)
  return train + jax.vmap(family.outer_loss_full)(params, tasks)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_family_smoke(name):
  family = _family(name)
  params, grads, losses = jax.jit(lambda k: _run(family, k))(jax.random.PRNGKey(0))
  for what, value in losses.items():
    assert value.shape == (N_TASKS,), what
    assert np.all(np.isfinite(value)), (what, value)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(ravel_pytree(grads)[0].std()) > 0.0
  # One task's params ravel into a flat vector (what the analyses use).
  flat, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], params))
  assert flat.ndim == 1 and jax.tree.structure(unravel(flat)) == jax.tree.structure(grads)
  assert np.all(losses["train_full_after_gd"] < losses["train_full"]), losses

  # Every knob has a valid shift; each shifted family traces (abstractly: no compile).
  knobs, shift = family.knobs(), type(family).test_shift
  assert set(shift) | set(type(family).file_knobs) == set(knobs), (
      f"declare a test_shift value for every knob of {name} (or list it in file_knobs)")
  for knob, value in shift.items():
    shifted = family.replace(**{knob: value})
    assert getattr(shifted, knob) == value and value != knobs[knob]
    out = jax.eval_shape(lambda k: _trace_light(shifted, k), jax.random.PRNGKey(0))
    assert out.shape == (N_TASKS,)
  with pytest.raises(ValueError, match="no knob"):
    family.replace(not_a_knob=1)
  # Its default shifts are valid splits of the family.
  for spec in type(family).default_shifts.values():
    assert set(spec) <= {"task", "horizon_mult"}
    family.replace(**spec.get("task", {}))


@pytest.mark.parametrize("name", sorted(n for n in TASKS if registry_class(n).sample_only))
def test_sample_only_knobs_change_nothing_but_sampling(name):
  """A ``sample_only`` knob (the analyses compile once across splits differing only in it) leaves
  init, every loss, minibatch loss and proxy of a given task unchanged; and it does change the
  sampled tasks (else it is not a knob of sampling at all)."""
  family = _family(name)
  key = jax.random.PRNGKey(3)
  task = family.sample(key)
  for knob in type(family).sample_only:
    shifted = family.replace(**{knob: type(family).test_shift[knob]})
    assert shifted.program_key() == family.program_key()
    assert hash(shifted.program_key()) == hash(family.program_key())
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), task, shifted.sample(key))
    assert any(jax.tree.leaves(changed)), f"{knob} does not change sampling"
    for fam in (family, shifted):  # both evaluate the same task
      params = fam.init(jax.random.PRNGKey(4), task)
      vals = [fam.train_loss_full(params, task), fam.outer_loss_full(params, task),
              fam.train_loss(params, task, key), fam.outer_loss(params, task, key)]
      vals += [f(params, task) for f in fam.proxies().values()]
      if fam is family:
        ref, ref_params = vals, params
      else:
        jax.tree.map(np.testing.assert_array_equal, params, ref_params)
        np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref))
  others = {k: v for k, v in type(family).test_shift.items() if k not in type(family).sample_only}
  assert family.replace(**others).program_key() != family.program_key()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_non_finite_knobs_are_refused(name):
  """NaN and inf pass most range checks; every float knob is checked for finiteness first."""
  cls = registry_class(name)
  floats = [k for k, v in make_task_family(name, cls.test_kwargs).knobs().items()
            if isinstance(v, float)]
  for knob in floats:
    for bad in (float("nan"), float("inf")):
      with pytest.raises(ValueError, match="finite"):
        make_task_family(name, {**cls.test_kwargs, knob: bad})


# --- quadratic ---------------------------------------------------------------------------------
def test_quadratic_gradient_spectrum_and_rotation():
  family = make_task_family("quadratic", {"dim": 6, "cond": 50.0, "eig_max": 3.0})
  flat = family.replace(rotate=False)
  theta = np.random.default_rng(0).normal(size=6).astype(np.float32)

  @jax.jit
  def run(key, theta):
    task = family.sample(key)
    params = {"theta": theta}
    return (task, jax.grad(family.train_loss_full)(params, task)["theta"],
            quad_lib.gradient(params, task)["theta"],
            family.outer_loss_full(quad_lib.optimum(task), task), flat.sample(key))

  task, grad, closed_grad, loss_at_opt, flat_task = run(jax.random.PRNGKey(1), theta)
  a, q = np.asarray(task["A"], np.float64), np.asarray(task["Q"], np.float64)
  want = a @ (theta - np.asarray(task["theta_star"], np.float64))
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(closed_grad, want, rtol=1e-4, atol=1e-5)
  eigs = np.linalg.eigvalsh(a)
  assert eigs.min() >= 3.0 / 50.0 * (1 - 1e-4) and eigs.max() <= 3.0 * (1 + 1e-4), eigs
  np.testing.assert_allclose(np.sort(eigs), np.sort(task["eigs"]), rtol=1e-4)
  np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
  assert np.abs(a - np.diag(np.diag(a))).max() > 1e-2  # rotated: not axis-aligned
  np.testing.assert_allclose(quad_lib.hessian(task), a, rtol=1e-6)
  assert float(loss_at_opt) == pytest.approx(0.0, abs=1e-10)
  # rotate=False: A is diagonal with the sampled eigenvalues.
  np.testing.assert_allclose(flat_task["A"], np.diag(flat_task["eigs"]), atol=0)


def test_quadratic_matches_learned_optimization_fixed_dim_family():
  """FixedDimQuadraticFamily: loss sum((target - theta)^2), target ~ N(0, I), theta_0 ~ N(0, I)."""
  family = make_task_family("quadratic", dict(dim=7, eig_max=2.0, cond=1.0, rotate=False,
                                              optimum_scale=1.0, init_scale=1.0))

  @jax.jit
  def run(key):
    k_task, k_init, k_loss = jax.random.split(key, 3)
    tasks = family.sample_batch(k_task, 300)
    thetas = jax.vmap(family.init)(jax.random.split(k_init, 300), tasks)
    return tasks, thetas, jax.vmap(family.train_loss)(thetas, tasks, jax.random.split(k_loss, 300))

  tasks, thetas, loss = run(jax.random.PRNGKey(2))
  target, theta = np.asarray(tasks["theta_star"]), np.asarray(thetas["theta"])
  np.testing.assert_allclose(loss, np.sum((target - theta) ** 2, axis=1), rtol=1e-5)
  for x in (target, theta):  # both standard normal (300 x 7 draws)
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1.0) < 0.07


def test_quadratic_gradient_noise_std():
  family = make_task_family("quadratic", {"dim": 4, "noise": 0.3})
  params = {"theta": jnp.array([0.5, -1.0, 2.0, 0.0])}

  @jax.jit
  def run(key):
    k_task, k_noise = jax.random.split(key)
    task = family.sample(k_task)
    keys = jax.random.split(k_noise, 20000)
    grads = jax.vmap(jax.grad(family.train_loss), (None, None, 0))(params, task, keys)["theta"]
    noise = grads - quad_lib.gradient(params, task)["theta"]
    return noise, family.outer_loss(params, task, k_noise), family.train_loss_full(params, task)

  noise, outer, full = run(jax.random.PRNGKey(5))
  noise = np.asarray(noise)
  assert np.all(np.abs(noise.mean(0)) < 0.01), noise.mean(0)
  np.testing.assert_allclose(noise.std(0), 0.3, rtol=0.03)
  np.testing.assert_allclose(np.corrcoef(noise.T), np.eye(4), atol=0.03)  # isotropic
  assert float(outer) == float(full)  # the outer loss stays noiseless


# --- regression --------------------------------------------------------------------------------
def test_linreg_least_squares_beats_teacher_on_train():
  family = make_task_family("linreg", {"n_train": 40, "input_cond": 5.0})
  task = jax.jit(family.sample)(jax.random.PRNGKey(7))
  x = np.asarray(task["x_train"], np.float64)
  x1 = np.concatenate([x, np.ones((40, 1))], axis=1)
  sol = np.linalg.lstsq(x1, np.asarray(task["y_train"], np.float64), rcond=None)[0]
  ls = {"w": jnp.asarray(sol[:-1], jnp.float32), "b": jnp.asarray(sol[-1], jnp.float32)}
  teacher = {"w": task["w_star"] * family.w_scale, "b": jnp.zeros([])}

  @jax.jit
  def measure(params):
    return (family.train_loss_full(params, task), family.outer_loss_full(params, task),
            jax.grad(family.train_loss_full)(params, task),
            {k: phi(params, task) for k, phi in family.proxies().items()})

  (train_ls, outer_ls, grad_ls, _), (train_t, outer_t, _, proxies_t) = measure(ls), measure(teacher)
  assert float(train_ls) <= float(train_t)
  assert float(outer_ls) > float(outer_t)
  assert float(np.abs(ravel_pytree(grad_ls)[0]).max()) < 1e-4
  np.testing.assert_allclose(jax.jit(reg_lib.least_squares)(task)["w"], sol[:-1], rtol=1e-3,
                             atol=1e-4)
  # Proxies at the teacher: zero parameter error and zero population excess.
  for value in proxies_t.values():
    assert float(value) == pytest.approx(0.0, abs=1e-7)


def test_input_covariance_spectrum():
  cov, cov_sqrt = data.input_covariance(jax.random.PRNGKey(8), 8, 30.0)
  eigs = np.linalg.eigvalsh(np.asarray(cov, np.float64))
  assert eigs.mean() == pytest.approx(1.0, rel=1e-5)
  assert eigs.max() / eigs.min() <= 30.0 * (1 + 1e-4)
  np.testing.assert_allclose(cov_sqrt @ cov_sqrt, cov, atol=1e-5)


def test_logreg_labels_and_loss():
  family = make_task_family("logreg", {"n_val": 4000, "logit_scale": 1e4, "label_noise": 0.2})
  task = jax.jit(family.sample)(jax.random.PRNGKey(9))
  y, z = np.asarray(task["y_val"]), np.asarray(task["x_val"] @ task["w_star"])
  assert set(np.unique(y)) <= {0.0, 1.0}
  flipped = np.mean(y != (z > 0))  # near-deterministic teacher: disagreements are the flips
  assert abs(flipped - 0.2) < 0.025, flipped
  params = {"w": jnp.ones(10) * 0.1, "b": jnp.array(0.3)}
  logits = np.asarray(task["x_train"] @ params["w"] + 0.3, np.float64)
  yt = np.asarray(task["y_train"], np.float64)
  p = 1 / (1 + np.exp(-logits))
  want = -np.mean(yt * np.log(p) + (1 - yt) * np.log(1 - p))
  assert float(jax.jit(family.train_loss_full)(params, task)) == pytest.approx(want, rel=1e-5)


def test_linreg_oracle_is_the_bayes_posterior_mean():
  """The oracle equals ridge with λ = σ²·dim/w_scale² solved in float64, and on average over tasks
  beats least squares and the teacher-free zero predictor on the validation loss."""
  family = make_task_family("linreg", {"dim": 6, "n_train": 8, "noise": 0.7, "w_scale": 1.5})
  tasks = jax.jit(lambda k: family.sample_batch(k, 64))(jax.random.PRNGKey(3))
  oracle = jax.jit(jax.vmap(family.oracle))(tasks)
  lam = 0.7 ** 2 * 6 / 1.5 ** 2
  x, y = np.asarray(tasks["x_train"], np.float64), np.asarray(tasks["y_train"], np.float64)
  ref = np.stack([np.linalg.solve(a.T @ a + lam * np.eye(6), a.T @ b) for a, b in zip(x, y)])
  np.testing.assert_allclose(oracle["w"], ref, rtol=2e-4, atol=2e-5)
  outer = jax.jit(jax.vmap(family.outer_loss_full))
  ls = jax.jit(jax.vmap(reg_lib.least_squares))(tasks)
  assert float(outer(oracle, tasks).mean()) < float(outer(ls, tasks).mean())
  zero = jax.tree.map(jnp.zeros_like, oracle)
  assert float(outer(oracle, tasks).mean()) < float(outer(zero, tasks).mean())


def test_quadratic_oracle_is_the_minimiser():
  family = make_task_family("quadratic", {"dim": 5})
  task = family.sample(jax.random.PRNGKey(0))
  assert float(family.outer_loss_full(family.oracle(task), task)) == pytest.approx(0.0, abs=1e-10)
  assert make_task_family("mlp").oracle(None) is None


def test_minibatch_without_replacement():
  x = jnp.arange(20.0)
  (b,) = data.minibatch(jax.random.PRNGKey(10), (x,), 8)
  assert b.shape == (8,) and len(np.unique(b)) == 8
  (full,) = data.minibatch(jax.random.PRNGKey(10), (x,), None)
  assert full is x


# --- classifiers -------------------------------------------------------------------------------
def test_mlp_params_match_hand_built_forward():
  family = make_task_family("mlp", {"depth": 2, "width": 5, "activation": "relu"})
  params = jax.jit(family.init)(jax.random.PRNGKey(11), None)
  assert set(params) == {"hidden0", "hidden1", "out"}
  x = np.random.default_rng(1).normal(size=(7, family.dim)).astype(np.float32)
  h = x.astype(np.float64)
  for layer in ("hidden0", "hidden1"):
    h = np.maximum(h @ np.asarray(params[layer]["kernel"]) + np.asarray(params[layer]["bias"]), 0)
  want = h @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
  np.testing.assert_allclose(jax.jit(family.logits)(params, x), want, rtol=1e-4, atol=1e-5)
  # The cached abstract template is never filled with arrays or tracers.
  _, template = classifier.graph(family.arch)
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(template))


def test_classifier_losses_against_numpy():
  logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], np.float32)
  y = np.array([0, 0], np.int32)
  ref_ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[[0, 1], y])
  assert float(classifier.cross_entropy(logits, y)) == pytest.approx(ref_ce, rel=1e-6)
  np.testing.assert_allclose(classifier.margins(logits, y), [1.5, -0.2], rtol=1e-6)
  assert float(classifier.multiclass_hinge(logits, y)) == pytest.approx((0 + 1.2) / 2, rel=1e-6)


def test_label_noise_rate():
  y = jnp.zeros(20000, jnp.int32)
  out = np.asarray(data.corrupt_labels(jax.random.PRNGKey(12), y, 0.4, 4))
  assert abs(np.mean(out != 0) - 0.4 * 3 / 4) < 0.015
  assert out.min() >= 0 and out.max() <= 3


def test_digits_split():
  family = _family("digits")
  task = jax.jit(family.sample)(jax.random.PRNGKey(13))
  rows = {r.tobytes() for r in np.asarray(task["x_train"])} | {
      r.tobytes() for r in np.asarray(task["x_val"])}
  assert len(rows) >= 0.98 * (family.n_train + family.n_val)  # disjoint (few duplicate images)
  assert 0.0 <= float(task["x_train"].min()) and float(task["x_train"].max()) <= 1.0


# --- validation --------------------------------------------------------------------------------
BAD = [
    ("quadratic", {"dim": 0}), ("quadratic", {"dim": 2.5}), ("quadratic", {"cond": 0.5}),
    ("quadratic", {"eig_max": 0.0}), ("quadratic", {"noise": -1.0}),
    ("quadratic", {"optimum_scale": -1.0}), ("quadratic", {"init_scale": -0.1}),
    ("linreg", {"n_train": 0}), ("linreg", {"noise": -0.1}), ("linreg", {"input_cond": 0.9}),
    ("linreg", {"batch_size": 0}), ("linreg", {"dim": 0}), ("linreg", {"w_scale": -1.0}),
    ("logreg", {"label_noise": 0.6}), ("logreg", {"logit_scale": -1.0}), ("logreg", {"n_val": 0}),
    ("mlp", {"n_classes": 1}), ("mlp", {"depth": -1}), ("mlp", {"activation": "gelu"}),
    ("mlp", {"width": 0}), ("mlp", {"label_noise": 1.5}), ("mlp", {"batch_size": 0}),
    ("digits", {"n_train": 1500, "n_val": 500}), ("digits", {"hidden": -1}),
]


@pytest.mark.parametrize("name,knobs", BAD, ids=[f"{n}-{list(k)[0]}" for n, k in BAD])
def test_validate_rejects_bad_knobs(name, knobs):
  with pytest.raises(ValueError) as err:
    make_task_family(name, knobs)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError):
    dataclasses.replace(make_task_family(name), **knobs).validate()
