import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Accelerators default to reduced-precision float32 matrix products (TF32 on NVIDIA GPUs, bf16
# passes on TPUs); the tests compare against float64 references at float32 tolerances.
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# run.py enables XLA's persistent compilation cache (mesajax/compile_cache.py); the CLI tests'
# subprocesses share one per test process here instead of writing to the user's home.
import tempfile  # noqa: E402

os.environ.setdefault("MESAJAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="mesajax-jax-cache-"))
