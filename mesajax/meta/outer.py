"""The outer (meta-training) step: one jitted program per step, compiled once.

``MetaState`` is a plain pytree (NamedTuple) holding everything a run needs to continue exactly:
meta-parameters ``phi``, the outer optimizer's state, the estimator's per-task truncation (and PES)
state, the outer step, the RNG key and the count of skipped updates. ``MetaTrainer.step`` is
``jax.jit``-compiled with the state donated and the task axis sharded over the mesh:

  (est_state, L, ĝ) = estimator(φ, est_state, key)
  φ' = φ + outer_update(clip(ĝ))
  keep φ', the outer optimizer's new state and est_state only if L, ĝ, φ' and the new outer
  state are all finite; otherwise keep the old φ and outer state and count the step as skipped

so a NaN or inf (from the data, the estimator or an absurd outer learning rate) never enters the
meta-parameters, and therefore never a checkpoint. The outer optimizer is optax Adam after
global-norm clipping (``meta.outer_clip``; 0 turns it off).

Seed populations (``meta.num_seeds`` = S > 1): S independent meta-training runs as ONE compiled
program — every leaf of the state gets a leading seed axis and the step is ``jax.vmap``-ped over
it (a wider program: on a CPU bound by per-operation overhead, S seeds cost far less than S
runs). Member s starts from the key stream of seed ``config.seed + s`` (its own φ₀, tasks and
perturbations), so member s is the run a single-seed config with that seed would make.

Selection (``meta.select_every`` > 0): the last outer step's φ is not necessarily the best one —
meta-training on truncations can improve the meta-loss while a few full-horizon runs get worse
(Metz et al. 2019). Every ``select_every`` steps the training loop scores φ by full-horizon runs on
``meta.select_tasks`` separate validation tasks (their own key stream, never held-out tasks):

  score(φ) = mean_i min(L_outer(θ_T^i) / L_outer(θ_0^i), 10)     (non-finite counts as 10)

and keeps the best φ and its score in the state (``best_phi``, ``best_score``), so selection survives
a resume. ``best_phi`` starts as the initial φ, which is scored at the first selection, so a φ that
diverges (scored at the cap) never replaces a better initial one. Evaluation and analyses use
``best_phi`` when selection is on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mesajax.meta import sharding as shd
from mesajax.meta.estimators import make_estimator
from mesajax.meta.truncation import Unroller
from mesajax.registry import make_optimizer
from mesajax.rollout import run_curve, with_inner_dtype
from mesajax.splits import purpose_key, training_family
from mesajax.tasks.views import PresetInit, prepare_tasks

PyTree = Any
SCORE_CAP = 10.0


class MetaState(NamedTuple):
  phi: PyTree
  opt_state: PyTree
  est_state: PyTree
  step: jax.Array         # int32 scalar: outer steps taken
  rng: jax.Array          # raw uint32 key
  num_skipped: jax.Array  # int32 scalar: non-finite updates skipped so far
  best_phi: PyTree        # the best phi by full-horizon validation (the initial phi until scored)
  best_score: jax.Array   # float32 scalar: its validation score (inf until the first selection)


def all_finite(tree) -> jax.Array:
  """True when every floating leaf of ``tree`` is finite (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
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
    self.num_seeds = int(c.meta.get("num_seeds", 1))
    # meta.inner_dtype: the inner losses of meta-training (not selection or evaluation) in bf16.
    inner_family = with_inner_dtype(self.family, c.meta.get("inner_dtype", "float32"))
    self.unroller = Unroller(self.opt, inner_family, int(c.meta.horizon), int(c.meta.unroll_length),
                             c.meta.outer_objective, c.meta.loss_transform)
    self.mesh = shd.make_mesh(int(c.meta.num_devices))
    self.estimator = make_estimator(c.meta.estimator, self.unroller, int(c.meta.num_tasks),
                                    float(c.meta.sigma), shd.constrain_tasks(self.mesh))
    self.outer_opt = outer_optimizer(float(c.meta.outer_lr), float(c.meta.outer_clip))
    self._shardings = None
    self._step_fn = None
    self._select_fn = None

  @property
  def population(self) -> bool:
    return self.num_seeds > 1

  def _over_seeds(self, fn):
    """``fn`` itself for one seed, ``jax.vmap(fn)`` over the leading seed axis for a population."""
    return jax.vmap(fn) if self.population else fn

  # --- state ---------------------------------------------------------------------------------
  def seed_keys(self) -> jax.Array:
    """The meta-training key of each member: ``[S, 2]`` for a population, ``[2]`` for one seed."""
    seed = int(self.config.seed)
    if not self.population:
      return purpose_key(seed, "meta_train", "train")
    return jnp.stack([purpose_key(seed + s, "meta_train", "train") for s in range(self.num_seeds)])

  def _init_one(self, key) -> MetaState:
    k_phi, k_est, k_run = jax.random.split(key, 3)
    phi = self.opt.init_phi(k_phi)
    return MetaState(phi, self.outer_opt.init(phi), self.estimator.init(phi, k_est),
                     jnp.zeros([], jnp.int32), k_run, jnp.zeros([], jnp.int32),
                     jax.tree.map(jnp.copy, phi), jnp.full([], jnp.inf, jnp.float32))

  def initial_phi(self):
    """The phi meta-training starts from (a leading member axis for a population): the learned
    optimizer before meta-training, the analyses' untrained null."""
    init_phi = lambda key: self.opt.init_phi(jax.random.split(key, 3)[0])
    return jax.jit(self._over_seeds(init_phi))(self.seed_keys())

  def init(self, key=None) -> MetaState:
    """The initial state (deterministic in ``config.seed``), placed on the mesh."""
    keys = self.seed_keys() if key is None else key
    return jax.jit(self._over_seeds(self._init_one), out_shardings=self.shardings())(keys)

  def abstract_state(self) -> MetaState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint."""
    shapes = jax.eval_shape(self._over_seeds(self._init_one), self.seed_keys())
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.shardings())

  def shardings(self) -> MetaState:
    """Replicated everywhere but the estimator state, whose task axis (axis 1 in a population,
    axis 0 otherwise) is sharded over the mesh."""
    if self._shardings is None:
      rep = shd.replicated(self.mesh)
      tasks = shd.task_sharded(self.mesh, task_axis=1 if self.population else 0)
      shapes = jax.eval_shape(self._over_seeds(self._init_one), self.seed_keys())
      self._shardings = shapes._replace(
          **{f: jax.tree.map(lambda _: rep, getattr(shapes, f)) for f in MetaState._fields
             if f != "est_state"},
          est_state=jax.tree.map(lambda _: tasks, shapes.est_state))
    return self._shardings

  # --- the step ------------------------------------------------------------------------------
  def _step_one(self, state: MetaState):
    rng, key = jax.random.split(state.rng)
    est_state, loss, grad = self.estimator.estimate(state.phi, state.est_state, key)
    safe_grad = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grad)
    updates, opt_state = self.outer_opt.update(safe_grad, state.opt_state, state.phi)
    phi = optax.apply_updates(state.phi, updates)
    finite = jnp.isfinite(loss) & all_finite(grad) & all_finite(phi) & all_finite(opt_state)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = MetaState(keep(phi, state.phi), keep(opt_state, state.opt_state), est_state,
                          state.step + 1, rng, state.num_skipped + (~finite).astype(jnp.int32),
                          state.best_phi, state.best_score)
    metrics = {"meta_loss": loss, "grad_norm": optax.global_norm(grad),
               "skipped": ~finite, "num_skipped": new_state.num_skipped}
    return new_state, metrics

  def _step(self, state: MetaState):
    return self._over_seeds(self._step_one)(state)

  @property
  def step(self):
    """``step(state) -> (state, metrics)``, jitted once with the state donated (metrics have a
    leading seed axis in a population)."""
    if self._step_fn is None:
      rep = shd.replicated(self.mesh)
      self._step_fn = jax.jit(self._step, donate_argnums=0, in_shardings=(self.shardings(),),
                              out_shardings=(self.shardings(), rep))
    return self._step_fn

  # --- selection by full-horizon validation ----------------------------------------------------
  def _selection_tasks(self):
    """The validation tasks of selection (their own key stream), drawn once."""
    if getattr(self, "_sel_tasks", None) is None:
      c = self.config
      n = int(c.meta.select_tasks)
      key = purpose_key(int(c.seed), "select", "train")
      task_keys = jax.random.split(jax.random.fold_in(key, 0), n)
      run_keys = jax.random.split(jax.random.fold_in(key, 1), n)
      self._sel_tasks = (prepare_tasks(self.family, task_keys, run_keys), run_keys)
    return self._sel_tasks

  def _score(self, phi, tasks, run_keys):
    horizon = int(self.config.meta.horizon)
    family = PresetInit(self.family)

    def one(task, k):
      curve = run_curve(self.opt, phi, family, task, k, horizon, horizon, every=horizon)
      ratio = curve["outer_loss"][-1] / jnp.maximum(curve["outer_loss"][0], 1e-12)
      return jnp.where(jnp.isfinite(ratio), jnp.minimum(ratio, SCORE_CAP), SCORE_CAP)

    return jnp.mean(jax.vmap(one)(tasks, run_keys))

  @property
  def validation_score(self):
    """``score(phi) -> float32`` for ONE member's phi: see the module docstring. Jitted once;
    tasks drawn once and passed as arguments (not baked into the program as constants)."""
    if getattr(self, "_score_fn", None) is None:
      jitted = jax.jit(self._score)
      self._score_fn = lambda phi: jitted(phi, *self._selection_tasks())
    return self._score_fn

  def _select_one(self, state: MetaState, tasks, run_keys):
    score_fn = lambda phi: self._score(phi, tasks, run_keys)
    score = score_fn(state.phi)
    # best_phi is the initial phi until the first selection scores it.
    best_score = jax.lax.cond(jnp.isfinite(state.best_score), lambda: state.best_score,
                              lambda: score_fn(state.best_phi))
    better = score < best_score
    best_phi = jax.tree.map(lambda a, b: jnp.where(better, a, b), state.phi, state.best_phi)
    return state._replace(best_phi=best_phi, best_score=jnp.where(better, score, best_score)), score

  def select(self, state: MetaState) -> tuple[MetaState, Any]:
    """Scores the current phi (of every member); keeps it as ``best_phi`` where it beats
    ``best_score``. Returns the new state and the score (a float, or a list per member)."""
    if self._select_fn is None:
      one = self._select_one
      fn = jax.vmap(one, in_axes=(0, None, None)) if self.population else one
      self._select_fn = jax.jit(fn, out_shardings=(self.shardings(), shd.replicated(self.mesh)))
    state, score = self._select_fn(state, *self._selection_tasks())
    score = jax.device_get(score)
    return state, (score.tolist() if self.population else float(score))

  @staticmethod
  def outer_step(state: MetaState) -> int:
    """The outer step of ``state`` as an int (a population's members step together)."""
    return int(jnp.max(jax.device_get(state.step)))

  def inner_steps_per_outer_step(self) -> int:
    return self.num_seeds * self.estimator.inner_steps_per_estimate()
