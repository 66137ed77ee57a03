"""Coordinatewise recurrent learned optimizer (Andrychowicz et al. 2016, "Learning to learn by
gradient descent by gradient descent").

One small recurrent cell, shared by all parameters, runs on every scalar parameter with its own
hidden state. Per parameter the inputs are

  x = [ĝ, (log|g|/p, sign g) or (−1, e^p g), θ̂]    ĝ, θ̂: g and θ divided by their RMS over the
                                                      tensor; the middle pair is Andrychowicz et
                                                      al.'s preprocessing (``preprocess``, p = 10)
  τ-features: tanh(t/τ − 1) for τ in time_scales     (shared by all parameters)

and the update is a linear read-out of the new hidden state:

  (h, c) ← LSTM((h, c), [x, τ])   or   h ← GRU(h, [x, τ])
  u = step_mult · (w·h + b)                           (params_new = params + u)

LSTM (Hochreiter & Schmidhuber 1997): [i, f, g, o] = W_x x + W_h h + b, c ← σ(f)c + σ(i)tanh(g),
h ← σ(o) tanh(c), with the forget-gate bias initialised to 1. GRU (Cho et al. 2014):
r = σ(W_r x + U_r h + b_r), z = σ(W_z x + U_z h + b_z), n = tanh(W_n x + b_n + r ⊙ (U_n h)),
h ← (1 − z) n + z h. The read-out starts small (``out_init_scale``) so the untrained optimizer takes
tiny steps. The shared time features enter as a per-step bias, like in ``mlp_lopt``.

State layout: ``RNNLOptState(h, c)``, each params-structured with leaves ``[*param_shape, hidden]``;
``c`` is ``None`` for the GRU. ``hidden_state(state)`` returns ``[n_params, state_size]`` in
``ravel_pytree`` order, the columns being ``h`` then (LSTM) ``c``: ``state_size = 2·hidden_size``
for the LSTM, ``hidden_size`` for the GRU.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mesajax.optimizers import common
from mesajax.optimizers.base import Optimizer, PyTree, StepContext
from mesajax.optimizers.features import (TIME_SCALES, feature_row, log_sign_preprocess,
                                          second_moment_normalize, split_rows, time_features)

CELLS = ("lstm", "gru")


class RNNLOptState(NamedTuple):
  h: PyTree  # per leaf [*param_shape, hidden]: the cell's output / hidden state
  c: Any  # LSTM: per leaf [*param_shape, hidden] cell state; GRU: None


class CoordinatewiseRNN(nnx.Module):
  """An LSTM or GRU cell applied to ``[N, F]`` rows (one per parameter) plus a linear read-out."""

  def __init__(self, cell: str, n_in: int, hidden_size: int, out_init_scale: float,
               rngs: nnx.Rngs):
    gates = 4 if cell == "lstm" else 3
    self.cell = cell
    self.hidden_size = hidden_size
    self.wx = nnx.Linear(n_in, gates * hidden_size, rngs=rngs)
    self.wh = nnx.Linear(hidden_size, gates * hidden_size, use_bias=cell == "gru", rngs=rngs)
    if cell == "lstm":  # forget-gate bias 1 (Jozefowicz et al. 2015): remember by default
      self.wx.bias = nnx.Param(self.wx.bias[...].at[hidden_size:2 * hidden_size].set(1.0))
    self.head = nnx.Linear(hidden_size, 1, rngs=rngs)
    self.head.kernel = nnx.Param(self.head.kernel[...] * out_init_scale)

  def input_gates(self, x_NxF: jax.Array, shared_S: jax.Array) -> jax.Array:
    """W_x [x, shared] + b with the shared inputs folded into the bias."""
    w = self.wx.kernel[...]
    n_row = x_NxF.shape[-1]
    return x_NxF @ w[:n_row] + (self.wx.bias[...] + shared_S @ w[n_row:])

  def __call__(self, h_NxH, c_NxH, x_NxF, shared_S):
    """One step; returns (h, c, out_N). ``c_NxH`` is ignored (and returned as None) for the GRU."""
    hs = self.hidden_size
    gx = self.input_gates(x_NxF, shared_S)
    gh = self.wh(h_NxH)
    if self.cell == "lstm":
      z = gx + gh
      i, f, g, o = (z[:, k * hs:(k + 1) * hs] for k in range(4))
      c_NxH = jax.nn.sigmoid(f) * c_NxH + jax.nn.sigmoid(i) * jnp.tanh(g)
      h_NxH = jax.nn.sigmoid(o) * jnp.tanh(c_NxH)
    else:
      r = jax.nn.sigmoid(gx[:, :hs] + gh[:, :hs])
      z = jax.nn.sigmoid(gx[:, hs:2 * hs] + gh[:, hs:2 * hs])
      n = jnp.tanh(gx[:, 2 * hs:] + r * gh[:, 2 * hs:])
      h_NxH = (1 - z) * n + z * h_NxH
      c_NxH = None
    return h_NxH, c_NxH, self.head(h_NxH)[:, 0]


@functools.lru_cache(maxsize=None)
def _graphdef(cell: str, n_in: int, hidden_size: int):
  """The network's static structure, built once per option set outside any trace."""
  return nnx.split(CoordinatewiseRNN(cell, n_in, hidden_size, 1.0, nnx.Rngs(0)))[0]


@dataclasses.dataclass(frozen=True)
class RNNLOpt(Optimizer):
  """Coordinatewise LSTM/GRU learned optimizer; see the module docstring for the formula.

  ``phi`` is a plain nested dict of float32 arrays (``nnx.to_pure_dict`` of the network state):
  ``{"wx": {"kernel", "bias"}, "wh": {"kernel"[, "bias"]}, "head": {"kernel", "bias"}}``.
  """

  cell: str = "lstm"
  hidden_size: int = 16
  preprocess: bool = True
  preprocess_p: float = 10.0
  time_scales: tuple = TIME_SCALES
  step_mult: float = 0.01
  out_init_scale: float = 0.1
  norm_eps: float = 1e-5
  remat: bool = True  # rematerialise the cell under differentiation (values unchanged)

  name = "rnn_lopt"
  learned = True

  @property
  def num_row_features(self) -> int:
    return 2 + 2 * int(self.preprocess)

  @property
  def num_inputs(self) -> int:
    return self.num_row_features + len(self.time_scales)

  @property
  def state_size(self) -> int:
    """Columns of ``hidden_state``: h and c for the LSTM, h for the GRU."""
    return 2 * self.hidden_size if self.cell == "lstm" else self.hidden_size

  def validate(self) -> None:
    def check(cond, msg):
      common.check(cond, f"rnn_lopt: {msg}")
    check(self.cell in CELLS, f"cell must be one of {CELLS}, got {self.cell!r}")
    check(self.hidden_size >= 1, f"hidden_size must be >= 1, got {self.hidden_size}")
    check(self.preprocess_p > 0, f"preprocess_p must be > 0, got {self.preprocess_p}")
    check(all(s > 0 for s in self.time_scales), f"time_scales must be > 0, got {self.time_scales}")
    check(self.step_mult > 0, f"step_mult must be > 0, got {self.step_mult}")
    check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")

  # --- interface -------------------------------------------------------------------------------
  def init_phi(self, key: jax.Array) -> dict:
    module = CoordinatewiseRNN(self.cell, self.num_inputs, self.hidden_size, self.out_init_scale,
                               nnx.Rngs(key))
    return nnx.to_pure_dict(nnx.split(module)[1])

  def network(self, phi: dict) -> CoordinatewiseRNN:
    return nnx.merge(_graphdef(self.cell, self.num_inputs, self.hidden_size), phi)

  def init(self, phi, params) -> RNNLOptState:
    def zeros(p):
      return jnp.zeros(jnp.shape(p) + (self.hidden_size,), jnp.result_type(p))
    h = jax.tree.map(zeros, params)
    c = jax.tree.map(zeros, params) if self.cell == "lstm" else None
    return RNNLOptState(h, c)

  def update(self, phi, state: RNNLOptState, grads, params, ctx: StepContext):
    leaves_g, treedef = jax.tree.flatten(grads)
    leaves_p = treedef.flatten_up_to(params)
    hs = self.hidden_size

    rows = []
    for g, p in zip(leaves_g, leaves_p):
      x_FxN = second_moment_normalize(jnp.concatenate([feature_row(g), feature_row(p)]),
                                      self.norm_eps)
      if self.preprocess:
        x_FxN = jnp.concatenate([x_FxN, log_sign_preprocess(g.reshape(-1), self.preprocess_p)])
      rows.append(x_FxN.T)
    x_NxF = jnp.concatenate(rows) if len(rows) > 1 else rows[0]

    def stack(tree):
      return jnp.concatenate([leaf.reshape(-1, hs) for leaf in treedef.flatten_up_to(tree)])

    h_NxH = stack(state.h)
    c_NxH = stack(state.c) if self.cell == "lstm" else None
    shared_S = time_features(ctx.step, self.time_scales)
    apply = lambda phi, *args: self.network(phi)(*args)
    if self.remat:  # recompute the cell's gates in the backward pass instead of storing them
      apply = jax.checkpoint(apply)
    h_NxH, c_NxH, out_N = apply(phi, h_NxH, c_NxH, x_NxF, shared_S)

    step_N = self.step_mult * out_N
    updates = [u.astype(g.dtype) for u, g in zip(split_rows(step_N, leaves_g), leaves_g)]
    new_h = jax.tree.unflatten(treedef, split_rows(h_NxH, leaves_g))
    new_c = jax.tree.unflatten(treedef, split_rows(c_NxH, leaves_g)) if c_NxH is not None else None
    return jax.tree.unflatten(treedef, updates), RNNLOptState(new_h, new_c)

  def hidden_state(self, state: RNNLOptState) -> jax.Array:
    """``[n_params, state_size]``: per parameter (``ravel_pytree`` order) h, then c for the LSTM."""
    hs = self.hidden_size
    h = jnp.concatenate([leaf.reshape(-1, hs) for leaf in jax.tree.leaves(state.h)])
    if state.c is None:
      return h
    c = jnp.concatenate([leaf.reshape(-1, hs) for leaf in jax.tree.leaves(state.c)])
    return jnp.concatenate([h, c], axis=1)
