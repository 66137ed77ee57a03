"""mesajax command line: a thin layer over ``mesajax.pipeline``.

  python run.py                                   # the quickstart: train, evaluate, analyse, report
  python run.py --config configs/NAME.py --workdir DIR [--config.key=value ...]
  python run.py train|evaluate|analyze|report --workdir DIR [--checkpoint STEP]
  python run.py analyze --config configs/NAME.py --optimizer adam --workdir DIR

User mistakes (unknown config keys, out-of-range values, unknown names, missing checkpoints, a
work directory holding another config's run) print one line ``error: ...`` and exit with status 2
before anything compiles.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = ("all", "train", "evaluate", "analyze", "report")

config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.DEFINE_integer("checkpoint", None, "Checkpoint step to evaluate/analyse (default: latest).")
flags.DEFINE_string("optimizer", None, "analyze: a hand-designed optimizer (sgd, sgdm, adam, ...) "
                    "to analyse on --config's task family instead of a learned one.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def fail(msg: str) -> "NoReturn":
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv):
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(path, argv):
  """The first ``--config.a.b=v`` whose key the config file does not define, if any."""
  import importlib.util
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_mesajax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      node = config
      for part in a[len("--config."):].split("=", 1)[0].split("."):
        if not hasattr(node, "keys") or part not in node.keys():
          return a.split("=", 1)[0][len("--config."):]
        node = node[part]
  return None


def parse(argv):
  path = _config_path(argv[1:])
  if path is None:
    path = os.path.join(HERE, "configs", "quickstart.py")
    argv = argv[:1] + [f"--config={path}"] + argv[1:]
  if not os.path.isfile(path.split(":")[0]):
    fail(f"config file {path.split(':')[0]} does not exist")
  try:
    rest = FLAGS(argv)
    FLAGS.config  # the config module is loaded lazily: force it (and its overrides) now
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its own last line (e.g. "ValueError: ...") says what is wrong.
    fail(f"{lines[0]} {lines[-1]}" if "Traceback" in str(e) else " ".join(lines)[:500])
  except Exception as e:  # a bad override, a config file that fails to import, no get_config()
    try:
      unknown = _unknown_override(path, argv)
    except Exception:
      unknown = None
    if unknown:
      fail(f"unknown config key {unknown!r} (not defined in {path})")
    fail(f"cannot load config {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  command = rest[1] if len(rest) > 1 else "all"
  if command not in COMMANDS or len(rest) > 2:
    fail(f"unknown command {' '.join(rest[1:])!r}; commands: {', '.join(COMMANDS)}")
  return command


def main(argv):
  command = parse(argv)
  from mesajax import pipeline  # heavy imports after the flags are known to be good
  from mesajax.config import resolve
  config_given = _config_path(argv[1:]) is not None
  try:
    if command in ("all", "train") or (command == "analyze" and FLAGS.optimizer):
      config = resolve(FLAGS.config)
      workdir = FLAGS.workdir or os.path.join("runs", config.name)
      if command == "all":
        pipeline.run_all(config, workdir, progress=FLAGS.progress)
      elif command == "train":
        pipeline.train(config, workdir, progress=FLAGS.progress)
      else:
        pipeline.analyze(workdir, config=config, optimizer=FLAGS.optimizer)
        print(f"report: {pipeline.report(workdir)}")
      return
    if not FLAGS.workdir:
      fail(f"`{command}` needs --workdir DIR (a run directory)")
    if config_given and command != "analyze":
      fail(f"`{command}` reads the config from --workdir; drop --config")
    if not os.path.isdir(FLAGS.workdir):
      fail(f"--workdir {FLAGS.workdir} does not exist")
    if command == "evaluate":
      pipeline.evaluate(FLAGS.workdir, FLAGS.checkpoint)
    elif command == "analyze":
      pipeline.analyze(FLAGS.workdir, FLAGS.checkpoint)
    print(f"report: {pipeline.report(FLAGS.workdir)}")
  except ValueError as e:
    fail(str(e).splitlines()[0] if str(e) else "invalid input")
  except KeyboardInterrupt:
    print("interrupted (the latest state was checkpointed; rerun the same command to resume)",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The checkpoint is on disk (saved synchronously). Skip interpreter teardown: tearing down
    # jax/orbax background threads after an interrupt can crash the process (seen: SIGSEGV).
    os._exit(130)


if __name__ == "__main__":
  main(sys.argv)
