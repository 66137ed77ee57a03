"""Training in-context learners: a population of seeds as one compiled, donated step.

``TrainState`` is a plain pytree holding everything a run needs to continue bit-exactly: the
parameters of every seed (a pure dict whose leaves carry a leading seed axis ``S``), their Adam
states, the step and one raw PRNG key per seed. One jitted step updates every seed at once
(``jax.vmap`` over the seed axis; each seed draws its own fresh tasks):

  tasks_s ~ family (batch B, fresh every step);  L_s = ½ mean (ŷ − y)² over the scored predictions
  θ_s ← θ_s + Adam(clip(∇L_s))

with a constant learning rate, or a cosine decay to 1% of it over ``icl.decay_steps`` steps.

The scored predictions are the query's for LSA and the mesa-layer, and every context label plus the
query for the GPT model (``models``). The loop (``train``) resumes from the latest checkpoint,
logs ``metrics.jsonl`` every ``icl.log_every`` steps and checkpoints every ``icl.checkpoint_every``
steps and at the end (and on Ctrl-C) through ``mesajax.checkpoint``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mesajax import checkpoint, rundir
from mesajax.bench import time_step
from mesajax.icl import config as cfg
from mesajax.icl.models import make_model


class TrainState(NamedTuple):
  params: Any        # pure dict, leaves [S, ...]
  opt_state: Any
  step: jax.Array    # int32 scalar
  rng: jax.Array     # [S, 2] uint32: each seed's data stream


def seed_keys(seed: int, num_seeds: int, purpose: int) -> jax.Array:
  """``[S, 2]`` raw keys: seed ``s`` of purpose 0 (init) or 1 (data) of the run seed ``seed``."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), purpose)
  return jnp.stack([jax.random.fold_in(base, s) for s in range(num_seeds)])


class Trainer:
  """Builds the model, the task family, the optimizer and the jitted step of a validated config."""

  def __init__(self, config):
    cfg.validate(config)
    self.config = config
    c = config.icl
    self.family = cfg.task_family(config)
    self.num_seeds = int(c.num_seeds)
    self.batch_size = int(c.batch_size)
    self.model_kwargs = c.model_kwargs.to_dict()
    self.graphdef, _ = nnx.split(self._model(jax.random.PRNGKey(0)))
    clip = float(c.grad_clip)
    decay = int(c.decay_steps)
    lr = optax.cosine_decay_schedule(float(c.lr), decay, alpha=0.01) if decay else float(c.lr)
    adam = optax.adam(lr)
    self.opt = optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam
    self._step_fn = None

  def _model(self, key):
    return make_model(self.config.icl.model, self.family.d, self.model_kwargs, key)

  # --- models --------------------------------------------------------------------------------
  def init_params(self, key) -> dict:
    """One seed's parameters as a pure dict."""
    return nnx.split(self._model(key))[1].to_pure_dict()

  def model(self, params: dict) -> nnx.Module:
    """The nnx model of ONE seed's pure parameter dict."""
    return nnx.merge(self.graphdef, params)

  def predict(self, params, x_NxD, y_N, xq_MxD):
    """One seed, one task: query predictions ``[M]``."""
    return self.model(params)(x_NxD, y_N, xq_MxD)

  def hidden(self, params, x_NxD, y_N, xq_MxD):
    return self.model(params).hidden(x_NxD, y_N, xq_MxD)

  def loss(self, params, tasks) -> jax.Array:
    """½ mean squared error of the scored predictions over a batch of tasks (one seed)."""
    def one(t):
      yhat_T, which = self.model(params).train_predictions(t["x_NxD"], t["y_N"], t["xq_MxD"])
      target_T = t["yq_M"] if which == "query" else jnp.concatenate([t["y_N"], t["yq_M"]])
      return 0.5 * jnp.mean(jnp.square(yhat_T - target_T))
    return jnp.mean(jax.vmap(one)(tasks))

  # --- state ---------------------------------------------------------------------------------
  def init(self) -> TrainState:
    seed = int(self.config.seed)
    # Eagerly, seed by seed (tracing the module constructors under jit compiles slowly on CPU).
    k_init = seed_keys(seed, self.num_seeds, 0)
    per_seed = [self.init_params(k_init[s]) for s in range(self.num_seeds)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *per_seed)
    return TrainState(params, jax.vmap(self.opt.init)(params), jnp.zeros([], jnp.int32),
                      seed_keys(seed, self.num_seeds, 1))

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self.init)

  # --- the step ------------------------------------------------------------------------------
  def _one_seed(self, params, opt_state, rng):
    rng, k = jax.random.split(rng)
    tasks = self.family.sample_batch(k, self.batch_size)
    loss, grad = jax.value_and_grad(self.loss)(params, tasks)
    updates, opt_state = self.opt.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rng, loss, optax.global_norm(grad)

  def _step(self, state: TrainState):
    params, opt_state, rng, loss_S, gnorm_S = jax.vmap(self._one_seed)(
        state.params, state.opt_state, state.rng)
    return TrainState(params, opt_state, state.step + 1, rng), {"loss": loss_S, "grad_norm": gnorm_S}

  def spec(self) -> str:
    """What the compiled step depends on (trainers of equal spec share one compiled step)."""
    c = self.config.icl
    keys = ("model", "model_kwargs", "task", "batch_size", "lr", "decay_steps", "grad_clip")
    return json.dumps({k: (c[k].to_dict() if hasattr(c[k], "to_dict") else c[k]) for k in keys},
                      sort_keys=True, default=list)

  @property
  def step(self):
    """``step(state) -> (state, metrics)``, jitted once per spec with the state donated."""
    if self._step_fn is None:
      spec = self.spec()
      if spec not in _STEPS:
        _STEPS[spec] = jax.jit(self._step, donate_argnums=0)
      self._step_fn = _STEPS[spec]
    return self._step_fn


_STEPS: dict = {}  # spec -> jitted step, so that a resumed run in the same process reuses it


# --- run directories and the loop ----------------------------------------------------------------
def _normalise(d):
  return json.loads(json.dumps(d, default=list))


def prepare(workdir: str, config) -> bool:
  """Writes ``config.json`` and ``meta.json`` (like ``mesajax.rundir``) or checks that ``workdir``
  holds a run of the same config (``ValueError`` otherwise). Returns True on a resume."""
  os.makedirs(workdir, exist_ok=True)
  saved = rundir.read_config(workdir)
  if saved is not None:
    a, b = _normalise(cfg.identity(saved)), _normalise(cfg.identity(config))
    if a != b:
      keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise ValueError(f"{workdir} holds a run of another config (differs in {keys}); "
                       f"use another --workdir")
  elif os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise ValueError(f"{workdir} has checkpoints but no config.json; refusing to reuse it")
  rundir._write_json(os.path.join(workdir, "config.json"), _normalise(config.to_dict()))
  rundir._write_json(os.path.join(workdir, "meta.json"), rundir.versions())
  return saved is not None


def load_or_init(trainer: Trainer, workdir: str, step: int | None = None) -> TrainState:
  if checkpoint.latest_step(workdir) is None:
    return trainer.init()
  return checkpoint.restore_state(workdir, trainer.abstract_state(), step)


def _log(path, row):
  with open(path, "a") as f:
    f.write(json.dumps(row, allow_nan=False) + "\n")


def _row(step, metrics, t0):
  m = jax.device_get(metrics)
  loss = [float(v) if np.isfinite(v) else None for v in np.asarray(m["loss"])]
  fin = [v for v in loss if v is not None]
  return {"step": int(step), "loss": loss, "loss_mean": float(np.mean(fin)) if fin else None,
          "grad_norm": [float(v) if np.isfinite(v) else None for v in np.asarray(m["grad_norm"])],
          "time_s": time.perf_counter() - t0}


def train(config, workdir: str, progress: bool = True) -> tuple[Trainer, TrainState]:
  """Trains ``config.icl.num_seeds`` seeds to ``config.icl.num_steps`` steps in ``workdir``,
  resuming from its latest checkpoint. Returns ``(trainer, state)``."""
  trainer = Trainer(config)
  prepare(workdir, config)
  state = load_or_init(trainer, workdir)
  start, total = int(state.step), int(config.icl.num_steps)
  meta = {"config": _normalise(config.to_dict()), "versions": rundir.versions()}
  log_every, ckpt_every = int(config.icl.log_every), int(config.icl.checkpoint_every)
  path = os.path.join(workdir, "metrics.jsonl")
  bar = tqdm(total=total, initial=start, desc="icl-train", disable=not progress, leave=True)
  pending, last_saved, t0 = None, start, time.perf_counter()
  try:
    for step in range(start, total):
      state, metrics = trainer.step(state)
      if pending is not None:  # read the previous log step after dispatching this one
        row = _row(*pending, t0)
        _log(path, row)
        bar.set_postfix(loss=f"{row['loss_mean']:.4g}" if row["loss_mean"] is not None else "nan")
        pending = None
      if (step + 1) % log_every == 0 or step + 1 == total:
        pending = (step + 1, metrics)
      bar.update(1)
      if (step + 1) % ckpt_every == 0 and step + 1 < total:
        checkpoint.save(workdir, step + 1, state, meta)
        last_saved = step + 1
    if pending is not None:
      _log(path, _row(*pending, t0))
    if int(state.step) != last_saved or checkpoint.latest_step(workdir) is None:
      checkpoint.save(workdir, int(state.step), state, meta)
  except KeyboardInterrupt:
    bar.close()
    jax.block_until_ready(state)
    checkpoint.save(workdir, int(state.step), state, meta)
    print(f"interrupted: saved checkpoint at step {int(state.step)} in {workdir}")
    raise
  bar.close()
  return trainer, state


def load(workdir: str, step: int | None = None):
  """``(config, trainer, state)`` of a run directory's checkpoint (latest by default)."""
  import ml_collections
  saved = rundir.read_config(workdir)
  if saved is None:
    raise ValueError(f"{workdir} holds no ICL run (no config.json)")
  config = ml_collections.ConfigDict(saved)
  config.icl.eval.nulls = tuple(config.icl.eval.nulls)
  trainer = Trainer(config)
  state = checkpoint.restore_state(workdir, trainer.abstract_state(), step)
  return config, trainer, state


def benchmark(config, steps: int = 50, repeats: int = 3) -> dict:
  """Training throughput: ``compile_s`` (lowering + compiling the step) and ``sequences_per_s``
  (sequences = seeds × batch per step; median over ``repeats`` blocks of ``steps`` steps)."""
  trainer = Trainer(config)
  state = trainer.init()
  compile_s, rates, state, _ = time_step(trainer.step, state, steps, repeats)
  steps_per_s = float(np.median(rates))
  seqs = trainer.num_seeds * trainer.batch_size
  return {"config": config.name, "model": config.icl.model, "num_seeds": trainer.num_seeds,
          "batch_size": trainer.batch_size, "d": trainer.family.d, "N": trainer.family.N,
          "compile_s": compile_s, "steps_per_s": steps_per_s,
          "sequences_per_s": steps_per_s * seqs, "backend": jax.default_backend()}
