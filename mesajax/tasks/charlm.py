"""A character-level language model on a text file: learned optimizers on a sequence model.

The text (``text_file``, any UTF-8 file; default: the English help text that ships with every
Python, ``pydoc_data.topics``, about 0.46 MB) is read once on the host, cached, and encoded as ASCII
codes (vocabulary 128; other characters become ``?``). Its first ``1 - val_fraction`` is the
training slice, the rest the validation slice, so the outer loss is measured on text the inner
optimizer never sees.

One task = ``n_train`` windows of ``seq_len + 1`` characters at random offsets in the training
slice and ``n_val`` windows in the validation slice (drawn inside jit from the task key), and a
fresh model. The model is a small pre-LayerNorm causal transformer (flax.nnx, handled as a pure
dict of arrays like ``classifier.py``): token and learned position embeddings of ``d_model``,
``n_layers`` blocks of multi-head causal self-attention (``n_heads``) and a 4x GELU MLP, a final
LayerNorm and a linear read-out to 128 logits (initialisation: see :func:`init`). Loss: mean next-character cross-entropy (nats);
``train_loss`` on ``batch_size`` training windows, ``outer_loss`` on all validation windows. A
model that ignores its input scores ln 128 = 4.85 nats.

Knobs (fields of :class:`CharLM`):

================  =======  ========================================================================
knob              default  meaning
================  =======  ========================================================================
``text_file``     None     path of a UTF-8 text file; None: Python's ``pydoc_data.topics`` text
``val_fraction``  0.1      the last fraction of the text is the validation slice (in (0, 0.5])
``seq_len``       32       characters of context per window (int >= 2)
``n_train``       64       training windows per task (int >= 1)
``n_val``         32       validation windows per task (int >= 1)
``batch_size``    8        windows per minibatch; None or >= n_train: full batch
``d_model``       32       embedding width (int >= 1, a multiple of n_heads)
``n_heads``       2        attention heads (int >= 1)
``n_layers``      1        transformer blocks (int >= 0)
================  =======  ========================================================================

Parameters: 22,112 at the defaults (:meth:`CharLM.num_params`). Task pytree:
``{"x_train": [n_train, seq_len + 1] int32, "x_val": [n_val, seq_len + 1] int32}``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mesajax.tasks import data
from mesajax.tasks.base import TaskFamily, check, is_int

VOCAB = 128


@functools.lru_cache(maxsize=4)
def load_text(text_file: str | None = None) -> np.ndarray:
  """The text as ``uint8`` ASCII codes (non-ASCII characters become ``?``), loaded once."""
  if text_file is None:
    from pydoc_data import topics
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  else:
    path = os.path.expanduser(text_file)
    if not os.path.isfile(path):
      raise ValueError(f"charlm: no text file {os.path.abspath(path)!r}; set text_file to a local "
                       "UTF-8 file, or None for Python's bundled help text")
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).copy()


class Arch(NamedTuple):
  seq_len: int
  d_model: int
  n_heads: int
  n_layers: int


class Block(nnx.Module):
  def __init__(self, d: int, n_heads: int, *, rngs: nnx.Rngs):
    self.n_heads = n_heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, 4 * d, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x_NxTxD):
    n, t, d = x_NxTxD.shape
    h = self.n_heads
    q, k, v = jnp.split(self.qkv(self.ln1(x_NxTxD)), 3, axis=-1)
    q, k, v = (a.reshape(n, t, h, d // h) for a in (q, k, v))
    scores = jnp.einsum("nqhc,nkhc->nhqk", q, k) / jnp.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, -1e9)
    att = jnp.einsum("nhqk,nkhc->nqhc", jax.nn.softmax(scores, axis=-1), v).reshape(n, t, d)
    x = x_NxTxD + self.proj(att)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class CharTransformer(nnx.Module):
  def __init__(self, arch: Arch, *, rngs: nnx.Rngs):
    d = arch.d_model
    self.n_layers = arch.n_layers
    self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (arch.seq_len, d)))
    for i in range(arch.n_layers):
      setattr(self, f"block{i}", Block(d, arch.n_heads, rngs=rngs))
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, VOCAB, rngs=rngs)

  def __call__(self, tokens_NxT):
    x = self.embed(tokens_NxT) + self.pos[...][:tokens_NxT.shape[1]]
    for i in range(self.n_layers):
      x = getattr(self, f"block{i}")(x)
    return self.head(self.ln_f(x))


@functools.lru_cache(maxsize=None)
def graph(arch: Arch):
  """``(graphdef, abstract_state)``, built once per architecture outside jit."""
  return nnx.split(nnx.eval_shape(lambda: CharTransformer(arch, rngs=nnx.Rngs(0))))


def init(key, arch: Arch) -> dict:
  """Fresh parameters as a pure dict: kernels N(0, 1/fan_in), token embeddings N(0, 1/d_model),
  position embeddings N(0, 0.02^2), biases 0, LayerNorm scales 1. All random leaves are slices of
  one Gaussian draw (one threefry graph: a per-layer nnx initialiser compiled ~4x slower)."""
  _, template = graph(arch)
  shapes = nnx.to_pure_dict(template)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [str(getattr(path[-1], "key", path[-1])) for path, _ in leaves]
  random = [s.shape for (_, s), nm in zip(leaves, names) if nm in ("kernel", "embedding", "pos")]
  draws = iter(data.normals(key, *random))
  out = []
  for (_, s), nm in zip(leaves, names):
    if nm == "kernel":
      out.append(next(draws) / jnp.sqrt(s.shape[0]))
    elif nm == "embedding":
      out.append(next(draws) / jnp.sqrt(arch.d_model))
    elif nm == "pos":
      out.append(0.02 * next(draws))
    elif nm == "scale":
      out.append(jnp.ones(s.shape, s.dtype))
    else:
      out.append(jnp.zeros(s.shape, s.dtype))
  return jax.tree.unflatten(treedef, out)


def apply(params: dict, arch: Arch, tokens_NxT) -> jax.Array:
  """Logits ``[N, T, 128]``."""
  graphdef, template = graph(arch)
  state = jax.tree.map(lambda leaf: leaf, template)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(tokens_NxT)


def next_char_loss(logits_NxTxV, targets_NxT):
  logp = jax.nn.log_softmax(logits_NxTxV, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets_NxT[..., None], axis=-1))


@dataclasses.dataclass(frozen=True)
class CharLM(TaskFamily):
  """Next-character prediction on random windows of a text; see the module docstring."""

  name = "charlm"

  text_file: str | None = None
  val_fraction: float = 0.1
  seq_len: int = 32
  n_train: int = 64
  n_val: int = 32
  batch_size: int | None = 8
  d_model: int = 32
  n_heads: int = 2
  n_layers: int = 1

  test_kwargs = {"seq_len": 8, "n_train": 16, "n_val": 8, "batch_size": 4, "d_model": 8}
  test_shift = {"val_fraction": 0.2, "seq_len": 6, "n_train": 12, "n_val": 5, "batch_size": None,
                "d_model": 12, "n_heads": 4, "n_layers": 2}
  # text_file has no valid non-default value without a file on disk.
  file_knobs = ("text_file",)
  gd_lr = 0.3
  default_shifts = {
      "seq_len_x2": {"task": {"seq_len": 64}},
      "n_train_x4": {"task": {"n_train": 256}},
      "deeper": {"task": {"n_layers": 2}},
      "horizon_x10": {"horizon_mult": 10},
  }

  @property
  def arch(self) -> Arch:
    return Arch(self.seq_len, self.d_model, self.n_heads, self.n_layers)

  def num_params(self) -> int:
    return sum(s.size for s in jax.tree.leaves(nnx.to_pure_dict(graph(self.arch)[1])))

  def validate(self) -> None:
    n = self.name
    check(self.text_file is None or isinstance(self.text_file, str),
          f"{n}: text_file must be a path string or None, got {self.text_file!r}")
    check(0.0 < self.val_fraction <= 0.5,
          f"{n}: val_fraction must be in (0, 0.5], got {self.val_fraction!r}")
    for knob, low in (("seq_len", 2), ("n_train", 1), ("n_val", 1), ("d_model", 1),
                      ("n_heads", 1), ("n_layers", 0)):
      v = getattr(self, knob)
      check(is_int(v) and v >= low, f"{n}: {knob} must be an int >= {low}, got {v!r}")
    check(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
          f"{n}: batch_size must be None or an int >= 1, got {self.batch_size!r}")
    check(self.d_model % self.n_heads == 0,
          f"{n}: d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
    n_train_chars, n_val_chars = self._slices()
    check(min(n_train_chars, n_val_chars) > self.seq_len + 1,
          f"{n}: the text is too short for seq_len {self.seq_len} (training slice "
          f"{n_train_chars}, validation slice {n_val_chars} characters)")

  def _slices(self) -> tuple[int, int]:
    n = len(load_text(self.text_file))
    n_val = int(n * self.val_fraction)
    return n - n_val, n_val

  def sample(self, key):
    tokens = jnp.asarray(load_text(self.text_file))
    n_train_chars, n_val_chars = self._slices()
    width = self.seq_len + 1
    k_train, k_val = jax.random.split(key)
    start_train = jax.random.randint(k_train, (self.n_train,), 0, n_train_chars - width + 1)
    start_val = n_train_chars + jax.random.randint(k_val, (self.n_val,), 0,
                                                   n_val_chars - width + 1)
    offsets = jnp.arange(width)
    return {"x_train": tokens[start_train[:, None] + offsets].astype(jnp.int32),
            "x_val": tokens[start_val[:, None] + offsets].astype(jnp.int32)}

  def init(self, key, task):
    return init(key, self.arch)

  def loss_on(self, params, windows_NxT1):
    logits = apply(params, self.arch, windows_NxT1[:, :-1])
    return next_char_loss(logits, windows_NxT1[:, 1:])

  def train_loss(self, params, task, key):
    (windows,) = data.minibatch(key, (task["x_train"],), self.batch_size)
    return self.loss_on(params, windows)

  def train_loss_full(self, params, task):
    return self.loss_on(params, task["x_train"])

  def outer_loss_full(self, params, task):
    return self.loss_on(params, task["x_val"])
