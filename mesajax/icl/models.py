"""In-context learners (flax.nnx): one task's context and queries in, query predictions out.

Every model implements, for ONE task (callers vmap over tasks):

  ``model(x_NxD, y_N, xq_MxD) -> yhat_M``       query predictions (each query sees only the
                                               context, never the other queries)
  ``model.hidden(x_NxD, y_N, xq_MxD) -> [L+1, M, F]``   the query's representation before the first
                                               layer and after each layer (for linear probes)
  ``model.train_predictions(x_NxD, y_N, xq_MxD) -> (yhat_T, which)``  the predictions the training
                                               loss scores, with ``which = "query"`` or ``"all"``
                                               (every context label from its prefix, then queries)

Models (registry ``MODELS``, name -> class; kwargs from the config):

* ``lsa``: linear self-attention (von Oswald et al. 2023). Tokens eᵢ = (xᵢ, yᵢ) for the context and
  e_q = (x_q, 0) for a query; layer l, head h with W_Q, W_K, W_V, P ∈ R^{(d+1)×(d+1)}:
      e_j ← e_j + Σ_h P_h W_V,h Σ_{i ≤ N} e_i (e_iᵀ W_K,hᵀ W_Q,h e_j)
  over context keys i only (context and query tokens are both updated; a query never attends to
  itself or to other queries). The prediction is the negated y-entry of the query token,
  ŷ = −e_q[d]. With W_K = W_Q = [[I, 0], [0, 0]], W_V = [[0, 0], [W₀, −I]] (W₀ = 0) and
  P = (η/N)·I one layer computes ŷ = (η/N) Σᵢ yᵢ xᵢᵀ x_q, one GD step from zero (``lsa_gd_params``).
* ``gpt``: a causal softmax transformer (pre-LayerNorm, GELU MLP, learned positions; Garg et al.
  2022) over the interleaved sequence x₁, y₁, …, x_N, y_N, x_q embedded linearly from
  (x, 0) / (0, y); it predicts every yᵢ at the position of xᵢ from the preceding pairs, and the
  query label at x_q.
* ``mesa``: one mesa-layer (von Oswald et al. 2023b, "Uncovering mesa-optimization algorithms"):
  keys kᵢ = W_K eᵢ, values vᵢ = W_V eᵢ, query q = W_Q e_q and
      Ŵ = argmin_W Σᵢ ‖vᵢ − W kᵢ‖² + λ‖W‖² = (Σᵢ vᵢkᵢᵀ)(Σᵢ kᵢkᵢᵀ + λI)⁻¹,  e_q ← e_q + P Ŵ q
  with λ = exp(log_lam) learned; Ŵ is computed in closed form, equal to the end state of the
  recursive-least-squares recursion over the context. ŷ = −e_q[d]. With k = q = (x, 0),
  v = (0, −y), P = I it is ridge regression with penalty λ.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesajax.icl.linalg import spd_solve


def _tokens(x_NxD, y_N, xq_MxD):
  ctx_NxE = jnp.concatenate([x_NxD, y_N[:, None]], axis=1)
  qry_MxE = jnp.concatenate([xq_MxD, jnp.zeros_like(xq_MxD[:, :1])], axis=1)
  return ctx_NxE, qry_MxE


class LSA(nnx.Module):
  """Multi-layer, multi-head linear self-attention (module docstring)."""

  def __init__(self, d: int, num_layers: int = 1, num_heads: int = 1, init_scale: float = 0.1,
               *, rngs: nnx.Rngs):
    e = d + 1
    shape = (num_layers, num_heads, e, e)
    std = init_scale / np.sqrt(e)
    self.d, self.num_layers, self.num_heads = d, num_layers, num_heads
    self.wq = nnx.Param(std * jax.random.normal(rngs.params(), shape))
    self.wk = nnx.Param(std * jax.random.normal(rngs.params(), shape))
    self.wv = nnx.Param(std * jax.random.normal(rngs.params(), shape))
    self.proj = nnx.Param(std * jax.random.normal(rngs.params(), shape))

  def _layer(self, l, ctx_NxE, qry_MxE):
    wq, wk, wv, p = (a[...][l] for a in (self.wq, self.wk, self.wv, self.proj))  # [H, E, E]
    k_HxNxE = jnp.einsum("hfe,ne->hnf", wk, ctx_NxE)
    v_HxNxE = jnp.einsum("hfe,ne->hnf", wv, ctx_NxE)
    def update(tok_TxE):
      q_HxTxE = jnp.einsum("hfe,te->htf", wq, tok_TxE)
      s_HxTxN = jnp.einsum("htf,hnf->htn", q_HxTxE, k_HxNxE)
      o_HxTxE = jnp.einsum("htn,hnf->htf", s_HxTxN, v_HxNxE)
      return tok_TxE + jnp.einsum("hgf,htf->tg", p, o_HxTxE)
    return update(ctx_NxE), update(qry_MxE)

  def hidden(self, x_NxD, y_N, xq_MxD):
    ctx, qry = _tokens(x_NxD, y_N, xq_MxD)
    out = [qry]
    for l in range(self.num_layers):
      ctx, qry = self._layer(l, ctx, qry)
      out.append(qry)
    return jnp.stack(out)

  def __call__(self, x_NxD, y_N, xq_MxD):
    return -self.hidden(x_NxD, y_N, xq_MxD)[-1][:, -1]

  def train_predictions(self, x_NxD, y_N, xq_MxD):
    return self(x_NxD, y_N, xq_MxD), "query"


def lsa_gd_params(d: int, n: int, eta: float, num_heads: int = 1) -> dict:
  """von Oswald's exact one-layer, one-GD-step weights (head 0; other heads zero), as the pure
  parameter dict of ``LSA(d, 1, num_heads)``: W_K = W_Q = [[I, 0], [0, 0]],
  W_V = [[0, 0], [W₀, −I]] with W₀ = 0, P = (η/N)·I."""
  e = d + 1
  sel = np.zeros((e, e), np.float32)
  sel[:d, :d] = np.eye(d)
  wv = np.zeros((e, e), np.float32)
  wv[d, d] = -1.0
  proj = np.eye(e, dtype=np.float32) * eta / n
  def head0(m):
    out = np.zeros((1, num_heads, e, e), np.float32)
    out[0, 0] = m
    return jnp.asarray(out)
  return {"wq": head0(sel), "wk": head0(sel), "wv": head0(wv), "proj": head0(proj)}


class MesaLayer(nnx.Module):
  """One mesa-layer: ridge regression of values on keys inside the forward pass."""

  def __init__(self, d: int, init_scale: float = 0.1, init_log_lam: float = 0.0, *,
               rngs: nnx.Rngs):
    e = d + 1
    std = init_scale / np.sqrt(e)
    self.d = d
    self.num_layers = 1
    self.wq = nnx.Param(std * jax.random.normal(rngs.params(), (e, e)))
    self.wk = nnx.Param(std * jax.random.normal(rngs.params(), (e, e)))
    self.wv = nnx.Param(std * jax.random.normal(rngs.params(), (e, e)))
    self.proj = nnx.Param(std * jax.random.normal(rngs.params(), (e, e)))
    self.log_lam = nnx.Param(jnp.asarray(init_log_lam, jnp.float32))

  def hidden(self, x_NxD, y_N, xq_MxD):
    ctx, qry = _tokens(x_NxD, y_N, xq_MxD)
    k_NxE, v_NxE = ctx @ self.wk[...].T, ctx @ self.wv[...].T
    q_MxE = qry @ self.wq[...].T
    e = k_NxE.shape[1]
    gram_ExE = k_NxE.T @ k_NxE + jnp.exp(self.log_lam[...]) * jnp.eye(e)
    # Ŵ q = Vᵀ K (KᵀK + λI)⁻¹ q, solved for all queries at once.
    z_ExM = spd_solve(gram_ExE, q_MxE.T)  # plain XLA Cholesky, not LAPACK (``icl.linalg``)
    out_MxE = qry + ((v_NxE.T @ (k_NxE @ z_ExM)).T) @ self.proj[...].T
    return jnp.stack([qry, out_MxE])

  def __call__(self, x_NxD, y_N, xq_MxD):
    return -self.hidden(x_NxD, y_N, xq_MxD)[-1][:, -1]

  def train_predictions(self, x_NxD, y_N, xq_MxD):
    return self(x_NxD, y_N, xq_MxD), "query"


class _Block(nnx.Module):
  def __init__(self, width, num_heads, rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=width, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, h_TxW, mask):
    h_TxW = h_TxW + self.attn(self.ln1(h_TxW), mask=mask, deterministic=True)
    return h_TxW + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h_TxW))))


class GPT(nnx.Module):
  """A small causal softmax transformer over interleaved (x, y) tokens (module docstring)."""

  def __init__(self, d: int, num_layers: int = 2, num_heads: int = 2, width: int = 64,
               max_len: int = 64, *, rngs: nnx.Rngs):
    self.d, self.num_layers, self.max_len = d, num_layers, max_len
    self.embed = nnx.Linear(d + 1, width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (2 * max_len + 1, width)))
    self.blocks = nnx.List([_Block(width, num_heads, rngs) for _ in range(num_layers)]) \
        if hasattr(nnx, "List") else [_Block(width, num_heads, rngs) for _ in range(num_layers)]
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, 1, rngs=rngs)

  def _run(self, x_NxD, y_N, xq_D):
    """Hidden states ``[L+1, 2N+1, W]`` of the sequence x₁, y₁, …, x_N, y_N, x_q."""
    n, d = x_NxD.shape
    xs = jnp.concatenate([x_NxD, xq_D[None]], axis=0)                        # [N+1, D]
    x_tok = jnp.concatenate([xs, jnp.zeros((n + 1, 1), xs.dtype)], axis=1)
    y_tok = jnp.concatenate([jnp.zeros((n, d), xs.dtype), y_N[:, None]], axis=1)
    seq = jnp.zeros((2 * n + 1, d + 1), xs.dtype).at[0::2].set(x_tok).at[1::2].set(y_tok)
    h = self.embed(seq) + self.pos[...][: 2 * n + 1]
    mask = nnx.make_causal_mask(jnp.ones(2 * n + 1))
    out = [h]
    for blk in self.blocks:
      h = blk(h, mask)
      out.append(h)
    return jnp.stack(out)

  def _preds(self, hs):
    return self.head(self.ln_f(hs[-1]))[:, 0]

  def hidden(self, x_NxD, y_N, xq_MxD):
    return jax.vmap(lambda q: self._run(x_NxD, y_N, q)[:, -1], out_axes=1)(xq_MxD)

  def __call__(self, x_NxD, y_N, xq_MxD):
    return jax.vmap(lambda q: self._preds(self._run(x_NxD, y_N, q))[-1])(xq_MxD)

  def train_predictions(self, x_NxD, y_N, xq_MxD):
    ctx = self._preds(self._run(x_NxD, y_N, xq_MxD[0]))[0::2]  # N context preds, then query 0
    rest = self(x_NxD, y_N, xq_MxD[1:]) if xq_MxD.shape[0] > 1 else ctx[:0]
    return jnp.concatenate([ctx, rest]), "all"


MODELS = {"lsa": LSA, "gpt": GPT, "mesa": MesaLayer}


def make_model(name: str, d: int, kwargs: dict, key) -> nnx.Module:
  """Builds a registered model; unknown names or options give a one-line ``ValueError``."""
  if name not in MODELS:
    raise ValueError(f"unknown icl model {name!r}; known: {sorted(MODELS)}")
  try:
    return MODELS[name](d, **dict(kwargs), rngs=nnx.Rngs(key))
  except TypeError as e:
    raise ValueError(f"icl model {name!r}: bad options {sorted(kwargs)} ({e})") from None
