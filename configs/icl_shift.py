"""The ICL shift suite (Garg et al. 2022, §4): a two-layer, two-head LSA and a mesa-layer trained
on noisy regression (x ~ N(0, I), w ~ N(0, I), σ = 0.5, d = 8, N = 12), each evaluated on every
shift of ``mesajax.icl.shifts.suite`` beside every reference (one GD step, 2-step GD, 2-step
GD++, Bayes ridge, OLS), with the move of λ̂ per shift. (The experiment adds a small GPT-style
transformer; see ``experiments/icl_shift/run.py``.)

Launch:
  python experiments/icl_shift/run.py --workdir runs/icl_shift
  or this config alone:  python run.py --config configs/icl_shift.py --workdir runs/icl_shift
Measured runtime (2-core CPU, idle, 2026-11-29): this config (the LSA) trained in 88 s and
evaluated in 75 s; the whole experiment (LSA, mesa-layer, GPT) 9 min 31 s (the experiment
README's Timing table). ``experiments/icl_shift/run.py --quick``: 467 s wall at load 21-26.
CI size: ``--config configs/icl_shift.py:smoke``.
"""
import ml_collections

from mesajax.icl.config import default_config, shrink
from mesajax.icl.shifts import suite


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = default_config()
  c.name = "icl_shift"
  c.icl.model = "lsa"
  c.icl.model_kwargs = ml_collections.ConfigDict({"num_layers": 2, "num_heads": 2,
                                                  "init_scale": 0.1})
  t = c.icl.task
  t.d, t.N, t.tau, t.sigma, t.inputs = 8, 12, 1.0, 0.5, "normal"
  c.icl.num_steps = 3000
  c.icl.decay_steps = 3000
  c.icl.lr = 1e-3
  c.icl.batch_size = 256
  c.icl.num_seeds = 3
  c.icl.log_every = 500
  c.icl.checkpoint_every = 1500
  c.icl.eval.num_tasks = 512
  c.icl.eval.num_queries = 16
  c.icl.eval.gd_steps = 2
  c.icl.eval.gdpp_iters = 300   # GD++ (2 steps) fitted by Adam
  c.icl.eval.nulls = ("untrained", "shuffled_context")
  c.shifts = ml_collections.ConfigDict(suite(c.icl.task.to_dict()))
  return shrink(c, arg)
