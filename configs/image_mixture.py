"""Meta-train on a task-augmented mixture of image MLPs; evaluate on held-out families.

Training family (``image_mlp_mixture``, digits by default, no files needed): per task a random
hidden width in {16, 32, 64}, a random input size in {4, 6, 8} (resized, zero-padded into an 8x8
input) and a random gradient scale c, log-uniform in [0.1, 10] (the training loss is c x the
cross-entropy: plain SGD's learning rate is effectively c x), as in Celo's task augmentation
(Moudgil et al. 2025). All tasks share one max-size network (8x8 inputs, 64 units: 4,810
parameters), so the batch is vmapped; masking does the rest (see mesajax/tasks/images.py).

Held-out families (the shift suite): a width never seen in training (128), 16x16 inputs, two
hidden layers, no gradient scaling, and a 10x longer horizon.

Launch:
  python run.py --config configs/image_mixture.py --workdir runs/image_mixture
  # on MNIST from local IDX files (sizes up to 16x16):
  python run.py --config configs/image_mixture.py --workdir runs/image_mixture_mnist \
      --config.task.kwargs.dataset=mnist --config.task.kwargs.data_dir=/path/to/mnist
Runtime: the smoke size (``configs/image_mixture.py:smoke``) took 24 min wall (4.5 min CPU) end
to end on a 2-core CPU shared at load average 10-16, mostly compilation; the full size was not
timed.
"""
import ml_collections

from configs import quickstart
from mesajax.config import get_config_with_arg
from mesajax.registry import task_kwargs
from mesajax.tasks.images import ImageMLPMixture


def get_config(arg=None):
  return get_config_with_arg(_config, arg)


def _config():
  c = quickstart.get_config()
  c.name = "image_mixture"
  c.task.name = "image_mlp_mixture"
  c.task.kwargs = ml_collections.ConfigDict(task_kwargs("image_mlp_mixture"))
  c.task.kwargs.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.meta.num_outer_steps = 500
  c.shifts = ml_collections.ConfigDict(
      {**ImageMLPMixture.default_shifts, "horizon_x10": {"horizon_mult": 10}})
  # Thousands of parameters per task: the analyses use probes only (no dense Jacobians) on a few
  # tasks and points, which keeps their memory within this CPU's RAM (checked by resolve).
  c.analysis.dense_max = 0
  c.analysis.num_tasks = 8
  c.analysis.num_points = 2
  c.analysis.num_probes = 16
  return c
