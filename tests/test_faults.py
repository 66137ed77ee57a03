"""Fault injection: the trials of docs/reliability.md, repeated automatically.

Fast part (the normal test run): the bad-input table through ``config.load`` + ``resolve`` (every
case one ``ValueError`` line, in-process) and a few of them through ``run.py`` (exit 2, one
``error:`` line, nothing written); the non-finite checkpoint guard; checksums, a corrupt and a
truncated latest checkpoint falling back to the previous step; the run-directory lock against a
second process; keyed result rows (a rerun replaces, never duplicates); metrics trimmed to the
checkpoint; SIGTERM during meta-training (exit 143, checkpointed, resumed bit-exact).

Slow part (``python -m pytest -m slow tests/test_faults.py``): repeated SIGINT / SIGTERM / kill -9
trials at random moments, during training and during saves (checkpoint_every=1), each resumed to
the end and compared bit-exact with a straight run; two concurrent ``train`` processes; the whole
bad-input table through ``run.py``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, run_cli

QUICK = os.path.join(ROOT, "configs", "quickstart.py")
SMOKE = f"{QUICK}:smoke"
# Tiny and quick to compile: 2-d axis-aligned quadratics, a hand-designed optimizer's phi, no
# selection, no shifts, a metrics row per step.
TINY = ["--config", SMOKE, "--config.task.name=quadratic", "--config.task.kwargs.rotate=False",
        "--config.task.kwargs.dim=2", "--config.meta.num_tasks=2", "--config.shifts={}",
        "--config.optimizer.name=sgd", "--config.meta.select_every=0",
        "--config.meta.log_every=1", "--noprogress"]


# --- the bad-input table ------------------------------------------------------------------------

BAD_OVERRIDES = [
    ("meta.outer_lr=nan", "finite"), ("meta.outer_lr=inf", "finite"),
    ("meta.outer_lr=-1", "outer_lr must be > 0"), ("meta.sigma=nan", "finite"),
    ("meta.outer_clip=nan", "finite"), ("eval.lr_grid_max=inf", "finite"),
    ("eval.lr_grid_min=nan", "finite"), ("optimizer.kwargs.step_mult=inf", "finite"),
    ("optimizer.kwargs.exp_mult=inf", "finite"), ("task.kwargs.noise=inf", "finite"),
    ("task.kwargs.w_scale=inf", "finite"), ("task.kwargs.noise=1e300", "float32"),
    ("task.kwargs.dim=1000000000", "exceeds"), ("meta.num_tasks=100000000", "num_tasks"),
    ("meta.num_tasks=5000000", "exceeds"), ("eval.n_boot=10000000000", "n_boot"),
    ("analysis.n_boot=10000000000", "n_boot"), ("analysis.num_steps=3", "num_steps"),
    ("analysis.num_points=11", "num_points"), ("analysis.num_tasks=1", "num_tasks"),
    ("analysis.dense_max=-1", "dense_max"), ("analysis.fit_iters=0", "fit_iters"),
    ("analysis.endpoint_steps=0", "endpoint_steps"), ("meta.num_devices=4096", "num_devices"),
    ("meta.horizon=7", "multiple of"), ("meta.horizon=abc", "must be an integer"),
    ("meta.horizon=True", "must be an integer"), ("meta.estimator=sgd", "estimator must be one of"),
    ("meta.foo=1", "unknown config key 'meta.foo'"), ("foo=1", "unknown config key 'foo'"),
    ("task.kwargs.foo=1", "unknown config key 'task.kwargs.foo'"),
    ("task.name=nope", "unknown task family 'nope'"), ("optimizer.name=nope", "unknown optimizer"),
    ("task.kwargs.dim=0", "dim"), ("task.kwargs.batch_size=0", "batch_size"),
    ("eval.baselines=('mlp_lopt',)", "learned"), ("eval.baselines='sgd'", "tuple"),
    ("eval.curve_every=3", "curve_every"), ("name=adam", "clashes"), ("name=''", "non-empty"),
    ("seed=-1", "seed"), ("meta.unroll_length=0", "unroll_length"),
    ("shifts.x={'task': {'nope': 1}}", "nope"), ("shifts.x={'horizon_mult': 0}", "horizon_mult"),
    ("shifts.x=3", "dict"), ("meta=3", "section"), ("eval.lr_grid_size=1", "lr_grid_size"),
    ("eval.lr_grid_min=10", "must exceed"), ("meta.select_tasks=0", "select_tasks"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES)
def test_bad_override_is_one_line_before_compiling(override, message):
  from mesajax.config import load, resolve
  t0 = time.perf_counter()
  with pytest.raises(ValueError) as e:
    resolve(load(SMOKE, [override]))
  msg = str(e.value)
  assert "\n" not in msg and message in msg, msg
  assert time.perf_counter() - t0 < 20


def test_family_switch_brings_its_defaults_and_shifts():
  from mesajax.config import load, resolve
  from mesajax.registry import task_kwargs
  c = resolve(load(QUICK, ["task.name=quadratic", "task.kwargs.dim=3"]))
  assert c.task.kwargs.to_dict() == {**task_kwargs("quadratic"), "dim": 3}
  # linreg's knob shifts are dropped, the horizon-only one kept, quadratic's own defaults added
  from mesajax.registry import task_class
  assert set(c.shifts.keys()) == {"horizon_x10"} | set(task_class("quadratic").default_shifts)
  c = resolve(load(QUICK, ["optimizer.name=adam", "task.kwargs.batch_size=8",
                           "analysis.dense_max=16", "analysis.endpoint_steps=5"]))
  assert c.optimizer.kwargs.to_dict() == resolve(load(QUICK, ["optimizer.name=adam"])).optimizer.kwargs.to_dict()
  assert c.task.kwargs.batch_size == 8 and c.analysis.dense_max == 16
  # Smoke keeps the declared smoke shift, not the alphabetically first.
  assert list(resolve(load(SMOKE)).shifts.keys()) == ["n_train_x10"]


def test_config_names_match_the_modules():
  from mesajax import config
  from mesajax.meta.truncation import OBJECTIVES, TRANSFORMS
  from mesajax.registry import ESTIMATORS
  assert (config.ESTIMATORS, config.OBJECTIVES, config.TRANSFORMS) == (tuple(ESTIMATORS),
                                                                       OBJECTIVES, TRANSFORMS)


def test_every_config_file_resolves_and_config_json_is_strict(tmp_path):
  from mesajax.config import load, resolve
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py") and not name.startswith("_"):
      c = resolve(load(os.path.join(ROOT, "configs", name)))
      json.dumps(c.to_dict(), allow_nan=False, default=list)
      if c.get("kind", "meta") == "meta":  # in-context learners have their own schema
        assert set(c.analysis.keys()) >= {"dense_max", "qs_fit_max_state", "endpoint_steps"}


def test_bad_workdir_and_config_file_are_one_line(tmp_path):
  from mesajax.config import load
  from mesajax.rundir import check_workdir
  afile = tmp_path / "afile"
  afile.write_text("x")
  cases = [(lambda: check_workdir(str(afile)), "not a directory"),
           (lambda: check_workdir(str(afile / "sub")), "not a directory")]
  for name, text, message in [("broken.py", "x = (", "cannot load config"),
                              ("notcd.py", "def get_config():\n  return {'a': 1}\n", "ConfigDict"),
                              ("noget.py", "x = 1\n", "no get_config"),
                              ("raises.py", "def get_config():\n  raise KeyError('k')\n",
                               "get_config raised KeyError")]:
    (tmp_path / name).write_text(text)
    cases.append((lambda n=name: load(str(tmp_path / n)), message))
  if os.geteuid() != 0:  # root reads and writes everything
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    (tmp_path / "secret.py").write_text("x = 1\n")
    (tmp_path / "secret.py").chmod(0)
    cases += [(lambda: check_workdir(str(ro / "run")), "not writable"),
              (lambda: load(str(tmp_path / "secret.py")), "not readable")]
  for fn, message in cases:
    with pytest.raises(ValueError) as e:
      fn()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


CLI_BAD = [
    ([*TINY, "--config.meta.outer_lr=nan"], "finite"),
    ([*TINY, "--config.task.kwargs.dim=1000000000"], "exceeds"),
    ([*TINY, "--config.meta.num_devices=2"], "num_devices"),
    (["--config", "/nonexistent/c.py"], "does not exist"),
]


@pytest.mark.parametrize("args,message", CLI_BAD)
def test_bad_input_through_run_py_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "run"
  t0 = time.perf_counter()
  proc = run_cli(*args, "--workdir", str(workdir))
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert message in lines[0] and not workdir.exists()
  assert time.perf_counter() - t0 < 60


# --- checkpoints ----------------------------------------------------------------------------------

def _tree(x):
  return {"phi": {"w": np.full([64], x, np.float32)}, "step": np.int32(x)}


def _abstract():
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _tree(0))


def test_non_finite_state_is_never_checkpointed(tmp_path):
  from mesajax import checkpoint
  wd = str(tmp_path)
  checkpoint.save(wd, 1, _tree(1), {})
  bad = _tree(2)
  bad["phi"]["w"][3] = np.nan
  with pytest.raises(checkpoint.NonFiniteState, match="non-finite"):
    checkpoint.save(wd, 2, bad, {})
  assert checkpoint.all_steps(wd) == [1]
  assert not checkpoint.save(wd, 1, _tree(1), {})  # an existing step: a no-op, not an error


def _data_files(step_dir):
  out = []
  for root, _, files in os.walk(step_dir):
    out += [os.path.join(root, f) for f in files if os.path.getsize(os.path.join(root, f)) > 64
            and "state" in root and "metadata" not in f.lower()]
  return sorted(out, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, damage, capfd):
  from mesajax import checkpoint
  wd = str(tmp_path)
  for s in (1, 2):
    checkpoint.save(wd, s, _tree(s), {})
  target = _data_files(os.path.join(wd, "checkpoints", "2"))[-1]
  if damage == "flip":
    with open(target, "r+b") as f:
      f.seek(os.path.getsize(target) // 2)
      chunk = f.read(64)
      f.seek(os.path.getsize(target) // 2)
      f.write(bytes(b ^ 0xFF for b in chunk))
  elif damage == "truncate":
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)
  else:
    os.remove(target)
  state = checkpoint.restore_state(wd, _abstract())
  assert int(state["step"]) == 1 and checkpoint.last_restore["skipped"] == [2]
  assert "skipped unusable checkpoint step(s) 2" in capfd.readouterr().err
  with pytest.raises(ValueError, match="step 2"):
    checkpoint.restore_state(wd, _abstract(), step=2)  # an explicit step never falls back
  # Setting the broken step aside lets a new step 2 be saved.
  checkpoint.set_aside(wd, 1, reason="test")
  checkpoint.save(wd, 2, _tree(5), {})
  assert int(checkpoint.restore_state(wd, _abstract())["step"]) == 5
  assert os.listdir(os.path.join(wd, "set_aside"))


# --- lock, rows, metrics -----------------------------------------------------------------------------

def test_second_process_is_refused_by_the_lock(tmp_path):
  from mesajax import lock
  script = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from mesajax import lock\n"
            f"try:\n  lock.hold({str(tmp_path)!r}).__enter__()\n  print('GOT')\n"
            "except lock.Locked as e:\n  print('LOCKED', e)\n")
  with lock.hold(str(tmp_path)):
    with lock.hold(str(tmp_path)):  # re-entrant in one process
      out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60).stdout
  assert out.startswith("LOCKED") and f"pid {os.getpid()}" in out, out
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60).stdout
  assert out.startswith("GOT"), out  # released (a dead holder also releases: kernel flock)


def test_rerun_replaces_rows_and_nonfinite_is_null(tmp_path):
  from mesajax.report.rows import make_row, read_rows, replace_rows
  path = str(tmp_path / "results.jsonl")
  rows = [make_row("eval", "heldout", "a", "m", 1.0), make_row("eval", "heldout", "a", "m", 2.0,
                                                              step=5),
          make_row("eval", "heldout", "a", "inf", float("inf"), ci_low=float("-inf"))]
  assert rows[2]["value"] is None and rows[2]["nonfinite"] == {"value": "inf", "ci_low": "-inf"}
  for _ in range(3):
    replace_rows(path, rows, stage="evaluate", checkpoint=6)
  replace_rows(path, rows[:1], stage="evaluate", checkpoint=3)
  got = read_rows(path)
  assert len(got) == 4
  text = open(path).read()
  assert "1e308" not in text and "NaN" not in text and "Infinity" not in text
  with open(path, "a") as f:
    f.write('{"analysis": "eval", "spl')
  with pytest.raises(ValueError, match="results.jsonl line 5"):
    read_rows(path)
  # The published, gzip-compressed form: the same rows back (pandas reads it too); a file cut
  # short is one line naming it.
  import pandas as pd
  from mesajax.report.rows import write_rows
  gz = str(tmp_path / "results.jsonl.gz")
  write_rows(gz, got)
  assert read_rows(gz) == got and len(pd.read_json(gz, lines=True)) == len(got)
  data = open(gz, "rb").read()
  write_rows(gz, got)
  assert open(gz, "rb").read() == data  # reproducible bytes: no timestamp in the gzip header
  with open(gz, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="cannot read .*results.jsonl.gz"):
    read_rows(gz)


def test_metrics_are_trimmed_to_the_checkpoint(tmp_path):
  from mesajax.meta.train import trim_metrics
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"outer_step": s}) + "\n" for s in range(1, 8)) + '{"outer')
  assert trim_metrics(str(tmp_path), 4) == 4
  assert [json.loads(l)["outer_step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4]


# --- signals --------------------------------------------------------------------------------------

def _train_proc(workdir, steps, ckpt_every, *extra):
  args = [sys.executable, os.path.join(ROOT, "run.py"), "train", *TINY,
          f"--config.meta.num_outer_steps={steps}", f"--config.meta.checkpoint_every={ckpt_every}",
          "--workdir", str(workdir), *extra]
  return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_rows(workdir, proc, timeout=240):
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      return True
    time.sleep(0.1)
  return False


def _final(workdir):
  """The latest checkpoint's state as numpy leaves (restored in this process)."""
  from mesajax import checkpoint, pipeline
  from mesajax.meta.outer import MetaTrainer
  config = pipeline.load_run_config(str(workdir))
  state = checkpoint.restore_state(str(workdir), MetaTrainer(config).abstract_state())
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))], int(state.step)


def _metrics_steps(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["outer_step"] for r in rows if "meta_loss" in r]


def _trial(workdir, sig, delay, steps, ckpt_every):
  """Interrupts a run with ``sig`` ``delay`` s after its first metrics row, then resumes it with
  the same command. Returns (exit code, checkpointed step, resumed final state)."""
  proc = _train_proc(workdir, steps, ckpt_every)
  assert _wait_for_rows(workdir, proc), proc.communicate()[1][-2000:]
  time.sleep(delay)
  proc.send_signal(sig)
  t0 = time.time()
  _, err = proc.communicate(timeout=180)
  waited = time.time() - t0
  code = proc.returncode
  if sig != signal.SIGKILL:
    assert code == 128 + sig, err[-2000:]
    assert waited < 60, waited
    assert "Traceback" not in err, err[-2000:]
  from mesajax import checkpoint
  saved = checkpoint.latest_step(str(workdir))
  proc = _train_proc(workdir, steps, 100000)  # checkpoint_every may change on resume
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  steps_logged = _metrics_steps(workdir)
  assert steps_logged == list(range(1, steps + 1)), "metrics rows lost or duplicated"
  assert saved is None or saved < steps, "the run ended before the signal"
  return code, saved, _final(workdir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  cache = {}

  def get(steps):
    if steps not in cache:
      wd = tmp_path_factory.mktemp(f"straight{steps}")
      proc = _train_proc(wd, steps, 100000)
      _, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-2000:]
      cache[steps] = _final(wd)
    return cache[steps]
  return get


def _same(a, b):
  (la, sa), (lb, sb) = a, b
  assert sa == sb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _tiny_config(steps):
  from mesajax.config import load, resolve
  overrides = [a[len("--config."):] for a in TINY if a.startswith("--config.")]
  return resolve(load(SMOKE, overrides + [f"meta.num_outer_steps={steps}",
                                          "meta.checkpoint_every=100000"]))


def test_sigterm_checkpoints_and_resumes_bit_exact(tmp_path):
  """SIGTERM mid-run: exit 143 within seconds, the latest finished step checkpointed and its
  metrics row flushed; resuming (in this process, sharing one compile with a straight run) ends
  bit-exact with the straight run."""
  from mesajax import checkpoint
  from mesajax.meta.outer import MetaTrainer
  from mesajax.meta.train import train
  wd = tmp_path / "run"
  proc = _train_proc(wd, 100000, 100000)
  assert _wait_for_rows(str(wd), proc), proc.communicate()[1][-2000:]
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143 and time.time() - t0 < 30, err[-2000:]
  assert "Traceback" not in err
  saved = checkpoint.latest_step(str(wd))
  assert saved and _metrics_steps(wd)[-1] == saved  # the pending row was flushed
  total = saved + 3
  config = _tiny_config(total)
  trainer = MetaTrainer(config)
  _, resumed = train(config, str(wd), progress=False, trainer=trainer)
  _, direct = train(config, str(tmp_path / "straight"), progress=False, trainer=trainer)
  assert int(resumed.step) == total and _metrics_steps(wd) == list(range(1, total + 1))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(direct))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_at_a_random_moment_resumes_bit_exact(tmp_path, straight, sig, trial):
  rng = random.Random(f"{sig}{trial}")
  during_save = trial % 2 == 1  # checkpoint every step: the signal lands in or next to a save
  steps = 3000
  code, saved, final = _trial(tmp_path / "run", getattr(signal, sig), rng.uniform(0, 1.5), steps,
                              1 if during_save else 100000)
  if sig != "SIGKILL":
    assert saved is not None
  _same(final, straight(steps))


@pytest.mark.slow
def test_two_trains_on_one_directory(tmp_path):
  wd = tmp_path / "run"
  first = _train_proc(wd, 100000, 100000)
  assert _wait_for_rows(str(wd), first)
  second = _train_proc(wd, 100000, 100000)
  _, err = second.communicate(timeout=120)
  first.send_signal(signal.SIGTERM)
  first.communicate(timeout=120)
  lines = [l for l in err.splitlines() if l.strip()]
  assert second.returncode == 2 and len(lines) == 1 and "is in use by pid" in lines[0], err
  assert first.returncode == 143


@pytest.mark.slow
@pytest.mark.parametrize("override,message", BAD_OVERRIDES)
def test_bad_override_through_run_py(tmp_path, override, message):
  workdir = tmp_path / "run"
  t0 = time.perf_counter()
  proc = run_cli("--config", SMOKE, f"--config.{override}", "--workdir", str(workdir))
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert message in lines[0] and not workdir.exists()
  assert time.perf_counter() - t0 < 30
