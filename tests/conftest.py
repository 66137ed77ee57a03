import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Accelerators default to reduced-precision float32 matrix products (TF32 on NVIDIA GPUs, bf16
# passes on TPUs); the tests compare against float64 references at float32 tolerances.
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# XLA's persistent compilation cache (mesajax/compile_cache.py, what run.py uses), one per test
# session, shared by the pytest-xdist workers, the tests themselves and the CLI tests'
# subprocesses, instead of the user's home: many tests build the same smoke-size programs, and a
# program is served from the cache only when its XLA text (and jax version, backend) is identical.
# Tracing, lowering and every jit's in-memory cache (which the compile-once tests count) are
# untouched. The pytest-xdist workers inherit the controlling process's environment, so they find
# its directory here; the controller removes it at the end.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_made_cache = None
if "MESAJAX_COMPILE_CACHE" not in os.environ:
  _made_cache = tempfile.mkdtemp(prefix="mesajax-jax-cache-")
  os.environ["MESAJAX_COMPILE_CACHE"] = _made_cache
from mesajax import compile_cache  # noqa: E402

compile_cache.enable()
# As run.py: freed host buffers are kept and reused instead of page-faulted back in (allocator.py).
from mesajax import allocator  # noqa: E402

allocator.keep_freed_memory()


def pytest_unconfigure(config):
  if _made_cache is not None:
    shutil.rmtree(_made_cache, ignore_errors=True)


# The longest tests (idle 2-core CPU, `pytest -n 2 --durations=30`: 20–120 s each, most of it XLA
# compilation) start first: pytest-xdist hands tests out in collection order, and a two-minute
# test picked up last leaves the other worker idle for its whole length. Order only: every test
# still runs (and alone, `pytest tests/test_x.py`, in file order).
LONGEST_FIRST = (
    "test_smoke_main_job_end_to_end", "test_end_to_end_through_run_py",
    "test_icl_run_through_run_py", "test_population_members_are_the_single_seed_runs",
    "test_resume_gives_identical_phi", "test_pes_unbiased_across_truncations_tbptt_not",
    "test_rmsprop_implicit_jacobian_matches_finite_differences",
    "test_two_processes_match_one_device", "test_family_smoke", "test_outer_step_compiles_once",
    "test_member_with_zero_meta_gradient_is_flagged",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  key = lambda it: rank.get(getattr(it, "originalname", None) or it.name, len(rank))
  items[:] = sorted(items, key=key)  # stable: the rest keep their order
