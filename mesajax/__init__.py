"""mesajax: learned optimizers as mesa-optimizers.

Meta-train learned optimizers on task distributions, then measure what objective they implicitly
optimise and whether it matches the outer objective.
"""
from mesajax.registry import make_optimizer, make_task_family  # noqa: F401

__version__ = "0.1.0"
