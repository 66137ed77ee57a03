"""Multi-process meta-training: two CPU processes on 127.0.0.1 (two host devices each) give the
single-process meta-gradient, checkpoint and metrics rows.

The file is also the worker script: ``python tests/test_distributed.py SIZE multi PID PORT WORKDIR
OUT`` (one of two processes, ``mesajax.distributed`` in explicit mode) or ``... SIZE single WORKDIR
OUT`` (one process with four host devices). Every worker computes one TBPTT meta-gradient on a
4-task smoke config. ``fast``: SGD-with-momentum's meta-parameters on quadratics; the workers save
and restore a checkpoint of the initial state (sharded estimator state included) and the
reference is one device in the test process. ``full`` (slow): the quickstart's MLP learned optimizer
on linear regressions, two outer steps through the real training loop (lock, run directory,
metrics rows, selection, a checkpoint at every step), and a four-device single-process reference.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# The fast variant meta-trains SGD's (log) learning rate on quadratics (programs that compile in a
# few seconds); the slow one the quickstart's MLP learned optimizer on linear regressions.
SIZES = {"fast": ["task.name=quadratic", "optimizer.name=sgdm", "meta.horizon=10",
                  "meta.unroll_length=5"],
         "full": []}


def _overrides(num_devices, size):
  return SIZES[size] + ["meta.num_tasks=4", f"meta.num_devices={num_devices}", "meta.estimator=tbptt",
          # "none": the clip transform has a kink at 1 that round-off can flip.
          "meta.loss_transform='none'", "meta.num_outer_steps=2", "meta.log_every=1",
          "meta.checkpoint_every=1", "meta.select_every=2", "meta.select_tasks=2"]


def _flat(tree):
  import jax
  from jax.experimental import multihost_utils
  leaves = [multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1
            else np.asarray(x) for x in jax.tree.leaves(tree)]
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves]).tolist()


def _grad(trainer, state):
  """One TBPTT meta-gradient at the initial state (replicated output)."""
  import jax
  from mesajax.meta import sharding as shd
  rep = shd.replicated(trainer.mesh)
  fn = jax.jit(lambda s: trainer.estimator.estimate(s.phi, s.est_state, s.rng)[1:],
               in_shardings=(trainer.shardings(),), out_shardings=rep)
  loss, grad = fn(state)
  return float(loss), _flat(grad)


def _t(what, t0=time.perf_counter()):
  print(f"[{time.perf_counter() - t0:7.2f} s] {what}", file=sys.stderr, flush=True)


def worker(argv):
  sys.path.insert(0, ROOT)
  size, mode, argv = argv[0], argv[1], argv[1:]
  from mesajax import distributed
  from mesajax.config import load, resolve
  overrides = _overrides(0, size)
  if mode == "multi":
    pid, port, workdir, out_path = int(argv[1]), argv[2], argv[3], argv[4]
    overrides += ["distributed.mode=explicit", f"distributed.coordinator_address=127.0.0.1:{port}",
                  "distributed.num_processes=2", f"distributed.process_id={pid}",
                  "distributed.initialization_timeout=60"]
  else:
    workdir, out_path = argv[1], argv[2]
  config = load(os.path.join(ROOT, "configs", "quickstart.py:smoke"), overrides)
  nproc = distributed.initialize(config)  # before any other jax call
  import jax
  from mesajax import checkpoint
  from mesajax.meta.outer import MetaTrainer
  from mesajax.meta.train import train
  config = resolve(config)
  trainer = MetaTrainer(config)
  out = {"processes": nproc, "devices": jax.device_count(),
         "local_devices": jax.local_device_count()}
  _t("initialised")
  state = trainer.init()
  out["loss"], out["grad"] = _grad(trainer, state)
  _t("meta-gradient")
  if size == "fast":  # a checkpoint of the initial state, under the run-directory lock
    from mesajax import lock
    with lock.hold(workdir):
      checkpoint.save(workdir, 1, state, {"test": True})
  else:
    _, state = train(config, workdir, progress=False, trainer=trainer)
    _t("trained")
  out["trained"] = _flat(state)
  out["steps"] = checkpoint.all_steps(workdir)
  restored = checkpoint.restore_state(workdir, trainer.abstract_state())
  out["restored"] = _flat(restored)
  _t("restored")
  out["shards"] = len(jax.tree.leaves(restored.est_state)[0].sharding.device_set)
  with open(out_path, "w") as f:
    json.dump(out, f)


def reference(size, num_devices=1):
  """The single-process meta-gradient (and initial state) with ``num_devices`` devices."""
  from mesajax.config import load, resolve
  from mesajax.meta.outer import MetaTrainer
  trainer = MetaTrainer(resolve(load(os.path.join(ROOT, "configs", "quickstart.py:smoke"),
                                     _overrides(num_devices, size))))
  state = trainer.init()
  loss, grad = _grad(trainer, state)
  return {"loss": loss, "grad": grad, "trained": _flat(state)}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, devices, log):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                          stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(procs, logs, timeout):
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:  # never leave a worker behind (one may wait for a dead peer)
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    with open(log.name) as f:
      text = f.read()
    assert p.returncode == 0, f"worker exited {p.returncode}:\n{text[-3000:]}"


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _run_multi(tmp_path, size, single=False):
  port = _free_port()
  logs = [open(tmp_path / f"log{i}.txt", "w") for i in range(3)]
  procs = [_launch([size, "multi", str(i), str(port), str(tmp_path / "multi"),
                    str(tmp_path / f"multi{i}.json")], 2, logs[i]) for i in range(2)]
  if single:
    procs.append(_launch([size, "single", str(tmp_path / "single"), str(tmp_path / "single.json")],
                         4, logs[2]))
  _wait(procs, logs, timeout=900)
  multi = [json.loads((tmp_path / f"multi{i}.json").read_text()) for i in range(2)]
  for m in multi:
    assert (m["processes"], m["devices"], m["local_devices"]) == (2, 4, 2)
    assert m["shards"] == 4  # the restored estimator state is sharded over both processes
    np.testing.assert_array_equal(m["restored"], m["trained"])  # the checkpoint, exactly
  assert multi[0]["grad"] == multi[1]["grad"]  # a replicated result: the same on both
  return multi, (json.loads((tmp_path / "single.json").read_text()) if single else None)


@pytest.mark.parametrize("overrides,match", [
    (["distributed.mode='mpi'"], "distributed.mode"),
    (["distributed.mode='explicit'"], "coordinator_address"),
    (["distributed.mode='explicit'", "distributed.coordinator_address='h:1'",
      "distributed.num_processes=2", "distributed.process_id=2"], "process_id"),
    (["distributed.local_device_ids=(0, -1)"], "local_device_ids"),
    (["distributed.cluster_detection_method='pbs'"], "cluster_detection_method"),
    (["meta.inner_dtype='float16'"], "inner_dtype"),
    (["meta.tensorboard=1"], "tensorboard"),
    (["distributed.port=1"], "distributed.port"),
])
def test_bad_distributed_config_is_one_line(overrides, match):
  """Refused by resolve, and by initialize before it calls jax.distributed."""
  from mesajax import distributed
  from mesajax.config import load, resolve
  with pytest.raises(ValueError, match=match) as e:
    config = load(os.path.join(ROOT, "configs", "quickstart.py:smoke"), overrides)
    distributed.initialize(config)
    resolve(config)
  assert "\n" not in str(e.value)


def test_single_process_needs_no_collectives():
  from mesajax import distributed
  assert distributed.initialize(load_smoke()) == 1  # mode "off": nothing is started
  assert distributed.is_primary() and distributed.on_primary(lambda: 7) == 7
  assert distributed.any_process(True) and not distributed.any_process(False)


def load_smoke():
  from mesajax.config import load
  return load(os.path.join(ROOT, "configs", "quickstart.py:smoke"))


def _close(g, ref, rtol=1e-5):
  """Only the order of float32 reductions may differ."""
  g, ref = np.asarray(g), np.asarray(ref)
  assert np.linalg.norm(ref) > 0
  assert np.linalg.norm(g - ref) / np.linalg.norm(ref) < rtol


def test_two_processes_match_one_device(tmp_path):
  """Two processes x two host devices: one device's meta-gradient and initial state; the
  checkpoint (written by both processes) restores exactly; one lock, one set of checksums."""
  multi, _ = _run_multi(tmp_path, "fast")
  ref = reference("fast")
  _close(multi[0]["grad"], ref["grad"])
  np.testing.assert_allclose(multi[0]["loss"], ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(multi[0]["trained"], ref["trained"], rtol=1e-6, atol=1e-7)
  assert multi[0]["steps"] == multi[1]["steps"] == [1]
  assert os.listdir(tmp_path / "multi" / "checksums") == ["1.json"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """The quickstart's learned optimizer: two processes x two devices = one process x four
  devices = one device (meta-gradient); two outer steps give the same state, checkpoints and
  metrics rows (written once, by process 0)."""
  multi, single = _run_multi(tmp_path, "full", single=True)
  ref = reference("full")
  assert (single["processes"], single["devices"]) == (1, 4)
  for g in (single["grad"], multi[0]["grad"]):
    _close(g, ref["grad"])
  # Two outer steps (Adam moves phi by about the learning rate; round-off stays far below it).
  for m in multi:
    np.testing.assert_allclose(m["trained"], single["trained"], rtol=1e-4, atol=1e-6)
    assert m["steps"] == single["steps"] == [1, 2]
  multi_dir, single_dir = str(tmp_path / "multi"), str(tmp_path / "single")
  assert sorted(os.listdir(os.path.join(multi_dir, "checksums"))) == ["1.json", "2.json"]
  rows_m, rows_s = _rows(multi_dir), _rows(single_dir)
  assert [r["outer_step"] for r in rows_m] == [r["outer_step"] for r in rows_s] == [1, 2, 2]
  for a, b in zip(rows_m, rows_s):
    for key in ("meta_loss", "grad_norm", "select_score"):
      if key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)
  assert not os.path.exists(os.path.join(multi_dir, "set_aside"))


if __name__ == "__main__":
  worker(sys.argv[1:])
