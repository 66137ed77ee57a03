"""All orbax code lives here: saving and restoring meta-training state with run metadata.

A checkpoint at outer step N holds two items: ``state`` (the ``MetaState`` pytree: phi, outer
optimizer state, estimator/truncation/PES state, step, RNG key, skip count) saved with
``StandardSave``, and ``meta`` (JSON: the resolved config, package versions, git commit) saved with
``JsonSave`` — provenance for a reader of the step folder (or another tool); mesajax itself reads
the run's config from ``DIR/config.json`` and verifies the state by its checksum. ``CheckpointManager`` writes atomically renamed step folders under ``DIR/checkpoints``;
each save is synchronous, so an interruption never leaves a half-written latest checkpoint.

Guarantees added on top of orbax (docs/reliability.md):

* **No non-finite checkpoint.** ``save`` checks the state on the host first and raises
  ``NonFiniteState`` (saving nothing, so the last good checkpoint stays the latest) when phi, the
  outer optimizer state or best_phi hold NaN/inf or best_score is NaN. (The estimator state may hold
  a diverged inner task: the truncation logic restarts those tasks, so it is not checked.)
* **Integrity.** After a save, ``DIR/checksums/N.json`` records the SHA-256 of every file of the
  step folder. ``restore_state`` checks it; with no explicit step, a corrupt, unreadable or
  non-finite latest step is skipped (named in one ``warning:`` line on stderr) and the previous
  good step is used. ``last_restore`` records what was used and skipped.
* **Signals.** Saves and restores run inside ``mesajax.interrupt.deferred()``: SIGINT/SIGTERM never
  raise inside orbax.
* **Idempotence.** Saving a step that is already saved (and verifies) is a no-op.
* ``set_aside(workdir, after)`` moves steps past ``after`` to ``DIR/set_aside/<time>/`` (train
  resuming from an earlier step never deletes anything).

Several processes (``mesajax.distributed``; docs/distributed.md): every process calls ``save`` and
``restore_state`` with the same global state (orbax writes each process's shards and lets process 0
write the metadata and finalise the step folder); the checksum manifests, set-aside moves and
warnings are process 0's alone, and every process leaves ``save`` only once the step and its
manifest are complete, so the directory reads the same from every process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mesajax import distributed, interrupt

MANIFEST_DIR = "checksums"
last_restore: dict = {}
_aside: dict = {}


class NonFiniteState(ValueError):
  """The state to save holds NaN or inf; nothing was saved."""


class CorruptCheckpoint(ValueError):
  """A checkpoint step failed its checksum, could not be read, or holds non-finite values."""


def _manager(workdir: str, max_to_keep: int | None = 3, create: bool = True):
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _step_dir(workdir: str, step: int) -> str:
  return os.path.join(checkpoint_dir(workdir), str(int(step)))


def _manifest_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, MANIFEST_DIR, f"{int(step)}.json")


# --- non-finite guard ---------------------------------------------------------------------------

def nonfinite(state: Any) -> list[str]:
  """Names of the parts of ``state`` holding NaN/inf (empty when it may be saved)."""
  def bad(tree, allow_inf=False):
    for x in jax.tree.leaves(tree):
      a = np.asarray(jax.device_get(x))
      if not np.issubdtype(a.dtype, np.floating):
        continue
      if (np.isnan(a).any() if allow_inf else not np.isfinite(a).all()):
        return True
    return False

  fields = getattr(state, "_fields", None)
  if fields and "phi" in fields:
    out = [f for f in fields if f not in ("est_state", "best_score") and bad(getattr(state, f))]
    if "best_score" in fields and bad(state.best_score, allow_inf=True):
      out.append("best_score")
    return out
  return ["state"] if bad(state) else []


# --- checksums ----------------------------------------------------------------------------------

def _digest(step_dir: str) -> dict:
  out = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[os.path.relpath(path, step_dir)] = h.hexdigest()
  return out


def _write_manifest(workdir: str, step: int) -> None:
  path = _manifest_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"step": int(step), "sha256": _digest(_step_dir(workdir, step))}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def verify(workdir: str, step: int) -> str | None:
  """``None`` when step ``step`` matches its checksums (or predates them), else why not."""
  path = _manifest_path(workdir, step)
  if not os.path.exists(path):
    return None  # saved before checksums existed, or killed between the save and the manifest
  try:
    with open(path) as f:
      want = json.load(f)["sha256"]
  except (OSError, ValueError, KeyError, TypeError):
    return f"its checksum file {path} is unreadable"
  have = _digest(_step_dir(workdir, step))
  for name in sorted(set(want) | set(have)):
    if name not in have:
      return f"file {name} is missing"
    if name not in want:
      continue  # orbax may add bookkeeping files later
    if want[name] != have[name]:
      return f"file {name} fails its SHA-256 checksum"
  return None


def _prune_manifests(workdir: str, keep: list[int]) -> None:
  d = os.path.join(workdir, MANIFEST_DIR)
  if not os.path.isdir(d):
    return
  for name in os.listdir(d):
    stem = name.split(".")[0]
    if stem.isdigit() and int(stem) not in keep:
      try:
        os.remove(os.path.join(d, name))
      except OSError:
        pass


# --- save / restore -----------------------------------------------------------------------------

def save(workdir: str, step: int, state: Any, meta: dict, max_to_keep: int | None = 3) -> bool:
  """Saves ``state`` and JSON ``meta`` as step ``step`` (blocking until it is on disk, then
  checksummed). Returns False (saving nothing) when ``step`` is already saved and verifies.
  Raises ``NonFiniteState`` (saving nothing) when the state holds NaN/inf."""
  step = int(step)
  bad = nonfinite(state)
  if bad:
    raise NonFiniteState(f"refusing to checkpoint step {step}: non-finite values in "
                         f"{', '.join(bad)}; the last good checkpoint "
                         f"({latest_step(workdir)}) is kept")
  meta = json.loads(json.dumps(meta, allow_nan=False, default=list))
  with interrupt.deferred():
    if step in all_steps(workdir):
      if distributed.on_primary(lambda: verify(workdir, step)) is None:
        return False
      set_aside(workdir, step - 1, reason=f"step {step} failed its checksum")
    with _manager(workdir, max_to_keep) as mngr:
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)), force=True)
      mngr.wait_until_finished()
      kept = sorted(mngr.all_steps())

    def finish():
      _write_manifest(workdir, step)
      _prune_manifests(workdir, kept)

    distributed.on_primary(finish)
  return True


def all_steps(workdir: str) -> list[int]:
  if distributed.process_count() > 1:
    # Process 0 lists the step folders (orbax renames a step folder into place only once it is
    # complete) and tells the others: a directory another process is creating must not look
    # different from each (orbax's managers hold barriers that every process must reach).
    return distributed.on_primary(lambda: _dir_steps(workdir))
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  with interrupt.deferred():
    with _manager(workdir, create=False) as mngr:
      return sorted(mngr.all_steps())


def latest_step(workdir: str) -> int | None:
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def _line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {msg}"[:300]


def _restore_one(workdir: str, abstract_state: Any, step: int) -> Any:
  why = verify(workdir, step)
  if why:
    raise CorruptCheckpoint(f"checkpoint step {step} in {checkpoint_dir(workdir)} is corrupt: {why}")
  with interrupt.deferred():
    with _manager(workdir, create=False) as mngr:
      try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # orbax raises many types; the user needs one line
        raise CorruptCheckpoint(f"cannot restore checkpoint step {step} in "
                                f"{checkpoint_dir(workdir)}: {_line(e)}") from None
  state = out["state"]
  bad = nonfinite(state)
  if bad:
    raise CorruptCheckpoint(f"checkpoint step {step} in {checkpoint_dir(workdir)} holds "
                            f"non-finite values in {', '.join(bad)}")
  return state


def restore_state(workdir: str, abstract_state: Any, step: int | None = None) -> Any:
  """Restores the state pytree into the structure/shardings of ``abstract_state``.

  With ``step`` given, that step or a one-line ``ValueError``. Without, the latest step that
  verifies; skipped (corrupt) steps are named in one ``warning:`` line on stderr and recorded in
  ``last_restore["skipped"]``.
  """
  last_restore.clear()
  if step is not None:
    step = _pick(workdir, step)
    state = _restore_one(workdir, abstract_state, step)
    last_restore.update(step=step, skipped=[])
    return state
  steps = all_steps(workdir)
  if not steps:
    raise ValueError(f"no checkpoint found in {checkpoint_dir(workdir)}")
  skipped = []
  for s in reversed(steps):
    try:
      state = _restore_one(workdir, abstract_state, s)
    except CorruptCheckpoint as e:
      skipped.append((s, str(e)))
      continue
    if skipped and distributed.is_primary():
      names = ", ".join(str(k) for k, _ in skipped)
      print(f"warning: skipped unusable checkpoint step(s) {names} ({skipped[0][1]}); "
            f"using step {s}", file=sys.stderr, flush=True)
    last_restore.update(step=s, skipped=[k for k, _ in skipped])
    return state
  raise CorruptCheckpoint(f"no usable checkpoint in {checkpoint_dir(workdir)}: every step "
                          f"({', '.join(str(k) for k, _ in skipped)}) is unusable; latest: "
                          f"{skipped[0][1]}")


def set_aside(workdir: str, after: int, reason: str = "") -> str | None:
  """Moves checkpoint steps > ``after`` (and their checksums) to ``DIR/set_aside/<time>/``.
  Returns that folder, or None when there was nothing to move. Process 0 moves; every process
  returns once it is done."""
  return distributed.on_primary(lambda: _set_aside(workdir, after, reason))


def _set_aside(workdir: str, after: int, reason: str = "") -> str | None:
  later = [s for s in _dir_steps(workdir) if s > after]
  if not later:
    return None
  dest = set_aside_dir(workdir)
  os.makedirs(os.path.join(dest, "checkpoints"), exist_ok=True)
  for s in later:
    shutil.move(_step_dir(workdir, s), os.path.join(dest, "checkpoints", str(s)))
    m = _manifest_path(workdir, s)
    if os.path.exists(m):
      os.makedirs(os.path.join(dest, MANIFEST_DIR), exist_ok=True)
      shutil.move(m, os.path.join(dest, MANIFEST_DIR, os.path.basename(m)))
  if reason:
    with open(os.path.join(dest, "REASON.txt"), "a") as f:
      f.write(reason + "\n")
  return dest


def set_aside_dir(workdir: str) -> str:
  """``DIR/set_aside/<UTC time>`` (one per process)."""
  if "name" not in _aside:
    _aside["name"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
  return os.path.join(workdir, "set_aside", _aside["name"])


def _dir_steps(workdir: str) -> list[int]:
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def _pick(workdir: str, step: int | None) -> int:
  steps = all_steps(workdir)
  if not steps:
    raise ValueError(f"no checkpoint found in {checkpoint_dir(workdir)}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; saved steps: {steps}")
  return step

