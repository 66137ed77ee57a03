"""Core checks of mesajax.icl: references against closed forms, von Oswald's hand-constructed LSA,
training toward the GD reference, bit-exact resume and one-line config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesajax.icl import config as cfg
from mesajax.icl import data, models, train
from mesajax.icl import references as R


def _task(d=5, n=8, m=4, sigma=0.0, seed=0, inputs="uniform"):
  """A task drawn with numpy (no per-op compiles), float32 like the family's."""
  rng = np.random.default_rng(seed)
  draw = (lambda *s: rng.uniform(-1, 1, s)) if inputs == "uniform" else (lambda *s: rng.standard_normal(s))
  x, q, w = draw(n, d), draw(m, d), rng.standard_normal(d)
  y = x @ w + sigma * rng.standard_normal(n)
  f = lambda a: jnp.asarray(a, jnp.float32)
  return {"x_NxD": f(x), "y_N": f(y), "xq_MxD": f(q), "yq_M": f(q @ w), "w_D": f(w)}


def test_one_gd_step_by_hand():
  t = _task()
  x, y, q = (np.asarray(t[k], np.float64) for k in ("x_NxD", "y_N", "xq_MxD"))
  eta = 0.37
  grad0 = -(x.T @ y) / len(y)              # ∇ of 1/(2N)‖Xw − y‖² at w = 0
  expected = q @ (-eta * grad0)
  got = R.gd_predict(t["x_NxD"], t["y_N"], t["xq_MxD"], eta, 1)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_k_step_gd_and_gd_pp_by_hand():
  t = _task(seed=1)
  x, y, q = (np.asarray(t[k], np.float64) for k in ("x_NxD", "y_N", "xq_MxD"))
  n = len(y)
  eta, w = 0.5, np.zeros(x.shape[1])
  for _ in range(3):
    w = w - eta * x.T @ (x @ w - y) / n
  got = R.gd_predict(t["x_NxD"], t["y_N"], t["xq_MxD"], eta, 3)
  np.testing.assert_allclose(got, q @ w, rtol=1e-4, atol=1e-5)
  # One GD++ step: precondition with the current X after the GD step on the residuals; a second
  # step then runs GD on the preconditioned inputs.
  gamma = 0.2
  a = np.eye(x.shape[1]) - gamma * x.T @ x / n
  x2, q2 = x @ a.T, q @ a.T
  r1 = y - x @ (eta * x.T @ y / n)
  pred1 = q @ (eta * x.T @ y / n)
  pred2 = pred1 + q2 @ (eta * x2.T @ r1 / n)
  got = R.gd_pp_predict(t["x_NxD"], t["y_N"], t["xq_MxD"], jnp.array([eta, eta]),
                        jnp.array([gamma, gamma]))
  np.testing.assert_allclose(got, pred2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [12, 4])  # over- and under-determined
def test_ridge_against_float64_solve(n):
  t = _task(d=6, n=n, sigma=0.3, seed=2, inputs="normal")
  x, y, q = (np.asarray(t[k], np.float64) for k in ("x_NxD", "y_N", "xq_MxD"))
  lams = np.array([0.0, 0.01, 0.5, 3.0])
  got = np.asarray(R.ridge_grid_predict(t["x_NxD"], t["y_N"], t["xq_MxD"], jnp.asarray(lams)))
  for i, lam in enumerate(lams):
    if lam == 0:
      w = np.linalg.pinv(x) @ y
    else:
      w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    np.testing.assert_allclose(got[i], q @ w, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(R.ols_predict(t["x_NxD"], t["y_N"], t["xq_MxD"]), got[0], rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_hand_constructed_lsa_is_one_gd_step(heads):
  d, n, eta = 5, 8, 0.8
  t = _task(d=d, n=n, m=6, seed=3)
  m = models.make_model("lsa", d, {"num_layers": 1, "num_heads": heads}, jax.random.PRNGKey(0))
  from flax import nnx
  g, _ = nnx.split(m)
  got = jax.jit(lambda p, x, y, q: nnx.merge(g, p)(x, y, q))(
      models.lsa_gd_params(d, n, eta, heads), t["x_NxD"], t["y_N"], t["xq_MxD"])
  want = R.gd_predict(t["x_NxD"], t["y_N"], t["xq_MxD"], eta, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hand_constructed_mesa_layer_is_ridge():
  from flax import nnx
  d, lam = 4, 0.7
  t = _task(d=d, n=9, sigma=0.2, seed=4)
  e = d + 1
  sel = np.zeros((e, e), np.float32)
  sel[:d, :d] = np.eye(d)
  wv = np.zeros((e, e), np.float32)
  wv[d, d] = -1.0
  g, _ = nnx.split(models.make_model("mesa", d, {}, jax.random.PRNGKey(0)))
  p = {"wq": sel, "wk": sel, "wv": wv, "proj": np.eye(e, dtype=np.float32),
       "log_lam": np.float32(np.log(lam))}
  got = jax.jit(lambda p, x, y, q: nnx.merge(g, p)(x, y, q))(p, t["x_NxD"], t["y_N"], t["xq_MxD"])
  np.testing.assert_allclose(got,
                             R.ridge_predict(t["x_NxD"], t["y_N"], t["xq_MxD"], lam), rtol=1e-4,
                             atol=1e-5)


def _tiny(num_steps=300, **icl):
  c = cfg.default_config()
  c.name = "tiny"
  c.icl.task.d, c.icl.task.N = 3, 6
  c.icl.num_steps, c.icl.batch_size, c.icl.lr, c.icl.num_seeds = num_steps, 128, 1e-2, 2
  c.icl.decay_steps = 300
  c.icl.log_every, c.icl.checkpoint_every = 50, 1000
  for k, v in icl.items():
    c.icl[k] = v
  return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """300 straight steps of a 2-seed population (shared by the training and resume tests)."""
  return train.train(_tiny(300), str(tmp_path_factory.mktemp("straight")), progress=False)


def test_training_moves_lsa_toward_one_gd_step(straight):
  trainer, state = straight
  fam = trainer.family
  tasks = jax.jit(lambda k: fam.sample_batch(k, 4096))(jax.random.PRNGKey(99))
  eta = R.line_search_gd(fam, 1, num_tasks=2048)
  gd = jax.jit(lambda t: R._query_loss(lambda x, y, q: R.gd_predict(x, y, q, eta, 1), t))(tasks)
  loss_S = jax.jit(jax.vmap(trainer.loss, in_axes=(0, None)))
  init_S, trained_S = loss_S(trainer.init().params, tasks), loss_S(state.params, tasks)
  for s in range(2):
    l0, l1 = float(init_S[s]), float(trained_S[s])
    # from well above to within 15% of the one-step-GD loss after 300 steps
    assert l0 > 1.3 * float(gd)
    assert l1 < 1.15 * float(gd), (l0, l1, float(gd))


def test_resume_is_bit_exact(straight, tmp_path):
  """300 straight steps == 150 steps, a restart from the checkpoint, and 150 more."""
  _, s_full = straight
  b = str(tmp_path / "resumed")
  train.train(_tiny(150), b, progress=False)
  _, s_res = train.train(_tiny(300), b, progress=False)
  assert int(s_res.step) == 300
  for x, y in zip(jax.tree.leaves(s_full), jax.tree.leaves(s_res)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="another config"):
    train.train(_tiny(300, lr=0.5), b, progress=False)


@pytest.mark.parametrize("path,value,match", [
    ("icl.model", "rnn", "icl.model"),
    ("icl.task.d", 0, "d must be"),
    ("icl.task.sigma", float("nan"), "sigma"),
    ("icl.task.inputs", "cauchy", "inputs"),
    ("icl.lr", float("inf"), "icl.lr"),
    ("icl.batch_size", 0, "batch_size"),
    ("icl.num_seeds", 0, "num_seeds"),
    ("icl.eval.nulls", ("nothing",), "null"),
    ("kind", "meta", "kind"),
])
def test_bad_config_is_one_line_value_error(path, value, match):
  c = cfg.default_config()
  *head, last = path.split(".")
  node = c
  for h in head:
    node = node[h]
  node[last] = value
  with pytest.raises(ValueError, match=match) as e:
    cfg.validate(c)
  assert "\n" not in str(e.value)


def test_bad_model_option_and_shift():
  c = cfg.default_config()
  c.icl.model_kwargs.depth = 3
  with pytest.raises(ValueError, match="no option"):
    cfg.validate(c)
  c = cfg.default_config()
  c.shifts = {"bad": {"noise": 1.0}}
  with pytest.raises(ValueError, match="shifts.bad"):
    cfg.validate(c)


@pytest.mark.parametrize("name", ["icl_gd", "implied_ridge", "icl_shift"])
def test_shipped_configs_validate(name):
  import importlib
  mod = importlib.import_module(f"configs.{name}")
  for arg in (None, "smoke"):
    c = mod.get_config(arg)
    cfg.validate(c)
    assert c.kind == "icl"
  assert mod.get_config("smoke").icl.num_steps <= 40
  with pytest.raises(ValueError, match="smoke"):
    mod.get_config("big")


def test_task_family_knobs():
  base = data.ICLRegression(d=6, N=4, inputs="normal")
  draw = lambda fam: jax.jit(lambda k: fam.sample_batch(k, 64, 3))(jax.random.PRNGKey(0))
  pool = draw(base.replace(num_pretrain_tasks=3, weights="sparse", sparsity=2))
  assert len({tuple(np.round(np.asarray(w), 5)) for w in pool["w_D"]}) <= 3
  assert np.all((np.asarray(pool["w_D"]) != 0).sum(1) <= 2)
  orth = draw(base.replace(query="orthogonal"))
  np.testing.assert_allclose(np.einsum("bnd,bmd->bnm", orth["x_NxD"], orth["xq_MxD"]), 0, atol=1e-4)
  pos = draw(base.replace(orthant=True, inputs="uniform", query="context_point"))
  np.testing.assert_array_equal(pos["xq_MxD"], pos["x_NxD"][:, :3])
  assert np.all(np.asarray(pos["x_NxD"]) >= 0) and np.all(np.asarray(pos["x_NxD"]) <= 1)
  np.testing.assert_allclose(pos["y_N"], np.einsum("bnd,bd->bn", pos["x_NxD"], pos["w_D"]), atol=1e-5)
  with pytest.raises(ValueError, match="N < d"):
    data.ICLRegression(d=4, N=4, query="orthogonal").validate()


def test_plain_xla_linalg_matches_float64_and_lapack_gradients():
  """``icl.linalg`` (used instead of LAPACK, see its docstring): lstsq against float64 numpy on a
  tall, a square and a wide system (minimum norm at λ = 0), and spd_solve's gradient through a
  symmetric G = KᵀK + λI against jnp.linalg.solve's."""
  from mesajax.icl import linalg as L
  rng = np.random.default_rng(5)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  fit = jax.jit(L.lstsq)
  for m, n in [(12, 6), (7, 7), (3, 6)]:
    a, b = rng.standard_normal((m, n)), rng.standard_normal((m, 2))
    for lam in (0.0, 0.3):
      want = np.linalg.pinv(a) @ b if lam == 0 else np.linalg.solve(a.T @ a + lam * np.eye(n), a.T @ b)
      np.testing.assert_allclose(fit(f32(a), f32(b), lam), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  k, q = f32(rng.standard_normal((9, 5))), f32(rng.standard_normal(5))
  loss = lambda solve: lambda k: jnp.sum(solve(k.T @ k + 0.1 * jnp.eye(5), q) ** 2)
  np.testing.assert_allclose(jax.jit(jax.grad(loss(L.spd_solve)))(k),
                             jax.grad(loss(jnp.linalg.solve))(k), rtol=1e-3, atol=1e-4)


def test_probe_reads_the_gd_prediction_from_the_hand_constructed_lsa():
  """Known answer for the layer probes: after von Oswald's one-GD-step layer the query token's
  y-entry is −(η/N) x_qᵀXᵀy, so the probe for ``xty_q`` has held-out R² ≈ 1 at layer 1 and not at
  layer 0 (the input token (x_q, 0)); the shuffled-target control fails at both."""
  from flax import nnx
  from mesajax.icl import probes
  d, n, eta = 4, 6, 0.9
  fam = data.ICLRegression(d=d, N=n, inputs="normal")
  g, _ = nnx.split(models.make_model("lsa", d, {"num_layers": 1}, jax.random.PRNGKey(0)))
  p = models.lsa_gd_params(d, n, eta)
  @jax.jit
  def run(key):
    tasks = fam.sample_batch(key, 400, 1)
    h = jax.vmap(lambda t: nnx.merge(g, p).hidden(t["x_NxD"], t["y_N"], t["xq_MxD"])[:, 0])(tasks)
    return h, jax.vmap(lambda t: probes.targets(t, 0.0)["xty_q"])(tasks)
  h_TxLxF, tgt = jax.device_get(run(jax.random.PRNGKey(3)))
  r2_0, ctrl_0 = probes.probe(h_TxLxF[:, 0], tgt)
  r2_1, ctrl_1 = probes.probe(h_TxLxF[:, 1], tgt)
  assert r2_1 > 0.99 and r2_0 < 0.2
  assert ctrl_0 < 0.1 and ctrl_1 < 0.1
