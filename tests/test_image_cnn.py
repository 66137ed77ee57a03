"""The CNN image family: logits against a hand-written reference (jax.lax.conv in float64 on the
same parameters), the parameter count formula and knob validation (the family contract: tests/test_tasks.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesajax.registry import make_task_family
from mesajax.tasks.image_cnn import ImageCNN

pytest.importorskip("sklearn")  # the default data (digits) ships with scikit-learn


def _reference_logits(params, x, act):
  """Stride-2 SAME 3x3 convolutions written with lax.conv_general_dilated, mean pool, linear."""
  h = x
  i = 0
  while f"conv{i}" in params:
    k, b = params[f"conv{i}"]["kernel"], params[f"conv{i}"]["bias"]
    h = jax.lax.conv_general_dilated(h, k, window_strides=(2, 2), padding="SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    h = act(h + b)
    i += 1
  pooled = h.mean(axis=(1, 2))
  return pooled @ params["out"]["kernel"] + params["out"]["bias"]


def test_cnn_logits_match_a_hand_written_convolution_and_param_count():
  family = make_task_family("image_cnn", {"n_train": 12, "n_val": 8, "channels": (3, 5)})
  task = family.sample(jax.random.PRNGKey(0))
  assert task["x_train"].shape == (12, 8, 8, 1)
  params = family.init(jax.random.PRNGKey(1), task)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert n == family.num_params() == 9 * 1 * 3 + 3 + 9 * 3 * 5 + 5 + 5 * 10 + 10
  got = np.asarray(family.logits(params, task["x_train"]))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
    want = np.asarray(_reference_logits(p64, jnp.asarray(np.asarray(task["x_train"], np.float64)),
                                        jax.nn.relu))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("knobs, pattern", [
    ({"channels": ()}, "channels"),
    ({"channels": (4, 0)}, "channels"),
    ({"image_size": 1}, "image_size"),
])
def test_cnn_rejects_bad_knobs(knobs, pattern):
  with pytest.raises(ValueError, match=pattern):
    make_task_family("image_cnn", knobs)


def test_a_shift_given_as_a_list_stays_hashable():
  """Configs and JSON hand tuple knobs over as lists; a shifted family is a static jit argument."""
  family = make_task_family("image_cnn", {"channels": (4,)})
  shifted = family.replace(channels=[3, 5])
  assert shifted.channels == (3, 5)
  hash(shifted)
