"""mesajax/allocator.py: freed host memory is kept and reused (no page faults on reuse)."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
  from mesajax import allocator
  print(allocator.keep_freed_memory(), allocator.keep_freed_memory())
x = np.ones(2 ** 23); del x                        # 64 MB, allocated and freed once
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = np.ones(2 ** 23); del x                        # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(mode, **env):
  out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                       text=True, check=True, env={**os.environ, **env})
  return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_freed_memory_is_reused_without_page_faults():
  # glibc's default returns a 64 MB block to the system on free (mmap / munmap): touching the
  # next one faults again (measured: 500+ faults). Kept, the second block reuses the first.
  assert int(_probe("default")[0]) > 100
  applied, again, faults = _probe("keep")
  assert (applied, again) == ("True", "True")
  assert int(faults) < 50
  # MESAJAX_MALLOC=default leaves glibc's behaviour alone.
  off = _probe("keep", MESAJAX_MALLOC="default")
  assert off[:2] == ["False", "False"] and int(off[2]) > 100
