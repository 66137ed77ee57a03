"""An MLP classifier on real images: random subsets of a data set, a fresh network per task.

Default data: scikit-learn's bundled 8x8 digits (no files needed); 256 training and 512 validation
images per task, one hidden layer of 32 ReLU units on standardised pixels (2,410 parameters).
The learned optimizer is meta-trained on the validation loss. Shifts: 4x more training images,
16x16 inputs (upsampled), 4x wider network, 10x longer horizon.

Launch:
  python run.py --config configs/image_mlp.py --workdir runs/image_mlp
  # MNIST / Fashion-MNIST from local IDX files (gzipped or not), resized to 8x8:
  python run.py --config configs/image_mlp.py --workdir runs/image_mlp_mnist \
      --config.task.kwargs.dataset=mnist --config.task.kwargs.data_dir=/path/to/mnist \
      --config.task.kwargs.image_size=8
  # CIFAR-10 from its python batches: dataset=cifar10, data_dir=/path/to/cifar-10-batches-py
  # The ~1e5-parameter task (101,770 parameters: 28x28 inputs, 128 hidden units):
  python run.py --config configs/image_mlp.py --workdir runs/image_mlp_28 \
      --config.task.kwargs.image_size=28 --config.task.kwargs.width=128
Runtime: the smoke size (``configs/image_mlp.py:smoke``) took 7 min wall (3.1 min CPU) end to end
on a 2-core CPU shared at load average ~9, mostly compilation; the full size was not timed (see
docs/tasks.md).
"""
import ml_collections

from configs import quickstart
from mesajax.config import get_config_with_arg
from mesajax.registry import task_kwargs
from mesajax.tasks.images import ImageMLP


def get_config(arg=None):
  return get_config_with_arg(_config, arg)


def _config():
  c = quickstart.get_config()
  c.name = "image_mlp"
  c.task.name = "image_mlp"
  c.task.kwargs = ml_collections.ConfigDict(task_kwargs("image_mlp"))
  # None-valued knobs take a string from the command line.
  c.task.kwargs.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.task.kwargs.image_size = ml_collections.FieldReference(None, field_type=int)
  c.meta.num_outer_steps = 500
  c.shifts = ml_collections.ConfigDict(ImageMLP.default_shifts)
  return c
