"""Device mesh for meta-training: the task-batch axis shards over devices, phi is replicated.

One mesh axis, ``tasks``, with ``Auto`` axis type (GSPMD propagates the task sharding through the
vmapped unrolls; the mean over tasks becomes an all-reduce). ``jax.make_mesh`` defaults to Explicit
axis types from jax 0.10, so the type is spelled out. On one device every sharding is trivial.

``num_devices = 0`` means every device. In a multi-process run (``mesajax.distributed``) the mesh
spans every process's devices (it must: a process owning none of the mesh would hold no shard), so
each process computes the tasks of its own devices; the inputs of every jitted program are
replicated keys, so every process builds the same global task batch without any data exchange.
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

TASK_AXIS = "tasks"


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
  available = jax.device_count()
  num_devices = num_devices or available
  if num_devices < 1 or num_devices > available:
    raise ValueError(f"meta.num_devices={num_devices} but {available} device(s) are available")
  if jax.process_count() > 1 and num_devices != available:
    raise ValueError(f"meta.num_devices={num_devices}: a multi-process run shards over every "
                     f"device ({available}); set meta.num_devices=0")
  return jax.make_mesh((num_devices,), (TASK_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def task_sharded(mesh, task_axis: int = 0) -> NamedSharding:
  """Sharded on ``task_axis`` (1 when a leading seed axis comes first), replicated elsewhere."""
  return NamedSharding(mesh, P(*([None] * task_axis), TASK_AXIS))


def constrain_tasks(mesh):
  """A function that constrains every leaf of a pytree to be sharded on its leading (task) axis."""
  sharding = task_sharded(mesh)

  def constrain(tree):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

  return constrain
