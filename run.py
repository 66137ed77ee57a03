"""mesajax command line: a thin layer over ``mesajax.pipeline``.

  python run.py                                   # the quickstart: train, evaluate, analyse, report
  python run.py --config configs/NAME.py[:smoke] --workdir DIR [--config.key=value ...]
  python run.py train|evaluate|analyze|report --workdir DIR [--checkpoint STEP]
  python run.py analyze --config configs/NAME.py --optimizer adam --workdir DIR

``--config.KEY=VALUE`` values are Python literals (strings otherwise); ``None``, ``nan``, ``inf``,
``true``/``false`` are understood and then validated (``mesajax.config.load`` / ``resolve``).
``--config.task.name=NAME`` (or ``optimizer.name``) brings that entry's own defaults.

``--checkpoint STEP``: ``train`` (and the default ``all``) resumes from STEP (later checkpoint
steps and metrics/result rows are set aside under DIR/set_aside/); ``evaluate``/``analyze`` use
STEP instead of the latest usable checkpoint.

Exit status: 0 done; 2 a user mistake (unknown keys, out-of-range or non-finite values, sizes that
cannot fit in memory, unknown names, a bad --workdir or config file, missing or corrupt
checkpoints, a run directory holding another config's run or locked by another process), printed
as one line ``error: ...`` before anything compiles or is written; 1 a refused non-finite
checkpoint or an unexpected failure; 130 / 143 after SIGINT / SIGTERM (the latest finished step
is checkpointed; rerun the same command to resume). See docs/reliability.md.
"""
import os
import sys

from mesajax import interrupt

interrupt.install()  # first: SIGINT/SIGTERM are handled the same way from here on

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = ("all", "train", "evaluate", "analyze", "report")
USAGE = __doc__.split("\n\n")[1]


def _exit(code: int) -> "NoReturn":
  # Flush, then skip interpreter teardown: tearing down jax/orbax threads can print tracebacks
  # or crash (seen: SIGSEGV after an interrupt, orbax noise after a corrupt checkpoint).
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(code)


def fail(msg: str, code: int = 2) -> "NoReturn":
  msg = " ".join(str(msg).split()) or "invalid input"
  print(f"error: {msg[:2000]}", file=sys.stderr)
  _exit(code)


class Args:
  config = None
  overrides = ()
  workdir = None
  checkpoint = None
  optimizer = None
  progress = True
  command = "all"


def parse(argv) -> Args:
  a, overrides, rest = Args(), [], []
  i = 1

  def value(i, name):
    if i + 1 >= len(argv):
      fail(f"{name} needs a value")
    return argv[i + 1]

  while i < len(argv):
    arg = argv[i]
    if arg in ("-h", "--help", "-help", "--helpfull"):
      try:
        print(__doc__)
      except BrokenPipeError:
        pass
      _exit(0)
    if arg.startswith("--config."):
      if "=" not in arg:
        fail(f"{arg} needs a value: {arg}=VALUE")
      overrides.append(arg[len("--config."):])
    elif arg == "--config" or arg.startswith("--config="):
      a.config = arg.split("=", 1)[1] if "=" in arg else value(i, "--config")
      i += "=" not in arg
    elif arg in ("--workdir", "--checkpoint", "--optimizer") or arg.split("=", 1)[0] in (
        "--workdir", "--checkpoint", "--optimizer"):
      name = arg.split("=", 1)[0]
      v = arg.split("=", 1)[1] if "=" in arg else value(i, name)
      i += "=" not in arg
      setattr(a, name[2:], v)
    elif arg in ("--progress", "--noprogress", "--progress=true", "--progress=false"):
      a.progress = arg in ("--progress", "--progress=true")
    elif arg.startswith("-"):
      fail(f"unknown flag {arg}; flags: --config, --config.KEY=VALUE, --workdir, --checkpoint, "
           f"--optimizer, --[no]progress")
    else:
      rest.append(arg)
    i += 1
  a.overrides = overrides
  if rest:
    if rest[0] not in COMMANDS or len(rest) > 1:
      fail(f"unknown command {' '.join(rest)!r}; commands: {', '.join(COMMANDS)}")
    a.command = rest[0]
  if a.checkpoint is not None:
    try:
      a.checkpoint = int(a.checkpoint)
      if a.checkpoint < 0:
        raise ValueError
    except ValueError:
      fail(f"--checkpoint must be a step number (an integer >= 0), got {a.checkpoint!r}")
  if a.workdir is not None and not a.workdir.strip():
    fail("--workdir must not be empty")
  if a.optimizer is not None and a.command != "analyze":
    fail("--optimizer is only for `analyze` (a hand-designed optimizer on --config's family)")
  if overrides and a.config is None and a.command in ("evaluate", "analyze", "report"):
    fail(f"`{a.command}` reads the config from --workdir; drop the --config.* overrides")
  return a


def main(argv):
  a = parse(argv)
  from mesajax import allocator, checkpoint, lock
  allocator.keep_freed_memory()  # freed host buffers reused, not page-faulted back in
  from mesajax.config import load, resolve
  from mesajax import compile_cache, distributed, pipeline, rundir
  needs_config = a.command in ("all", "train") or (a.command == "analyze" and a.optimizer)
  try:
    if needs_config:
      spec = a.config or os.path.join(HERE, "configs", "quickstart.py")
      config = load(spec, a.overrides)
      # Multi-process runs (docs/distributed.md): before any other jax call.
      nproc = distributed.initialize(config)
      if nproc > 1 and a.command != "train":
        fail("a multi-process run (config.distributed) is for `train`; evaluate, analyze and "
             "report afterwards in one process with --workdir")
      config = resolve(config)  # every check; nothing written yet
      if nproc <= 1:  # one process: XLA's persistent cache (mesajax/compile_cache.py)
        compile_cache.enable()
      workdir = a.workdir or os.path.join("runs", config.name)
      rundir.check_workdir(workdir)
      if a.command == "all":
        pipeline.run_all(config, workdir, progress=a.progress, checkpoint_step=a.checkpoint)
      elif a.command == "train":
        pipeline.train(config, workdir, progress=a.progress, checkpoint_step=a.checkpoint)
      else:
        pipeline.analyze(workdir, config=config, optimizer=a.optimizer)
        print(f"report: {pipeline.report(workdir)}")
      _exit(0)
    if not a.workdir:
      fail(f"`{a.command}` needs --workdir DIR (a run directory)")
    if a.config is not None and a.command != "analyze":
      fail(f"`{a.command}` reads the config from --workdir; drop --config")
    if a.config is not None:
      fail("`analyze --config` needs --optimizer NAME (a hand-designed optimizer); to analyse "
           "a trained run give only --workdir")
    if not os.path.exists(a.workdir):
      fail(f"--workdir {a.workdir} does not exist")
    if not os.path.isdir(a.workdir):
      fail(f"--workdir {a.workdir} is not a directory")
    if a.command in ("evaluate", "analyze"):
      pipeline.load_run_config(a.workdir)
      compile_cache.enable()
      if a.checkpoint is None and not checkpoint.all_steps(a.workdir):
        fail(f"{a.workdir} has no checkpoint yet; train first")
    if a.command == "evaluate":
      pipeline.evaluate(a.workdir, a.checkpoint)
    elif a.command == "analyze":
      pipeline.analyze(a.workdir, a.checkpoint)
    print(f"report: {pipeline.report(a.workdir)}")
    _exit(0)
  except interrupt.Interrupted as e:
    print(str(e), file=sys.stderr)
    _exit(e.exit_code)
  except checkpoint.NonFiniteState as e:
    fail(str(e), code=1)
  except (ValueError, lock.Locked) as e:
    fail(str(e).splitlines()[0] if str(e) else "invalid input")
  except OSError as e:
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    fail(f"{e.strerror or type(e).__name__}{where}")
  except MemoryError:
    fail("out of memory (reduce the sizes in the config)", code=1)
  except KeyboardInterrupt:  # a SIGINT before the handlers were installed
    print("interrupted", file=sys.stderr)
    _exit(130)
  except Exception as e:  # an unexpected failure: the traceback is for the developer
    import traceback
    traceback.print_exc()
    print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
          file=sys.stderr)
    _exit(1)


if __name__ == "__main__":
  try:
    main(sys.argv)
  except interrupt.Interrupted as e:  # during imports or parsing
    print(str(e), file=sys.stderr)
    _exit(e.exit_code)
