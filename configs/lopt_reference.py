"""learned_optimization's reference speed setup, reproduced for ``python -m mesajax.bench``.

Mirrors ``FixedDimQuadraticFamily`` (loss Σ(target − θ)², target ~ N(0, 1), dim 10) with the
default ``MLPLOpt`` (19 input features, MLP 32×2, 2 outputs, 1762 meta-parameters), truncations of
50 inner steps inside a horizon of 1000 with staggered starts, outer Adam 3e-4, 32 tasks
(the reference's own speed setup).

Launch:
  python -m mesajax.bench --config configs/lopt_reference.py --config.meta.estimator=pes
  python -m mesajax.bench --config configs/lopt_reference.py --config.meta.estimator=tbptt
  python -m mesajax.bench --config configs/lopt_reference.py --config.task.kwargs.dim=32
Expected runtime: about 30 s per benchmark on a 2-core CPU (compile ~5 s, 3 × 100 timed steps).
Meta-training it with run.py also works (1000 outer steps: a few minutes).
"""
import ml_collections

from configs import quickstart
from mesajax.config import get_config_with_arg


def get_config(arg=None):
  return get_config_with_arg(_config, arg)


def _config():
  c = quickstart.get_config()
  c.name = "lopt_reference"
  c.task.name = "quadratic"
  c.task.kwargs = ml_collections.ConfigDict(dict(
      dim=10, eig_max=2.0, cond=1.0, rotate=False, optimum_scale=1.0, init_scale=1.0, noise=0.0))  # learned_optimization draws theta_0 ~ N(0, I)
  c.optimizer.name = "mlp_lopt"
  c.meta.num_tasks = 32
  c.meta.horizon = 1000
  c.meta.unroll_length = 50
  c.meta.estimator = "pes"
  c.meta.outer_objective = "mean_train"
  c.meta.loss_transform = "none"
  c.meta.outer_lr = 3e-4
  c.meta.outer_clip = 0.0
  c.meta.num_outer_steps = 1000
  c.shifts = ml_collections.ConfigDict({"dim_x2": {"task": {"dim": 20}}})
  return c
