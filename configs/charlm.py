"""A character-level transformer language model: learned optimizers on a sequence model.

Each task is 64 random 33-character windows of a text (default: Python's bundled English help
text, ``pydoc_data.topics``, 0.46 MB; no files needed) and a fresh one-block causal transformer
(d_model 32, 2 heads; 22,112 parameters). The inner optimizer sees next-character cross-entropy on
minibatches of 8 training windows; the outer objective is the loss on 32 windows from the last
10% of the text, which no task trains on. Shifts: twice the context, 4x more training windows,
a second block, a 10x longer horizon.

Launch:
  python run.py --config configs/charlm.py --workdir runs/charlm
  # any UTF-8 text file instead:
  python run.py --config configs/charlm.py --workdir runs/charlm_mytext \
      --config.task.kwargs.text_file=/path/to/text.txt
Runtime: the smoke size (``configs/charlm.py:smoke``) took 53 min wall (11.7 min CPU) end to end
on a 2-core CPU shared at load average 9-16, nearly all XLA compilation of the transformer's
meta-training and analysis programs; the full size was not timed. In that smoke run the clipped
meta-loss gave a zero meta-gradient (see docs/tasks.md).
"""
import ml_collections

from configs import quickstart
from mesajax.config import get_config_with_arg
from mesajax.registry import optimizer_kwargs, task_kwargs
from mesajax.tasks.charlm import CharLM


def get_config(arg=None):
  return get_config_with_arg(_config, arg)


def _config():
  c = quickstart.get_config()
  c.name = "charlm"
  c.task.name = "charlm"
  c.task.kwargs = ml_collections.ConfigDict(task_kwargs("charlm"))
  c.task.kwargs.text_file = ml_collections.FieldReference(None, field_type=str)
  c.optimizer.kwargs = ml_collections.ConfigDict(optimizer_kwargs("mlp_lopt"))
  c.meta.num_tasks = 16
  c.meta.num_outer_steps = 500
  c.eval.lr_grid_min = 1e-4
  c.shifts = ml_collections.ConfigDict(CharLM.default_shifts)
  # Thousands of parameters per task: the analyses use probes only (no dense Jacobians) on a few
  # tasks and points, which keeps their memory within this CPU's RAM (checked by resolve).
  c.analysis.dense_max = 0
  c.analysis.num_tasks = 8
  c.analysis.num_points = 2
  c.analysis.num_probes = 16
  return c
