"""The implied inner objective of a trained in-context learner (Akyürek et al. 2022): on noisy
regression (x ~ N(0, I), w ~ N(0, τ²I), y = wᵀx + σε; d = 8, N = 12), the ridge penalty λ̂
minimising SPD(model, ridge_λ) against the Bayes value λ* = σ²/τ² of the training distribution,
and its move when only the test noise changes (shifts ``test_sigma_*``).

Model: a mesa-layer (ridge regression inside the forward pass with a learned λ and learned
key/query/value projections), 5 seeds as one population.

Launch:
  python experiments/implied_ridge/run.py --workdir runs/implied_ridge   (σ = 0.5 and σ = 1)
  or alone:  python run.py --config configs/implied_ridge.py --workdir runs/implied_ridge
Measured runtime (2-core CPU, idle, 2026-11-29): this config trained in 64 s and evaluated in 42 s;
the whole experiment (three runs) 6 min 25 s. ``experiments/implied_ridge/run.py --quick``: 180 s
wall at load 27-33.
CI size: ``--config configs/implied_ridge.py:smoke``.
"""
import ml_collections

from mesajax.icl.config import default_config, shrink

TEST_SIGMAS = (0.0, 0.25, 1.0, 2.0)


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = default_config()
  c.name = "implied_ridge"
  c.icl.model = "mesa"
  c.icl.model_kwargs = ml_collections.ConfigDict({"init_scale": 1.0, "init_log_lam": 0.0})
  t = c.icl.task
  t.d, t.N, t.tau, t.sigma, t.inputs = 8, 12, 1.0, 0.5, "normal"
  c.icl.num_steps = 3000
  c.icl.decay_steps = 3000
  c.icl.lr = 3e-3
  c.icl.batch_size = 256
  c.icl.num_seeds = 5
  c.icl.log_every = 500
  c.icl.checkpoint_every = 1500
  c.icl.eval.num_tasks = 1024
  c.icl.eval.num_queries = 16
  c.icl.eval.gd_steps = 1
  c.icl.eval.nulls = ("untrained", "shuffled_context")
  c.shifts = ml_collections.ConfigDict(
      {"test_sigma_" + f"{s:g}".replace(".", "p"): {"sigma": s} for s in TEST_SIGMAS})
  return shrink(c, arg)
