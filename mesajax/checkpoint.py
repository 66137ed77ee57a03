"""All orbax code lives here: saving and restoring meta-training state with run metadata.

A checkpoint at outer step N holds two items: ``state`` (the ``MetaState`` pytree: phi, outer
optimizer state, estimator/truncation/PES state, step, RNG key, skip count) saved with
``StandardSave``, and ``meta`` (JSON: the resolved config, package versions, git commit) saved with
``JsonSave``. ``CheckpointManager`` writes asynchronously-safe, atomically renamed step folders under
``DIR/checkpoints``; we wait for each save to finish before returning so an interruption never
leaves a half-written latest checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _manager(workdir: str, max_to_keep: int | None = 3, create: bool = True):
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def save(workdir: str, step: int, state: Any, meta: dict, max_to_keep: int | None = 3) -> None:
  """Saves ``state`` and JSON ``meta`` as step ``step`` (blocking until it is on disk)."""
  with _manager(workdir, max_to_keep) as mngr:
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()


def all_steps(workdir: str) -> list[int]:
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  with _manager(workdir, create=False) as mngr:
    return sorted(mngr.all_steps())


def latest_step(workdir: str) -> int | None:
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def restore_meta(workdir: str, step: int | None = None) -> dict:
  """The JSON metadata of a checkpoint (latest by default); ``ValueError`` if there is none."""
  step = _pick(workdir, step)
  with _manager(workdir, create=False) as mngr:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore_state(workdir: str, abstract_state: Any, step: int | None = None) -> Any:
  """Restores the state pytree into the structure/shardings of ``abstract_state``."""
  step = _pick(workdir, step)
  with _manager(workdir, create=False) as mngr:
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # orbax raises many types; the user needs one line
      raise ValueError(f"cannot restore checkpoint step {step} in {checkpoint_dir(workdir)}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  return out["state"]


def _pick(workdir: str, step: int | None) -> int:
  steps = all_steps(workdir)
  if not steps:
    raise ValueError(f"no checkpoint found in {checkpoint_dir(workdir)}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; saved steps: {steps}")
  return step
