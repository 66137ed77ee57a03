"""The project's benchmark: compile time, outer steps/s, inner steps/s and peak memory.

  python -m mesajax.bench --config configs/lopt_reference.py [--config.key=value ...]
      [--steps 100] [--repeats 3] [--out FILE]
  python -m mesajax.bench --sweep [--config ...] [--sweep_tasks 32,128,512,4096]
      [--sweep_seeds 1,4,16] [--sweep_devices 1,2,4,8] [--steps 3] [--out docs/sweep.md]

Builds the config's ``MetaTrainer`` and times its jitted outer step: ``compile_s`` is lowering plus
compilation of the one program; then ``repeats`` blocks of ``steps`` outer steps are timed (the host
syncs once per block) and medians reported. Inner steps/s counts every inner step of every unroll
(both antithetic branches for ES/PES), i.e. ``tasks × unroll_length × branches × outer steps/s``,
the same accounting as learned_optimization's benchmarks (docs/performance.md). Prints one JSON
object and writes it to ``--out`` (default ``runs/bench/<name>-<estimator>-<tasks>t-<dim>.json``).

``--sweep`` runs a scaling sweep of the same benchmark (default config: configs/lopt_reference.py):
every cell of tasks x seeds x devices (seeds only where the config has ``meta.num_seeds``;
devices up to ``jax.device_count()`` that divide the task count) compiles once and times
``--steps`` outer steps (default 3 for the sweep) once, so the CPU sweep takes minutes. It writes a
markdown table to ``--out`` (default ``runs/bench/sweep.md``) and the JSON rows next to it
(``.json``), both rewritten after every cell. A cell that fails (e.g. out of memory) becomes a
row with its one-line error.

``--analysis`` times the whole analysis suite (``mesajax.analysis.suite.run_analyses``: every stage,
the untrained-optimizer null, the controls, the paired rows) on image-MLP tasks of growing size:

  python -m mesajax.bench --analysis [--config configs/image_mlp.py]
      [--analysis_sizes 8x13,16x37,28x128] [--config.analysis.num_tasks=8 ...] [--out FILE.md]

Each size ``IMAGExWIDTH`` (8x13: 985 parameters, 16x37: 9,889, 28x128: 101,770) sets
``task.kwargs.image_size`` and ``width``; the learned optimizer is the config's, *untrained*
(φ = ``MetaTrainer(config).initial_phi()``; the null φ is drawn from the next seed so the null pass
costs what it costs after training). Only the ``heldout`` split is analysed. Per size: total wall
time (compilation included), the time of each stage (summed over the analysed optimizers), the
number of rows and of rows left ``undefined`` with their reasons; then the growth exponent
log(t₂/t₁)/log(n₂/n₁) between consecutive sizes. Writes a markdown table to ``--out`` (default
``runs/bench/analysis.md``) and the JSON rows next to it.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import jax


def _peak_memory_mb() -> dict:
  out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  except Exception:
    pass
  return out


def time_step(step, state, steps: int, repeats: int):
  """Times a jitted, state-donating ``step(state) -> (state, out)``: ``compile_s`` (lowering plus
  compilation), then one warm-up call and ``repeats`` blocks of ``steps`` calls, the host syncing
  once per block. Returns ``(compile_s, steps_per_s of each block, final state, last out)``."""
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  compiled = step.lower(state).compile()
  compile_s = time.perf_counter() - t0
  state, out = compiled(state)  # warm-up
  jax.block_until_ready(state)
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, out = compiled(state)
    jax.block_until_ready((state, out))
    rates.append(steps / (time.perf_counter() - t0))
  return compile_s, rates, state, out


def benchmark(config, steps: int = 100, repeats: int = 3) -> dict:
  from mesajax.meta.outer import MetaTrainer
  trainer = MetaTrainer(config)
  state = trainer.init()
  compile_s, rates, state, metrics = time_step(trainer.step, state, steps, repeats)
  outer = statistics.median(rates)
  inner_per_outer = trainer.inner_steps_per_outer_step()
  c = config
  return {
      "config": c.name, "estimator": c.meta.estimator, "num_tasks": c.meta.num_tasks,
      "unroll_length": c.meta.unroll_length, "horizon": c.meta.horizon,
      "task": c.task.name, "dim": c.task.kwargs.to_dict().get("dim"),
      "optimizer": c.optimizer.name, "inner_dtype": c.meta.inner_dtype,
      "num_meta_params": sum(x.size for x in jax.tree.leaves(state.phi)),
      "num_devices": c.meta.num_devices, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
      "compile_s": compile_s, "outer_steps_per_s": outer,
      "outer_steps_per_s_all": rates, "inner_steps_per_s": outer * inner_per_outer,
      "inner_steps_per_outer_step": inner_per_outer, "timed_steps": steps, "repeats": repeats,
      "final_meta_loss": float(jax.numpy.mean(metrics["meta_loss"])), **_peak_memory_mb(),
  }


SWEEP_TASKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SWEEP_SEEDS = (1, 4, 16)
TABLE_COLUMNS = (("num_tasks", "tasks"), ("num_seeds", "seeds"), ("num_devices", "devices"),
                 ("estimator", "estimator"), ("compile_s", "compile s"),
                 ("outer_steps_per_s", "outer steps/s"), ("inner_steps_per_s", "inner steps/s"),
                 ("host_peak_rss_mb", "host peak MB"), ("device_peak_mb", "device peak MB"))


def _ints(text: str | None, default) -> tuple[int, ...]:
  if not text:
    return tuple(default)
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"expected comma-separated integers, got {text!r}") from None
  if any(v < 1 for v in values):
    raise ValueError(f"expected positive integers, got {text!r}")
  return values


def sweep_cells(config, tasks, seeds=None, devices=None) -> list[dict]:
  """The sweep's cells: dicts of ``meta`` overrides (``num_tasks``, ``num_devices`` and, where the
  config has ``meta.num_seeds``, ``num_seeds``)."""
  available = jax.device_count()
  if devices is None:
    devices = tuple(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= available)
  too_many = [d for d in devices if d > available]
  if too_many:
    raise ValueError(f"--sweep_devices {too_many} but {available} device(s) are available")
  has_seeds = "num_seeds" in config.meta
  seed_values = (seeds or SWEEP_SEEDS) if has_seeds else (None,)
  cells = []
  for n in tasks:
    for s in seed_values:
      for d in devices:
        if n % d:
          continue
        cell = {"num_tasks": n, "num_devices": d}
        if s is not None:
          cell["num_seeds"] = s
        cells.append(cell)
  return cells


def markdown_table(rows: list[dict]) -> str:
  def fmt(v):
    if v is None:
      return ""
    if isinstance(v, float):
      return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)

  lines = ["| " + " | ".join(h for _, h in TABLE_COLUMNS) + " | note |",
           "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in TABLE_COLUMNS)
                 + f" | {r.get('error', '')} |")
  return "\n".join(lines) + "\n"


def _write_sweep(config, rows, first, steps, out):
  title = (f"Sweep of `{config.name}` ({config.meta.estimator}, task {config.task.name}, "
           f"unroll {config.meta.unroll_length}, {first.get('num_meta_params', '?')} meta-params) "
           f"on {first.get('backend', jax.default_backend())} "
           f"({first.get('device_kind', jax.devices()[0].device_kind)}), jax {jax.__version__}, "
           f"{steps} timed outer steps per cell.\n\n")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    f.write(title + markdown_table(rows))
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(rows, f, indent=2)


def run_sweep(config, cells, steps: int = 3, out: str = "runs/bench/sweep.md",
              log=print) -> list[dict]:
  """Benchmarks every cell (``steps`` timed outer steps, one repeat) and writes the table."""
  import ml_collections
  from mesajax.config import resolve
  rows = []
  first = None
  for cell in cells:
    c = ml_collections.ConfigDict(config.to_dict())
    for k, v in cell.items():
      c.meta[k] = v
    try:
      row = benchmark(resolve(c), steps=steps, repeats=1)
      row.setdefault("num_seeds", cell.get("num_seeds"))
    except Exception as e:  # noqa: BLE001 - one cell failing (e.g. memory) must not end the sweep
      row = {**cell, "estimator": c.meta.estimator,
             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    rows.append(row)
    first = first or row
    log(json.dumps(row))
    _write_sweep(config, rows, first, steps, out)  # after every cell: a cut-short sweep keeps them
  return rows


ANALYSIS_SIZES = ("8x13", "16x37", "28x128")


def _sizes(text: str | None) -> tuple[tuple[int, int], ...]:
  out = []
  for item in (text.split(",") if text else ANALYSIS_SIZES):
    try:
      a, b = (int(x) for x in item.lower().split("x"))
    except ValueError:
      raise ValueError(f"--analysis_sizes: expected IMAGExWIDTH items like 28x128, got {item!r}") \
          from None
    if a < 2 or b < 1:
      raise ValueError(f"--analysis_sizes: image size >= 2 and width >= 1, got {item!r}")
    out.append((a, b))
  return tuple(out)


def _cpu_s() -> float:
  """User + system CPU seconds of this process (all its threads): under contention from other
  jobs it is the robust measure; on an idle machine wall time is this divided by the cores used."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def analysis_benchmark(config, image_size: int, width: int) -> dict:
  """Times ``run_analyses`` once (compilation included) on one image-MLP size; see the module
  docstring."""
  import ml_collections
  import numpy as np

  from mesajax.analysis.suite import run_analyses
  from mesajax.config import resolve
  from mesajax.meta.outer import MetaTrainer
  from mesajax.splits import make_splits
  c = ml_collections.ConfigDict(config.to_dict())
  c.task.kwargs.image_size = image_size
  c.task.kwargs.width = width
  # Only the analysis runs here: shrink the evaluation / meta-training sizes so that resolve's
  # memory estimates for those stages do not reject a large network.
  c.eval.num_tasks, c.eval.num_tuning_tasks, c.meta.num_tasks = 2, 2, 2
  c.shifts = ml_collections.ConfigDict()
  c = resolve(c)
  trainer = MetaTrainer(c)
  phi = trainer.initial_phi()
  c_null = ml_collections.ConfigDict(c.to_dict())
  c_null.seed = int(c.seed) + 1
  phi0 = MetaTrainer(resolve(c_null)).initial_phi()
  if int(c.meta.num_seeds) > 1:
    phi, phi0 = (jax.tree.map(lambda x: x[0], t) for t in (phi, phi0))
  splits = make_splits(c, ["heldout"])
  n = splits["heldout"].family.num_params()
  timings: dict = {}
  cpu0 = _cpu_s()
  t0 = time.perf_counter()
  rows = run_analyses(trainer.opt, phi, c.name, splits, c.analysis, int(c.seed), timings=timings,
                      null_phi=phi0)
  total = time.perf_counter() - t0
  cpu = _cpu_s() - cpu0
  stages: dict = {}
  for key, v in timings.items():
    stage = key.split("/")[-1]
    stages[stage] = stages.get(stage, 0.0) + v
  undefined = {}
  for r in rows:
    if r.get("undefined") and r.get("role") == "analysed":
      undefined.setdefault(r["undefined"], []).append(f"{r['analysis']}/{r['metric']}")
  a = c.analysis
  return {"image_size": image_size, "width": width, "num_params": int(n), "total_s": total,
          "cpu_s": cpu,
          "stages_s": {k: round(v, 2) for k, v in sorted(stages.items())},
          "rows": len(rows), "undefined_rows": int(sum(1 for r in rows if r.get("undefined"))),
          "undefined_analysed": undefined,
          "knobs": {k: a[k] for k in ("num_tasks", "num_steps", "num_points", "num_probes",
                                      "num_sens_probes", "num_perms", "n_boot", "dense_max",
                                      "qs_max_state") if k in a},
          "optimizer": c.optimizer.name, "phi": "untrained (initial_phi)",
          "host_peak_rss_mb": _peak_memory_mb()["host_peak_rss_mb"],
          "backend": jax.default_backend(), "jax": jax.__version__,
          "load_avg_1m": float(os.getloadavg()[0]), "cpu_count": os.cpu_count(),
          "numpy": np.__version__}


def analysis_table(rows: list[dict]) -> str:
  """Markdown: one line per size with its wall time, the slowest stages and the growth exponent."""
  import numpy as np
  lines = ["| params | wall s | CPU s | growth exponent (wall / CPU) | slowest stages (wall s) | "
           "rows (undefined) | load |", "|---|---|---|---|---|---|---|"]
  prev = None
  for r in rows:
    if "error" in r:
      lines.append(f"| {r.get('num_params', '')} | | | {r['error']} | | |")
      continue
    expo = ""
    if prev is not None:
      growth = lambda k: np.log(r[k] / prev[k]) / np.log(r["num_params"] / prev["num_params"])
      expo = f"{growth('total_s'):.2f} / {growth('cpu_s'):.2f}"
    top = sorted(r["stages_s"].items(), key=lambda kv: -kv[1])[:4]
    lines.append(f"| {r['num_params']:,} | {r['total_s']:.0f} | {r['cpu_s']:.0f} | {expo} | "
                 + ", ".join(f"{k} {v:.0f}" for k, v in top)
                 + f" | {r['rows']} ({r['undefined_rows']}) | {r['load_avg_1m']:.1f} |")
    prev = r
  return "\n".join(lines) + "\n"


def run_analysis_bench(config, sizes, out: str, log=print) -> list[dict]:
  rows = []
  for image_size, width in sizes:
    try:
      row = analysis_benchmark(config, image_size, width)
    except Exception as e:  # noqa: BLE001 - one size failing (e.g. memory) must not end the bench
      row = {"image_size": image_size, "width": width,
             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    rows.append(row)
    log(json.dumps(row))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      f.write(analysis_table(rows))
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def main(argv):
  from absl import flags

  from mesajax import allocator
  allocator.keep_freed_memory()  # as run.py (mesajax/allocator.py)

  from mesajax.config import load, resolve
  flags.DEFINE_string("config", None, "configs/NAME.py[:arg] (--config.KEY=VALUE overrides apply)")
  flags.DEFINE_integer("steps", 100, "timed outer steps per repeat")
  flags.DEFINE_integer("repeats", 3, "timed repeats (the median is reported)")
  flags.DEFINE_string("out", None, "JSON output path (--sweep: the markdown table's path)")
  flags.DEFINE_bool("sweep", False, "run the scaling sweep (tasks x seeds x devices)")
  flags.DEFINE_string("sweep_tasks", None, "comma-separated task counts (default 32,64,...,4096)")
  flags.DEFINE_string("sweep_seeds", None, "comma-separated seed counts (default 1,4,16)")
  flags.DEFINE_bool("analysis", False, "time the whole analysis suite on image-MLP sizes")
  flags.DEFINE_string("analysis_sizes", None, "comma-separated IMAGExWIDTH image-MLP sizes "
                      "(default 8x13,16x37,28x128: about 1e3, 1e4, 1e5 parameters)")
  flags.DEFINE_string("sweep_devices", None, "comma-separated device counts (default: 1, 2, 4, "
                      "... up to the devices available)")
  FLAGS = flags.FLAGS
  # --config.KEY=VALUE overrides go to mesajax.config.load (the same loader as run.py).
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  try:
    FLAGS([a for a in argv if not a.startswith("--config.")])
    if FLAGS.config is None and not (FLAGS.sweep or FLAGS.analysis):
      raise ValueError("--config is required")
    if FLAGS.sweep and FLAGS.analysis:
      raise ValueError("--sweep and --analysis are separate benchmarks; pass one")
    default = "image_mlp.py" if FLAGS.analysis else "lopt_reference.py"
    spec = FLAGS.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "configs", default)
    sizes = _sizes(FLAGS.analysis_sizes) if FLAGS.analysis else None
    config = resolve(load(spec, overrides))
    if FLAGS.sweep:
      cells = sweep_cells(config, _ints(FLAGS.sweep_tasks, SWEEP_TASKS),
                          _ints(FLAGS.sweep_seeds, SWEEP_SEEDS),
                          _ints(FLAGS.sweep_devices, ()) or None)
      if not cells:
        raise ValueError("the sweep has no cells (no task count divisible by a device count)")
  except (flags.Error, ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.analysis:
    out = FLAGS.out or os.path.join("runs", "bench", "analysis.md")
    run_analysis_bench(config, sizes, out)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json")
    return
  if FLAGS.sweep:
    steps = FLAGS.steps if FLAGS["steps"].present else 3
    out = FLAGS.out or os.path.join("runs", "bench", "sweep.md")
    run_sweep(config, cells, steps=steps, out=out)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json")
    return
  result = benchmark(config, FLAGS.steps, FLAGS.repeats)
  out = FLAGS.out or os.path.join(
      "runs", "bench", f"{config.name}-{config.meta.estimator}-{config.meta.num_tasks}t-"
      f"d{result['dim']}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
