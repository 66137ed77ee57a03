"""Run directories: the resolved config, version metadata and the guard against mixing runs.

Layout of ``DIR``:
  config.json      the resolved config (what defines the run)
  meta.json        package versions, platform, git commit
  checkpoints/     orbax step folders (``mesajax.checkpoint``)
  checksums/       SHA-256 of every checkpoint step folder (``mesajax.checkpoint``)
  metrics.jsonl    meta-training log rows (outer_step, meta_loss, grad_norm, ...); rows past the
                   checkpoint a run resumes from are set aside, so they always match it
  results.jsonl    tidy result rows (eval, analyses), keyed; a rerun stage replaces its own rows
                   (atomic rewrite, ``mesajax.report.rows.replace_rows``)
  set_aside/       checkpoint steps and metrics rows a resume moved out of the way (never deleted)
  .lock            the run directory's lock (``mesajax.lock``)
  report.md, figures/   generated from the rows
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata

from mesajax.config import identity

PACKAGES = ("mesajax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "ml_collections")


def versions() -> dict:
  out = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out["git_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], check=True,
                                       capture_output=True, text=True, timeout=5).stdout.strip()
  except Exception:
    out["git_commit"] = None
  try:
    import jax
    out["backend"] = jax.default_backend()
    out["device_count"] = jax.device_count()
  except Exception:
    pass
  return out


def _diff(a, b, prefix=""):
  """The first dotted key at which two nested dicts differ, with both values."""
  for key in sorted(set(a) | set(b), key=str):
    va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
    if isinstance(va, dict) and isinstance(vb, dict):
      found = _diff(va, vb, f"{prefix}{key}.")
      if found:
        return found
    elif va != vb:
      return f"{prefix}{key}: {va!r} (in the directory) vs {vb!r} (now)"
  return None


def _normalise(d):
  return json.loads(json.dumps(d, default=list))


def read_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
  if not isinstance(out, dict):
    raise ValueError(f"{path} does not hold a config (a JSON object)")
  return out


def check_workdir(workdir: str) -> None:
  """One-line ``ValueError`` when ``workdir`` cannot be a run directory (before writing)."""
  if not workdir:
    raise ValueError("--workdir must not be empty")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} exists and is not a directory")
  probe = workdir
  while not os.path.exists(probe):
    parent = os.path.dirname(os.path.abspath(probe))
    if parent == os.path.abspath(probe):
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ValueError(f"--workdir {workdir}: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir}: {probe} is not writable (permission denied)")


def _comparable(saved: dict) -> dict:
  """A saved config with every default filled in (configs from older versions list fewer keys)."""
  import ml_collections
  from mesajax.config import resolve
  try:
    return resolve(ml_collections.ConfigDict(saved), check_memory=False).to_dict()
  except Exception:
    return saved


def prepare(workdir: str, config) -> bool:
  """Creates ``workdir`` for ``config`` or checks it holds a run of the same config.

  Returns True when the directory already held this run (a resume). Raises ``ValueError`` when it
  holds a run of another config: a run directory is never silently reused or overwritten.
  """
  saved = check_same(workdir, config)
  os.makedirs(workdir, exist_ok=True)
  current = _normalise(config.to_dict())
  _write_json(os.path.join(workdir, "config.json"), current)
  _write_json(os.path.join(workdir, "meta.json"), versions())
  return saved is not None


def check_same(workdir: str, config) -> dict | None:
  """The saved config of ``workdir`` (None for a new directory) after checking, without writing
  anything, that it is ``config``'s run; ``ValueError`` otherwise."""
  check_workdir(workdir)
  if not os.path.isdir(workdir):
    return None
  saved = read_config(workdir)
  if saved is not None:
    diff = _diff(_normalise(identity_dict(_comparable(saved))), _normalise(identity(config)))
    if diff:
      raise ValueError(f"{workdir} holds a run of another config ({diff}); "
                       f"use another --workdir")
  elif os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} has checkpoints but no config.json; refusing to reuse it")
  return saved


def identity_dict(saved: dict) -> dict:
  import ml_collections
  return identity(ml_collections.ConfigDict(saved))


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=list, allow_nan=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
