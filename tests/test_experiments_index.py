"""The experiments index and the regenerate command: every experiment is listed with its command,
the regenerate script knows every experiment folder, and bad arguments are one-line errors.

(The end-to-end ``python experiments/regenerate.py --quick`` smoke is run by CI separately.)
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXP)

import regenerate  # noqa: E402


def _readme():
  with open(os.path.join(EXP, "README.md")) as f:
    return f.read()


def test_every_experiment_is_in_the_index_with_its_command():
  text = _readme()
  dirs = regenerate.experiment_dirs()
  assert dirs, "no experiments/<name>/run.py found"
  for name in dirs:
    assert re.search(rf"python experiments/{name}/run\.py --workdir \S+", text), (
        f"experiments/README.md lacks the command of {name}")
    assert f"({name}/README.md)" in text, f"experiments/README.md does not link {name}/README.md"
  assert "python experiments/regenerate.py" in text


def test_regenerate_knows_exactly_the_experiment_folders():
  assert sorted(regenerate.EXPERIMENTS) == regenerate.experiment_dirs()


def test_regenerate_builds_each_command():
  cmd = regenerate.command("train_val", "/tmp/x", quick=True, publish=False)
  assert cmd[1:] == [os.path.join(EXP, "train_val", "run.py"), "--workdir", "/tmp/x", "--quick"]
  cmd = regenerate.command("icl_gd", "/tmp/x", quick=False, publish=True)
  assert "--publish" not in cmd and "--quick" not in cmd  # not a harness experiment: no flag


@pytest.mark.parametrize("args,message", [
    (["--only", "nope"], "--only: unknown experiment 'nope'"),
    (["--only", ","], "--only: unknown experiment"),
    (["--quick", "--publish"], "drop --quick"),
    (["--workdir", os.path.abspath(__file__)], "is not a directory"),
    (["--bogus"], "unrecognized arguments"),
    (["--timeout", "-1"], "--timeout must be"),
    (["--timeout", "soon"], "invalid float value"),
])
def test_bad_arguments_are_one_line(args, message):
  proc = subprocess.run([sys.executable, os.path.join(EXP, "regenerate.py"), *args],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert proc.returncode == 2
  lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error") or "error:" in x]
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""


@pytest.mark.parametrize("module,bad", [("proxy_train_val", "nope"), ("proxy_scale", "dim,width"),
                                        ("proxy_scale", "smoke,smoke")])
def test_proxy_configs_refuse_unknown_arguments(module, bad):
  import importlib
  mod = importlib.import_module(f"configs.{module}")
  with pytest.raises(ValueError, match="unknown config argument"):
    mod.get_config(bad)
