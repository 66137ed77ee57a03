"""A small CNN classifier on real images: random subsets of a data set, a fresh network per task.

learned_optimization's ``Conv_*`` image tasks and the small CNNs Celo and VeLO meta-train on, at
toy scale: two stride-2 3x3 convolutions (16 and 32 channels), global mean pooling and a linear
read-out (5,130 parameters on the default data, scikit-learn's bundled 8x8 digits; no files
needed). 256 training and 512 validation images per task; the learned optimizer is meta-trained
on the validation loss. Shifts: 4x more training images, 16x16 inputs (upsampled), twice the
channels, a 10x longer horizon.

Launch:
  python run.py --config configs/image_cnn.py --workdir runs/image_cnn
  # Fashion-MNIST from local IDX files (gzipped or not) at 28x28 with three layers (93,962 params):
  python run.py --config configs/image_cnn.py --workdir runs/image_cnn_fmnist \
      --config.task.kwargs.dataset=fashion_mnist --config.task.kwargs.data_dir=/path/to/fmnist \
      --config.task.kwargs.channels="(32, 64, 128)"
Runtime: not timed at full size on the 2-core CPU (compilation of the convolutions dominates small
runs); the smoke size is ``configs/image_cnn.py:smoke``.
"""
import ml_collections

from configs import quickstart
from mesajax.config import get_config_with_arg
from mesajax.registry import task_kwargs
from mesajax.tasks.image_cnn import ImageCNN


def get_config(arg=None):
  return get_config_with_arg(_config, arg)


def _config():
  c = quickstart.get_config()
  c.name = "image_cnn"
  c.task.name = "image_cnn"
  c.task.kwargs = ml_collections.ConfigDict(task_kwargs("image_cnn"))
  # None-valued knobs take a string from the command line.
  c.task.kwargs.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.task.kwargs.image_size = ml_collections.FieldReference(None, field_type=int)
  c.meta.num_outer_steps = 500
  c.shifts = ml_collections.ConfigDict(ImageCNN.default_shifts)
  return c
