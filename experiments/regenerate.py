"""Regenerates every experiment's rows, tables and figures: runs each ``experiments/<name>/run.py``.

  python experiments/regenerate.py [--quick] [--only NAME[,NAME...]] [--workdir ROOT] [--publish]
                                   [--timeout SECONDS]

Each experiment runs as its own process, ``python experiments/<name>/run.py --workdir ROOT/<name>``
(``--quick`` passes each run.py's CI size), and writes its tidy rows (``results.jsonl``), its
tables (``README.md``) and its figures (``figures/``) into ``ROOT/<name>``: every table and figure
is rebuilt from rows by the experiment's own code. The experiments run one after another (each
uses both cores); a failing experiment does not stop the others. At the end a table gives each
experiment's wall time and status, and the exit status is 1 when any experiment failed or ran
past ``--timeout`` (2 for a bad argument, printed as one ``error:`` line before anything runs).

``--publish`` (full size only) then copies the results into the repository: experiments built on
``experiments/common.py`` copy ``README.md``, ``figures/`` and ``results.jsonl`` into
``experiments/<name>/`` (their ``run.py --publish``); the others' figures are copied into
``experiments/<name>/figures/``, and their hand-introduced READMEs keep their text (paste the
tables from ``ROOT/<name>/README.md``).

``--quick`` is the smoke test CI runs (every run.py end to end at its smallest size); see
``experiments/README.md`` for each experiment's command, runtime and what it shows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Every experiment with a run.py, in the order they run: name -> how its run.py is driven.
#   quick:   the run.py takes --quick (else the quick run passes nothing: it is already small)
#   harness: the run.py is built on experiments/common.py (it takes --publish DEST)
EXPERIMENTS = {
    "known_answers": {"quick": True, "harness": False},
    "icl_gd": {"quick": True, "harness": False},
    "implied_ridge": {"quick": True, "harness": False},
    "icl_shift": {"quick": True, "harness": False},
    "optimum_location": {"quick": True, "harness": True},
    "horizon": {"quick": True, "harness": True},
    "train_val": {"quick": True, "harness": True},
    "scale": {"quick": True, "harness": True},
}


def experiment_dirs() -> list[str]:
  """Names of the folders ``experiments/<name>/`` that hold a ``run.py``."""
  return sorted(d for d in os.listdir(HERE)
                if os.path.isfile(os.path.join(HERE, d, "run.py")))


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="every run.py at its CI size")
  ap.add_argument("--only", default=None,
                  help=f"comma-separated experiment names (of: {', '.join(EXPERIMENTS)})")
  ap.add_argument("--workdir", default=os.path.join("runs", "experiments"),
                  help="root of the output folders ROOT/<name> (default runs/experiments)")
  ap.add_argument("--publish", action="store_true",
                  help="copy the results into experiments/<name>/ (full size only)")
  ap.add_argument("--timeout", type=float, default=0.0,
                  help="seconds after which one experiment is stopped and counted as failed "
                       "(0: no limit)")
  args = ap.parse_args(argv)
  names = list(EXPERIMENTS)
  if args.only is not None:
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if not names or unknown:
      raise ValueError(f"--only: unknown experiment {(unknown or [args.only])[0]!r}; "
                       f"known: {', '.join(EXPERIMENTS)}")
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise ValueError(f"--workdir {args.workdir} is not a directory")
  if not args.timeout >= 0 or args.timeout == float("inf"):
    raise ValueError(f"--timeout must be a finite number of seconds >= 0, got {args.timeout}")
  if args.publish and args.quick:
    raise ValueError("--publish copies full-size results into the repository; drop --quick")
  missing = [n for n in names if not os.path.isfile(os.path.join(HERE, n, "run.py"))]
  if missing:
    raise ValueError(f"experiments/{missing[0]}/run.py does not exist in this checkout")
  return args, names


def command(name: str, workdir: str, quick: bool, publish: bool) -> list[str]:
  spec = EXPERIMENTS[name]
  cmd = [sys.executable, os.path.join(HERE, name, "run.py"), "--workdir", workdir]
  if quick and spec["quick"]:
    cmd.append("--quick")
  if publish and spec["harness"]:
    cmd += ["--publish", os.path.join(HERE, name)]
  return cmd


def run_one(cmd: list[str], env: dict, timeout: float) -> int:
  """Runs ``cmd`` in its own process group; past ``timeout`` seconds (> 0) the group is killed
  and the exit status is 124 (as ``timeout(1)``)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
  try:
    return proc.wait(timeout=timeout or None)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"stopped after {timeout:.0f} s (--timeout)", flush=True)
    return 124
  except KeyboardInterrupt:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    raise


def publish_figures(name: str, workdir: str) -> None:
  """The figures of an experiment not built on the harness, into ``experiments/<name>/figures``."""
  src = os.path.join(workdir, "figures")
  if os.path.isdir(src):
    shutil.copytree(src, os.path.join(HERE, name, "figures"), dirs_exist_ok=True)


def main(argv=None) -> int:
  try:
    args, names = parse(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  results = []
  for name in names:
    wd = os.path.join(args.workdir, name)
    os.makedirs(wd, exist_ok=True)
    cmd = command(name, wd, args.quick, args.publish)
    print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = run_one(cmd, env, args.timeout)
    seconds = time.perf_counter() - t0
    if rc == 0 and args.publish and not EXPERIMENTS[name]["harness"]:
      publish_figures(name, wd)
    results.append((name, rc, seconds))
    print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s",
          flush=True)
  total = sum(s for _, _, s in results)
  print(f"\n| experiment | status | wall s |\n|---|---|---|")
  for name, rc, seconds in results:
    print(f"| {name} | {'ok' if rc == 0 else f'failed ({rc})'} | {seconds:.0f} |")
  print(f"| total | {sum(rc == 0 for _, rc, _ in results)}/{len(results)} ok | {total:.0f} |")
  return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
  sys.exit(main())
