"""The no-objective controls above ``controls.DENSE_MAX`` parameters (the 10⁵-parameter analyses):
structured forms with the properties of the dense ones, memory O(n)."""
import jax
import jax.numpy as jnp
import numpy as np

from mesajax.optimizers import controls
from mesajax.optimizers.base import make_context

N = controls.DENSE_MAX + 1000


def _update(opt, theta, step=3):
  params = {"w": theta}
  phi = opt.init_phi(None)
  grads = {"w": jnp.ones_like(theta)}
  return opt.update(phi, opt.init(phi, params), grads, params, make_context(step, 100))[0]["w"]


def test_noise_update_above_dense_max_is_standard_normal_per_step():
  opt = controls.NoiseUpdate(learning_rate=1.0)
  theta = jnp.zeros(N)
  a, b = np.asarray(_update(opt, theta, 3)), np.asarray(_update(opt, theta, 4))
  assert np.all(np.isfinite(a)) and abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.05                      # fresh noise every step
  np.testing.assert_array_equal(a, np.asarray(_update(opt, theta + 1.0, 3)))  # θ-independent
  big = np.asarray(controls.hash_normal(400_000, 0, 7))
  assert abs(np.mean(np.abs(big) > 2) - 0.0455) < 0.002          # Gaussian tails


def test_noise_update_up_to_dense_max_keeps_its_table():
  n = 50
  table = np.random.default_rng([0, n, 3]).standard_normal((controls._NOISE_STEPS, n))
  u = _update(controls.NoiseUpdate(learning_rate=1.0), jnp.zeros(n), 5)
  np.testing.assert_allclose(u, table[5].astype(np.float32), rtol=1e-6)


def test_random_field_above_dense_max_is_the_signed_permutation_field():
  opt = controls.RandomField(learning_rate=1.0)
  rng = np.random.default_rng(0)
  theta = rng.standard_normal(N)
  perm, sign, b = controls.random_field_perms(N, 0)
  want = np.sin((sign * theta[perm]).sum(0) / np.sqrt(perm.shape[0]) + b)
  with jax.enable_x64(True):
    u = _update(opt, jnp.asarray(theta))
    np.testing.assert_allclose(u, want, rtol=1e-10, atol=1e-12)
    # Far from a gradient field: the probe NCI √(Σs²/(Σs² + Σt²)), s = vᵀJw − wᵀJv and
    # t = vᵀJw + wᵀJv over 16 Gaussian pairs, is near √½ (0 for a symmetric J).
    _, lin = jax.linearize(lambda th: _update(opt, th), jnp.asarray(theta))
    v, w = (jnp.asarray(rng.standard_normal((16, N))) for _ in range(2))
    jw, jv = jax.vmap(lin)(w), jax.vmap(lin)(v)
    s, t = jnp.sum(v * jw, 1) - jnp.sum(w * jv, 1), jnp.sum(v * jw, 1) + jnp.sum(w * jv, 1)
    nci = float(jnp.sqrt(jnp.sum(s * s) / (jnp.sum(s * s) + jnp.sum(t * t))))
    assert 0.5 < nci < 0.9, nci
  # Every row of W has norm `scale` (the dense W's rows do on average).
  rows = np.zeros(N)
  np.add.at(rows, np.arange(N).repeat(perm.shape[0]), np.ones(N * perm.shape[0]) / perm.shape[0])
  np.testing.assert_allclose(rows, 1.0)
