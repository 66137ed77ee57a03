"""ICL as gradient descent (von Oswald et al. 2023): a one-layer, two-head linear self-attention
model on noiseless in-context linear regression, d = N = 10, w ~ N(0, I), x ~ U(−1, 1) (the paper's
text; the ½-MSE loss of its code), trained with Adam on fresh tasks every step, 5 seeds as one
compiled population; held against one line-searched GD step, ridge, OLS and the nulls.

Launch:
  python experiments/icl_gd/run.py --workdir runs/icl_gd          (this config + deeper LSA)
  or this config alone:  python run.py --config configs/icl_gd.py --workdir runs/icl_gd
Measured runtime (2-core CPU, idle, 2026-11-29): this config trained in 92 s and evaluated in 23 s;
the whole experiment, 2- and 3-layer models and their probes included, 8 min 2 s (the experiment
README's Timing table). ``experiments/icl_gd/run.py --quick``: about 3 minutes at load ~20.
CI size: ``--config configs/icl_gd.py:smoke`` (2 seeds, 40 steps, small evaluation).
"""
import ml_collections

from mesajax.icl.config import default_config, shrink

def get_config(arg=None) -> ml_collections.ConfigDict:
  c = default_config()
  c.name = "icl_gd"
  c.seed = 0
  c.icl.model = "lsa"
  c.icl.model_kwargs = ml_collections.ConfigDict({"num_layers": 1, "num_heads": 2,
                                                  "init_scale": 0.1})
  t = c.icl.task
  t.d, t.N, t.tau, t.sigma, t.inputs, t.input_scale = 10, 10, 1.0, 0.0, "uniform", 1.0
  c.icl.num_steps = 4000
  c.icl.decay_steps = 4000
  c.icl.lr = 2e-3
  c.icl.batch_size = 256
  c.icl.num_seeds = 5
  c.icl.log_every = 500
  c.icl.checkpoint_every = 2000
  c.icl.eval.num_tasks = 1024
  c.icl.eval.num_queries = 16
  c.icl.eval.gd_steps = 1
  c.icl.eval.nulls = ("untrained", "shuffled_context", "single_task")
  c.shifts = ml_collections.ConfigDict()
  return shrink(c, arg)
