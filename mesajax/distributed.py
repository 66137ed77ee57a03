"""Multi-process (multi-host) runs: ``jax.distributed`` initialisation and process-0-only writes.

JAX runs one process per host (or per accelerator group); together they see every device of the
job (``jax.devices()``), each process addressing only its own (``jax.local_devices()``). Every
process runs the same program on the same global arrays; collectives (the all-reduce of the mean
over tasks) cross process boundaries (NCCL on GPUs, ICI/DCN on TPUs, gloo on CPUs).

``initialize(config)`` reads ``config.distributed`` and must run before any other JAX call
(``run.py`` calls it between loading and validating the config):

* ``mode = "off"``: a single process (nothing is called).
* ``mode = "auto"``: ``jax.distributed.initialize()`` with the cluster auto-detection of JAX
  (SLURM: ``srun`` environment variables; Cloud TPU pod slices: the TPU metadata; Open MPI;
  Kubernetes), optionally restricted by ``cluster_detection_method``.
* ``mode = "explicit"``: ``coordinator_address`` (``host:port`` of process 0),
  ``num_processes`` and ``process_id`` given in the config (e.g. ``--config.distributed.process_id=$i``).

Rules the rest of mesajax follows (docs/distributed.md): run-directory files (config, metrics rows,
TensorBoard events, checksums, set-aside folders, the lock) are written by process 0 only
(``is_primary``); checkpoints are written by every process (orbax: each writes its own shards, the
primary the metadata); ``on_primary(fn)`` runs a step that may fail (``ValueError``, ``Locked``) on
process 0 and raises the same one-line error in every process, so no process is left waiting.
"""
from __future__ import annotations

import json
from typing import Any, Callable

MODES = ("off", "auto", "explicit")
DETECTION = (None, "slurm", "ompi", "mpi4py", "gke_tpu", "tpu", "k8s", "deactivate")
_state: dict = {}


def validate(d: dict) -> None:
  """Checks ``d["distributed"]`` (a plain dict of the config); one-line ``ValueError``."""
  s = d["distributed"]
  if s["mode"] not in MODES:
    raise ValueError(f"config.distributed.mode must be one of {', '.join(MODES)}, got {s['mode']!r}")
  if s["cluster_detection_method"] not in DETECTION:
    raise ValueError(f"config.distributed.cluster_detection_method must be one of "
                     f"{', '.join(map(str, DETECTION))}, got {s['cluster_detection_method']!r}")
  if s["mode"] == "explicit":
    addr = s["coordinator_address"]
    host, _, port = (addr or "").rpartition(":")
    if not isinstance(addr, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"config.distributed.coordinator_address must be HOST:PORT (process 0's "
                       f"address) in explicit mode, got {addr!r}")
    n, i = s["num_processes"], s["process_id"]
    if not _is_int(n) or not 1 <= n <= 65536:
      raise ValueError(f"config.distributed.num_processes must be an int in [1, 65536], got {n!r}")
    if not _is_int(i) or not 0 <= i < n:
      raise ValueError(f"config.distributed.process_id must be an int in [0, num_processes), "
                       f"got {i!r}")
  ids = s["local_device_ids"]
  if ids is not None and (not isinstance(ids, (list, tuple)) or not ids
                          or not all(_is_int(x) and x >= 0 for x in ids)):
    raise ValueError(f"config.distributed.local_device_ids must be None or a list of device "
                     f"indices >= 0, got {ids!r}")
  t = s["initialization_timeout"]
  if not _is_int(t) or not 1 <= t <= 86400:
    raise ValueError(f"config.distributed.initialization_timeout must be an int in [1, 86400] "
                     f"seconds, got {t!r}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def initialize(config) -> int:
  """Starts the multi-process runtime as ``config.distributed`` says (once per process; a no-op
  for ``mode = "off"``). Returns the number of processes. Must precede every other JAX call."""
  s = config.get("distributed") if hasattr(config, "get") else None
  if s is None or s.get("mode", "off") == "off":
    return 1
  s = s.to_dict() if hasattr(s, "to_dict") else dict(s)
  validate({"distributed": s})
  if _state.get("initialized"):
    import jax
    return jax.process_count()
  import jax
  kwargs: dict[str, Any] = {"initialization_timeout": int(s["initialization_timeout"])}
  if s["local_device_ids"] is not None:
    kwargs["local_device_ids"] = list(s["local_device_ids"])
  if s["mode"] == "explicit":
    kwargs.update(coordinator_address=s["coordinator_address"],
                  num_processes=int(s["num_processes"]), process_id=int(s["process_id"]))
  elif s["cluster_detection_method"] is not None:
    kwargs["cluster_detection_method"] = s["cluster_detection_method"]
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    msg = " ".join(str(e).split())[:300]
    raise ValueError(f"jax.distributed.initialize failed ({s['mode']} mode): {msg}") from None
  _state["initialized"] = True
  return jax.process_count()


def process_count() -> int:
  import jax
  return jax.process_count()


def is_primary() -> bool:
  """True on process 0 (and in every single-process run): the process that writes files."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op for one process)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _broadcast_text(text: str, size: int = 8192) -> str:
  """Process 0's ``text`` (at most ``size`` UTF-8 bytes) on every process (a collective: every
  process must call it)."""
  import numpy as np
  from jax.experimental import multihost_utils
  raw = text.encode()
  if len(raw) > size:
    raise ValueError(f"cannot broadcast {len(raw)} bytes (at most {size})")
  buf = np.zeros(size + 4, np.uint8)
  buf[:4] = np.frombuffer(np.uint32(len(raw)).tobytes(), np.uint8)
  buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  n = int(np.frombuffer(out[:4].tobytes(), np.uint32)[0])
  return bytes(out[4:4 + n]).decode()


def on_primary(fn: Callable[[], Any], error: type = ValueError) -> Any:
  """Runs ``fn()`` on process 0 only (a single-process run: just runs it) and returns its result
  (JSON-serialisable) on every process; returns only once process 0 is done (a barrier). When
  ``fn`` raises on process 0, process 0 re-raises it and every other process raises ``error``
  with its message, so no process is left waiting."""
  if process_count() == 1:
    return fn()
  out, err = None, None
  if is_primary():
    try:
      out = fn()
    except Exception as e:  # told to every process, so none waits for process 0
      err = e
  payload = json.dumps({"error": f"{err}" if err is not None else None, "out": out}, default=str)
  got = json.loads(_broadcast_text(payload if is_primary() else ""))
  if err is not None:
    raise err
  if got["error"] is not None:
    raise error(f"process 0: {got['error']}")
  return got["out"]


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is true on any (a collective in a multi-process run:
  every process must call it; used so that a signal seen by one process stops all together)."""
  if process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))
