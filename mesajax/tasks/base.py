"""The task-family interface.

A *task family* is a distribution over inner problems. Everything is a pure function of pytrees, so a
family can be vmapped over tasks and jitted: ``sample(key) -> task`` returns a pytree holding the
task's parameters and data; ``init(key, task) -> params`` an initial point; the losses take
``(params, task[, key])``. Minibatches are drawn inside jit from the task's own data with ``key``:
there is no Python data loader in the hot path.

Families are frozen dataclasses whose fields are the *knobs* (dimension, conditioning, noise, ...).
A shifted family is ``family.replace(**overrides)``: a config change, not new code. Knob values are
static (hashable) so a family can be closed over by ``jax.jit``.

Interface in the style of learned_optimization's ``TaskFamily`` / ``Task`` (Metz et al. 2022), with
the inner/outer objective split made explicit: ``train_loss`` is what the inner optimizer sees,
``outer_loss`` is the held-out (validation) loss of the same task that meta-training may target.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax

from mesajax.checks import check, check_finite_fields, is_int  # noqa: F401 (re-exported)

PyTree = Any
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TaskFamily:
  """Base class. Subclasses are frozen dataclasses whose fields are the family's knobs.

  Subclasses implement ``sample``, ``init``, ``train_loss``, ``outer_loss``,
  ``train_loss_full`` and ``outer_loss_full``; they may override ``proxies`` and ``validate``.
  """

  name = "base"

  # --- declarations read by the shared tests, the configs and the CLI (override per family) --
  #: Knob values that make the family small and quick, for the registry-wide smoke tests.
  test_kwargs: ClassVar[dict] = {}
  #: A valid value *different from the default* for every knob: the shared tests build the family
  #: shifted by each entry (so every knob is exercised) and by all of them at once.
  test_shift: ClassVar[dict] = {}
  #: Knobs that name files or directories on disk (no valid non-default value exists without
  #: files): exempt from ``test_shift``; the family's own tests load written files through them.
  file_knobs: ClassVar[tuple] = ()
  #: A plain gradient-descent step size at which the full-batch training loss decreases.
  gd_lr: ClassVar[float] = 0.1
  #: Named shifts (``{"name": {"task": {...}, "horizon_mult": k}}``) that a config choosing this
  #: family by name gets by default.
  default_shifts: ClassVar[dict] = {}
  #: Knobs that only change how ``sample`` draws tasks (e.g. a label-noise level), not ``init``,
  #: any loss or proxy: programs that take sampled tasks as inputs (the analyses, evaluation and
  #: learning-rate tuning) are compiled once for families that differ only in these
  #: (``program_key``). The shared tests check the claim.
  sample_only: ClassVar[tuple] = ()

  # --- the interface -------------------------------------------------------------------------
  def sample(self, key: Array) -> PyTree:
    """Draws one task: a pytree of arrays (task parameters and data)."""
    raise NotImplementedError

  def init(self, key: Array, task: PyTree) -> PyTree:
    """Initial inner parameters for ``task``."""
    raise NotImplementedError

  def train_loss(self, params: PyTree, task: PyTree, key: Array) -> Array:
    """Stochastic (minibatch / noisy-gradient) training loss, the inner objective."""
    raise NotImplementedError

  def outer_loss(self, params: PyTree, task: PyTree, key: Array) -> Array:
    """Held-out (validation) loss estimate of the same task; may be stochastic."""
    return self.outer_loss_full(params, task)

  def train_loss_full(self, params: PyTree, task: PyTree) -> Array:
    """Deterministic full-batch training loss (for analyses)."""
    raise NotImplementedError

  def outer_loss_full(self, params: PyTree, task: PyTree) -> Array:
    """Deterministic full-batch outer (validation) loss (for analyses and evaluation)."""
    raise NotImplementedError

  def proxies(self) -> Mapping[str, Callable[[PyTree, PyTree], Array]]:
    """Task-specific scalar proxies ``phi(params, task)`` for the implicit-objective dictionary.

    The generic terms (train loss, outer loss, l2, l2_init, grad_norm_sq) are added by the
    analysis; families add the proxies that can part ways with the outer objective.
    """
    return {}

  def validate(self) -> None:
    """Raises ``ValueError`` with a one-line message when a knob is out of range.

    Subclasses check ranges; ``check_finite`` (called by the registry and ``replace``) has already
    rejected NaN and infinite numbers, which pass most range comparisons."""

  def oracle(self, task: PyTree) -> PyTree | None:
    """The parameters with the lowest achievable *expected* outer loss for ``task`` when they are
    computable in closed form (e.g. the Bayes posterior mean of a linear regression, the minimiser
    of a quadratic), else ``None``. Evaluation reports their outer loss as a reference row."""
    return None

  def check_finite(self) -> None:
    """Rejects non-finite float knobs with a one-line ``ValueError``."""
    check_finite_fields(self, self.name)

  # --- helpers -----------------------------------------------------------------------------
  def replace(self, **overrides) -> "TaskFamily":
    """A shifted family: the same family with some knobs changed (validated)."""
    known = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"task family {self.name!r} has no knob(s) {unknown}; knobs: {sorted(known)}")
    # Configs and JSON turn tuples into lists; knobs must stay hashable (the family is static
    # under jit), as in ``registry.make_task_family``.
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    out = dataclasses.replace(self, **overrides)
    out.check_finite()
    out.validate()
    return out

  def knobs(self) -> dict:
    return dataclasses.asdict(self)

  def program_key(self) -> "TaskFamily":
    """The family with its ``sample_only`` knobs at their defaults: equal (and hash-equal) for
    shifted families whose compiled task-input programs are identical, so a cache keyed on it
    (``jax.jit`` of a closure over the family) compiles once for all of them."""
    defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in self.sample_only}
    return dataclasses.replace(self, **defaults) if defaults else self

  def sample_batch(self, key: Array, n: int) -> PyTree:
    return jax.vmap(self.sample)(jax.random.split(key, n))
