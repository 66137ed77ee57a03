"""The project's benchmark: compile time, outer steps/s, inner steps/s and peak memory.

  python -m mesajax.bench --config configs/lopt_reference.py [--config.key=value ...]
      [--steps 100] [--repeats 3] [--out FILE]

Builds the config's ``MetaTrainer`` and times its jitted outer step: ``compile_s`` is lowering plus
compilation of the one program; then ``repeats`` blocks of ``steps`` outer steps are timed (the host
syncs once per block) and medians reported. Inner steps/s counts every inner step of every unroll
(both antithetic branches for ES/PES), i.e. ``tasks × unroll_length × branches × outer steps/s``,
the same accounting as ../shared/notes/performance.md. Prints one JSON object and writes it to
``--out`` (default ``runs/bench/<name>-<estimator>-<tasks>t-<dim>.json``).
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


def benchmark(config, steps: int = 100, repeats: int = 3) -> dict:
  from mesajax.meta.outer import MetaTrainer
  trainer = MetaTrainer(config)
  state = trainer.init()
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  compiled = trainer.step.lower(state).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state)  # warm-up
  jax.block_until_ready(state)
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state)
    jax.block_until_ready((state, metrics))
    rates.append(steps / (time.perf_counter() - t0))
  outer = statistics.median(rates)
  inner_per_outer = trainer.inner_steps_per_outer_step()
  c = config
  return {
      "config": c.name, "estimator": c.meta.estimator, "num_tasks": c.meta.num_tasks,
      "unroll_length": c.meta.unroll_length, "horizon": c.meta.horizon,
      "task": c.task.name, "dim": c.task.kwargs.to_dict().get("dim"),
      "optimizer": c.optimizer.name,
      "num_meta_params": sum(x.size for x in jax.tree.leaves(state.phi)),
      "num_devices": c.meta.num_devices, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
      "compile_s": compile_s, "outer_steps_per_s": outer,
      "outer_steps_per_s_all": rates, "inner_steps_per_s": outer * inner_per_outer,
      "inner_steps_per_outer_step": inner_per_outer, "timed_steps": steps, "repeats": repeats,
      "final_meta_loss": float(jax.numpy.mean(metrics["meta_loss"])), **_peak_memory_mb(),
  }


def main(argv):
  from absl import flags
  from ml_collections import config_flags

  from mesajax.config import resolve
  config_flags.DEFINE_config_file("config", None, "configs/NAME.py", lock_config=True)
  flags.DEFINE_integer("steps", 100, "timed outer steps per repeat")
  flags.DEFINE_integer("repeats", 3, "timed repeats (the median is reported)")
  flags.DEFINE_string("out", None, "JSON output path")
  FLAGS = flags.FLAGS
  try:
    FLAGS(argv)
    if FLAGS.config is None:
      raise ValueError("--config is required")
    config = resolve(FLAGS.config)
  except (flags.Error, ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
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
