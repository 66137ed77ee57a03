"""Noisy random rotated quadratics: a learned optimizer against tuned constant-rate baselines.

f(θ) = ½(θ−θ*)ᵀA(θ−θ*), A = Q diag(λ) Qᵀ (Haar Q, λ log-uniform in [0.1, 1]), gradient noise
N(0, I). With a constant learning rate the baselines stall at a noise floor; the learned optimizer
sees time features and can anneal. Shifts: dimension, conditioning, optimum location, horizon.

Launch:
  python run.py --config configs/quadratic.py --workdir runs/quadratic
Expected runtime: about 3 minutes on a 2-core CPU.
"""
import ml_collections

from configs import quickstart
from mesajax.config import get_config_with_arg


def get_config(arg=None):
  return get_config_with_arg(_config, arg, smoke_shift="dim_x2")


def _config():
  c = quickstart.get_config()
  c.name = "quadratic"
  c.task.name = "quadratic"
  c.task.kwargs = ml_collections.ConfigDict(dict(dim=10, cond=10.0, noise=1.0))
  c.shifts = ml_collections.ConfigDict({
      "dim_x2": {"task": {"dim": 20}},
      "cond_x10": {"task": {"cond": 100.0}},
      "optimum_far": {"task": {"optimum_scale": 3.0}},
      "horizon_x10": {"horizon_mult": 10},
  })
  return c
