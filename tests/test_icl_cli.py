"""In-context learners through run.py: the same stages, checkpoints, rows and report."""
import json
import os

from helpers import ROOT, run_cli

ICL = os.path.join(ROOT, "configs", "icl_gd.py")


def test_icl_run_through_run_py(tmp_path):
  workdir = str(tmp_path / "icl")
  proc = run_cli("--config", f"{ICL}:smoke", "--config.icl.num_steps=20",
                 "--config.icl.eval.nulls=('untrained',)", "--workdir", workdir, "--noprogress",
                 timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]
  assert {"icl"} <= {r["analysis"] for r in rows}
  assert any(r["metric"] == "lambda_hat" for r in rows)
  assert all(r["value"] is not None or r.get("undefined") for r in rows)
  text = open(os.path.join(workdir, "report.md")).read()
  assert "## In-context learner" in text
  # Stages rerun from the checkpoint replace their rows (no duplicates).
  n = len(rows)
  proc = run_cli("analyze", "--workdir", workdir, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len([json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]) == n
  # Bad ICL input: one line, before anything compiles.
  proc = run_cli("--config", f"{ICL}:smoke", "--config.icl.lr=nan", "--workdir",
                 str(tmp_path / "bad"))
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
  assert len(proc.stderr.strip().splitlines()) == 1
