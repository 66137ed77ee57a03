"""The outer (meta-training) step: one jitted program per step, compiled once.

``MetaState`` is a plain pytree (NamedTuple) holding everything a run needs to continue exactly:
meta-parameters ``phi``, the outer optimizer's state, the estimator's per-task truncation (and PES)
state, the outer step, the RNG key and the count of skipped updates. ``MetaTrainer.step`` is
``jax.jit``-compiled with the state donated and the task axis sharded over the mesh:

  (est_state, L, ĝ) = estimator(φ, est_state, key)
  φ ← φ + outer_update(clip(ĝ))            only if L and ĝ are finite (else counted as skipped)

The outer optimizer is optax Adam after global-norm clipping (``meta.outer_clip``; 0 turns it off).

Selection (``meta.select_every`` > 0): the last outer step's φ is not necessarily the best one —
meta-training on truncations can improve the meta-loss while a few full-horizon runs get worse
(Metz et al. 2019). Every ``select_every`` steps the training loop scores φ by full-horizon runs on
``meta.select_tasks`` separate validation tasks (their own key stream, never held-out tasks):

  score(φ) = mean_i min(L_outer(θ_T^i) / L_outer(θ_0^i), 10)     (non-finite counts as 10)

and keeps the best φ and its score in the state (``best_phi``, ``best_score``), so selection survives
a resume. Evaluation and analyses use ``best_phi`` when selection is on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mesajax.meta import sharding as shd
from mesajax.meta.estimators import Estimator
from mesajax.meta.truncation import Unroller
from mesajax.registry import make_optimizer
from mesajax.rollout import run_curve
from mesajax.splits import purpose_key, training_family
from mesajax.tasks.views import PresetInit, prepare_tasks

PyTree = Any


class MetaState(NamedTuple):
  phi: PyTree
  opt_state: PyTree
  est_state: PyTree
  step: jax.Array         # int32 scalar: outer steps taken
  rng: jax.Array          # raw uint32 key
  num_skipped: jax.Array  # int32 scalar: non-finite updates skipped so far
  best_phi: PyTree        # the best phi by full-horizon validation (phi itself if selection is off)
  best_score: jax.Array   # float32 scalar: its validation score (inf before the first selection)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def outer_optimizer(lr: float, clip: float) -> optax.GradientTransformation:
  adam = optax.adam(lr)
  return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


@dataclasses.dataclass
class MetaTrainer:
  """Builds the jitted outer step for a resolved config (see ``mesajax.config``)."""

  config: Any

  def __post_init__(self):
    c = self.config
    self.opt = make_optimizer(c.optimizer.name, c.optimizer.kwargs.to_dict())
    self.family = training_family(c)
    self.unroller = Unroller(self.opt, self.family, int(c.meta.horizon), int(c.meta.unroll_length),
                             c.meta.outer_objective, c.meta.loss_transform)
    self.mesh = shd.make_mesh(int(c.meta.num_devices))
    self.estimator = Estimator(self.unroller, int(c.meta.num_tasks), c.meta.estimator,
                               float(c.meta.sigma), shd.constrain_tasks(self.mesh))
    self.outer_opt = outer_optimizer(float(c.meta.outer_lr), float(c.meta.outer_clip))
    self._shardings = None
    self._step_fn = None

  # --- state ---------------------------------------------------------------------------------
  def init(self, key=None) -> MetaState:
    """The initial state (deterministic in ``config.seed``), placed on the mesh."""
    if key is None:
      key = purpose_key(int(self.config.seed), "meta_train", "train")
    k_phi, k_est, k_run = jax.random.split(key, 3)

    def make(k_phi, k_est, k_run):
      phi = self.opt.init_phi(k_phi)
      return MetaState(phi, self.outer_opt.init(phi), self.estimator.init(phi, k_est),
                       jnp.zeros([], jnp.int32), k_run, jnp.zeros([], jnp.int32),
                       jax.tree.map(jnp.copy, phi), jnp.full([], jnp.inf, jnp.float32))

    return jax.jit(make, out_shardings=self.shardings())(k_phi, k_est, k_run)

  def abstract_state(self) -> MetaState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint."""
    shapes = jax.eval_shape(self.init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.shardings())

  def shardings(self) -> MetaState:
    if self._shardings is None:
      rep, tasks = shd.replicated(self.mesh), shd.task_sharded(self.mesh)
      # Structure only: trace the initialiser abstractly on the host.
      key = jax.random.PRNGKey(0)
      phi = jax.eval_shape(self.opt.init_phi, key)
      opt_state = jax.eval_shape(self.outer_opt.init, phi)
      est = jax.eval_shape(self.estimator.init, phi, key)
      self._shardings = MetaState(
          jax.tree.map(lambda _: rep, phi), jax.tree.map(lambda _: rep, opt_state),
          jax.tree.map(lambda _: tasks, est), rep, rep, rep, jax.tree.map(lambda _: rep, phi), rep)
    return self._shardings

  # --- the step ------------------------------------------------------------------------------
  def _step(self, state: MetaState):
    rng, key = jax.random.split(state.rng)
    est_state, loss, grad, _ = self.estimator.estimate(state.phi, state.est_state, key)
    finite = jnp.isfinite(loss) & _all_finite(grad)
    safe_grad = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad)
    updates, opt_state = self.outer_opt.update(safe_grad, state.opt_state, state.phi)
    phi = optax.apply_updates(state.phi, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = MetaState(keep(phi, state.phi), keep(opt_state, state.opt_state), est_state,
                          state.step + 1, rng, state.num_skipped + (~finite).astype(jnp.int32),
                          state.best_phi, state.best_score)
    metrics = {"meta_loss": loss, "grad_norm": optax.global_norm(grad),
               "skipped": ~finite, "num_skipped": new_state.num_skipped}
    return new_state, metrics

  @property
  def step(self):
    """``step(state) -> (state, metrics)``, jitted once with the state donated."""
    if self._step_fn is None:
      rep = shd.replicated(self.mesh)
      self._step_fn = jax.jit(self._step, donate_argnums=0, in_shardings=(self.shardings(),),
                              out_shardings=(self.shardings(), rep))
    return self._step_fn

  # --- selection by full-horizon validation ----------------------------------------------------
  @property
  def validation_score(self):
    """``score(phi) -> float32``: see the module docstring. Jitted once; tasks drawn once."""
    if getattr(self, "_score_fn", None) is None:
      c = self.config
      n, horizon = int(c.meta.select_tasks), int(c.meta.horizon)
      key = purpose_key(int(c.seed), "select", "train")
      task_keys = jax.random.split(jax.random.fold_in(key, 0), n)
      run_keys = jax.random.split(jax.random.fold_in(key, 1), n)
      tasks = prepare_tasks(self.family, task_keys, run_keys)
      family = PresetInit(self.family)

      def score(phi):
        def one(task, k):
          curve = run_curve(self.opt, phi, family, task, k, horizon, horizon, every=horizon)
          ratio = curve["outer_loss"][-1] / jnp.maximum(curve["outer_loss"][0], 1e-12)
          return jnp.where(jnp.isfinite(ratio), jnp.minimum(ratio, 10.0), 10.0)
        return jnp.mean(jax.vmap(one)(tasks, run_keys))

      self._score_fn = jax.jit(score)
    return self._score_fn

  def select(self, state: MetaState) -> tuple[MetaState, float]:
    """Scores the current phi; keeps it as ``best_phi`` when it beats ``best_score``."""
    score = float(self.validation_score(state.phi))
    if score < float(state.best_score):
      state = state._replace(best_phi=jax.tree.map(jnp.copy, state.phi),
                             best_score=jnp.asarray(score, jnp.float32))
    return state, score

  def inner_steps_per_outer_step(self) -> int:
    return self.estimator.inner_steps_per_estimate()
