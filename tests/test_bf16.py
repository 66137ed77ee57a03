"""``meta.inner_dtype = "bfloat16"``: the inner losses run in bf16, everything else stays float32,
and the meta-gradient stays close to the float32 one.

``python tests/test_bf16.py [CONFIG ...]`` prints one JSON row per config: the cosine and the
relative error of the bf16 TBPTT meta-gradient against the float32 one at four initial states
(the measurement behind the "bf16" section of docs/performance.md).
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _config(spec, dtype, **meta):
  from mesajax.config import load, resolve
  over = [f"meta.inner_dtype={dtype!r}", "meta.estimator='tbptt'"]
  over += [f"meta.{k}={v!r}" for k, v in meta.items()]
  return resolve(load(os.path.join(ROOT, "configs", spec), over))


def meta_gradients(spec, dtype, draws=4, **meta):
  """TBPTT meta-gradients (flattened, float64) at ``draws`` initial states (each its own phi_0,
  tasks and truncation starts: ``MetaTrainer.init`` with keys 100, 101, ...)."""
  from mesajax.meta.outer import MetaTrainer
  trainer = MetaTrainer(_config(spec, dtype, **meta))
  fn = jax.jit(lambda s: trainer.estimator.estimate(s.phi, s.est_state, s.rng)[1:])
  out = []
  for i in range(draws):
    loss, grad = fn(trainer.init(jax.random.PRNGKey(100 + i)))
    out.append((float(loss), np.concatenate([np.ravel(np.asarray(g, np.float64))
                                             for g in jax.tree.leaves(grad)])))
  return out


def compare(spec, draws=4, **meta):
  """One row: cosine and relative error of the bf16 meta-gradient vs float32, over draws."""
  f32 = meta_gradients(spec, "float32", draws, **meta)
  b16 = meta_gradients(spec, "bfloat16", draws, **meta)
  cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for (_, a), (_, b) in zip(f32, b16)]
  rel = [float(np.linalg.norm(b - a) / np.linalg.norm(a)) for (_, a), (_, b) in zip(f32, b16)]
  loss_rel = [abs(lb - la) / abs(la) for (la, _), (lb, _) in zip(f32, b16)]
  return {"config": spec, "meta": meta, "draws": draws, "cosine_min": min(cos),
          "cosine_mean": float(np.mean(cos)), "rel_err_mean": float(np.mean(rel)),
          "rel_err_max": max(rel), "meta_loss_rel_err_max": max(loss_rel),
          "backend": jax.default_backend(), "jax": jax.__version__}


def test_inner_dtype_casts_only_the_inner_losses():
  from mesajax.registry import make_task_family
  from mesajax.rollout import InnerDtype, with_inner_dtype
  family = make_task_family("linreg", {"dim": 6, "n_train": 8, "n_val": 16})
  assert with_inner_dtype(family, "float32") is family
  view = with_inner_dtype(family, "bfloat16")
  assert isinstance(view, InnerDtype) and view == InnerDtype(family, "bfloat16")
  task = family.sample(jax.random.PRNGKey(0))
  params = family.init(jax.random.PRNGKey(1), task)
  key = jax.random.PRNGKey(2)
  jaxpr = str(jax.make_jaxpr(view.train_loss)(params, task, key))
  assert "bf16" in jaxpr and "bf16" not in str(jax.make_jaxpr(family.train_loss)(params, task, key))
  loss, grad = jax.jit(jax.value_and_grad(view.train_loss))(params, task, key)
  ref, ref_grad = jax.jit(jax.value_and_grad(family.train_loss))(params, task, key)
  assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad))
  # bf16 keeps 8 mantissa bits: relative error of order 2^-8 per operation.
  np.testing.assert_allclose(loss, ref, rtol=3e-2)
  for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    assert np.linalg.norm(g - r) / np.linalg.norm(r) < 5e-2
  # Full-batch losses (normalisers, evaluation) are the float32 ones.
  assert view.outer_loss_full(params, task) == family.outer_loss_full(params, task)


def test_meta_trainer_takes_the_knob():
  """Only meta-training's unrolls get the view; selection and evaluation use the family."""
  from mesajax.meta.outer import MetaTrainer
  from mesajax.rollout import InnerDtype
  trainer = MetaTrainer(_config("quickstart.py:smoke", "bfloat16"))
  assert isinstance(trainer.unroller.family, InnerDtype)
  assert not isinstance(trainer.family, InnerDtype)
  assert MetaTrainer(_config("quickstart.py:smoke", "float32")).unroller.family is not None
  assert not isinstance(MetaTrainer(_config("quickstart.py:smoke", "float32")).unroller.family,
                        InnerDtype)


@pytest.mark.slow
def test_bf16_meta_gradient_is_close_to_float32():
  """The quickstart's smoke config: the bf16 meta-gradient points the same way as float32's."""
  row = compare("quickstart.py:smoke", draws=2, loss_transform="none")
  assert row["cosine_min"] > 0.99, row
  assert 0 < row["rel_err_max"] < 0.15, row  # bf16 differs, but not by much


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  specs = sys.argv[1:] or ["quickstart.py:smoke", "image_mlp.py:smoke"]
  for spec in specs:
    print(json.dumps(compare(spec, draws=4, loss_transform="none")), flush=True)
