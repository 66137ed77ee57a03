"""The command line: clear one-line errors before anything compiles, and the smoke-size main job."""
import json
import os
import time

import pytest

from helpers import ROOT, run_cli

QUICK = os.path.join(ROOT, "configs", "quickstart.py")

BAD = [
    (["--config.meta.foo=1"], "unknown config key 'meta.foo'"),
    (["--config", "configs/does_not_exist.py"], "does not exist"),
    (["--config.meta.horizon=7"], "multiple of"),
    (["--config.meta.horizon=abc"], "must be an integer"),
    (["--config.meta.outer_lr=nan"], "finite"),
    (["--config.analysis.num_steps=3"], "num_steps"),
    (["--config.task.kwargs.nope=3"], "unknown config key 'task.kwargs.nope'"),
    (["--config.meta.outer_lr=-1.0"], "outer_lr must be > 0"),
    (["--config.meta.estimator=sgd"], "estimator must be one of"),
    (["--config.task.name=nope"], "unknown task family 'nope'"),
    (["--config.optimizer.name=nope"], "unknown optimizer 'nope'"),
    (["--config.task.kwargs.dim=0"], "dim"),
    (["--config", f"{QUICK}:smok"], "unknown config argument"),
    (["bogus"], "unknown command"),
    (["analyze", "--workdir", "/nonexistent/dir"], "does not exist"),
    (["evaluate"], "needs --workdir"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_clear_line(args, message):
  t0 = time.perf_counter()
  proc = run_cli(*args)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert message in lines[0]
  assert "Traceback" not in proc.stdout + proc.stderr
  assert time.perf_counter() - t0 < 60


def test_missing_checkpoint_and_unknown_split(tmp_path):
  """A valid run directory (its config.json) without checkpoints, an absent --checkpoint step,
  and an unknown split in the config: each one line, exit 2, reached (not stopped earlier)."""
  from mesajax.config import load, resolve
  config = resolve(load(f"{QUICK}:smoke"))
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), default=list))
  proc = run_cli("analyze", "--workdir", str(tmp_path))
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "has no checkpoint yet" in lines[0], lines
  proc = run_cli("evaluate", "--workdir", str(tmp_path), "--checkpoint", "7")
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and "no checkpoint" in lines[0], proc.stderr
  # A shift naming a knob the family lacks (an unknown split definition).
  proc = run_cli("--config", f"{QUICK}:smoke", "--config.shifts.bad={'task': {'nope': 1}}",
                 "--workdir", str(tmp_path / "other"))
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and "shift 'bad'" in lines[0], proc.stderr


def test_smoke_main_job_end_to_end(tmp_path):
  """``run.py`` at smoke size: train → evaluate → analyse → report, then a refused reuse."""
  workdir = str(tmp_path / "run")
  proc = run_cli("--config", f"{QUICK}:smoke", "--workdir", workdir, "--noprogress", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "results.jsonl"))]
  evals = {(r["optimizer"], r["metric"]) for r in rows
           if r["analysis"] == "eval" and r["split"] == "heldout"}
  for opt in ("quickstart", "sgd", "sgdm", "adam"):
    for metric in ("final_outer_loss", "mean_outer_loss", "diverged_frac"):
      assert (opt, metric) in evals
  analyses = {r["analysis"] for r in rows}
  assert {"nci", "transverse", "nci_metric", "objective_fit", "endpoint_fit",
          "alignment"} <= analyses
  assert os.path.exists(os.path.join(workdir, "report.md"))
  assert os.listdir(os.path.join(workdir, "figures"))
  # Same directory, another config: refused with one line.
  proc = run_cli("--config", f"{QUICK}:smoke", "--config.meta.horizon=10", "--workdir", workdir)
  assert proc.returncode == 2 and "another config" in proc.stderr


def test_interrupt_saves_a_checkpoint_and_resume_finishes(tmp_path):
  """Ctrl-C during meta-training checkpoints the latest finished step (exit 130); the same
  command with a larger step count resumes from it (no step recomputed, no metrics duplicated)."""
  import signal
  import subprocess
  import sys
  from mesajax import checkpoint
  workdir = str(tmp_path / "run")
  tiny = ["--config", f"{QUICK}:smoke", "--config.task.name=quadratic",
          "--config.task.kwargs.rotate=False", "--config.task.kwargs.dim=2",
          "--config.meta.num_tasks=2", "--config.shifts={}", "--config.optimizer.name=sgd",
          "--config.meta.select_every=0", "--config.meta.log_every=1",
          "--config.meta.checkpoint_every=100000", "--workdir", workdir, "--noprogress"]
  args = [sys.executable, os.path.join(ROOT, "run.py"), "train", *tiny,
          "--config.meta.num_outer_steps=100000"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err
  saved = checkpoint.latest_step(workdir)
  assert saved, "no checkpoint written on interruption"
  proc = run_cli("train", *tiny, f"--config.meta.num_outer_steps={saved + 2}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert checkpoint.all_steps(workdir)[-2:] == [saved, saved + 2]
  steps = [json.loads(l)["outer_step"] for l in open(metrics)]
  assert steps == list(range(1, saved + 3))


def test_compile_cache_directory_from_the_environment(monkeypatch, tmp_path):
  from mesajax import compile_cache
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
  assert compile_cache.cache_dir() == str(tmp_path / "c")
  for off in ("off", "0", "", "OFF"):
    monkeypatch.setenv(compile_cache.ENV, off)
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None
  monkeypatch.delenv(compile_cache.ENV)
  assert compile_cache.cache_dir() == os.path.expanduser("~/.cache/mesajax/jax")
