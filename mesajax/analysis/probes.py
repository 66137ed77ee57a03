"""Linear probes of a recurrent optimizer's per-parameter hidden state.

Rows are (task, step t, parameter i) with features h ∈ R^H, the optimizer's hidden state *after*
processing the gradient of step t (``opt.hidden_state(state_{t+1})[i]``). Targets at the same row:

  log_loss            log L_train(θ_t)                                   (shared by the step's rows)
  grad                g_{t,i}
  ema_g@β             m_t = β m_{t−1} + (1−β) g_t, m_{−1} = 0 (no bias correction), β in DECAYS
  ema_g2@β            the same EMA of g²
  step                t
  steps_remaining     T_horizon − t
  curvature           uᵀ H u / ‖u‖² along the step's update u_t (one HVP per step; shared)

Probe: ridge regression with intercept on standardised features, closed form
β = (XᵀX/n + λI)⁻¹ Xᵀy/n; λ from a log grid chosen on a validation fold; R² reported on a held-out
test fold. Folds are by task (tasks 0, 1 mod 4 train, 2 validation, 3 test) when there are ≥ 4
tasks, else by contiguous blocks of steps. Control (Hewitt & Liang 2019, "Designing and
Interpreting Probes with Control Tasks"): the same probe trained and tested on targets shuffled
across rows within each fold; selectivity = R² − max(R²_control, 0) (a probe that only memorises
scores ≈ 0; a control that does worse than the constant predictor, R² < 0, earns no credit).
CIs: percentile bootstrap over test tasks of the pooled R² (from per-task sufficient statistics)
and, with the same resamples, of the selectivity.

Known answer: a cell whose state is a linear embedding of Adam's (m, v) gives R² ≈ 1 for
ema_g@β₁ and ema_g2@β₂ only (with white-noise-like gradients the EMAs at other decays are
decorrelated: the squared correlation of EMAs at decays a, b of white noise is
(1−a²)(1−b²)/(1−ab)², 0.32 for 0.9 vs 0.99). Cost: one HVP per step for the curvature; the probes
are O(rows · H²).
"""
from __future__ import annotations

import numpy as np

DECAYS = (0.5, 0.9, 0.99, 0.999)
LAMBDAS = tuple(10.0 ** np.arange(-8, 3))


def ema(x_BxTxN, decay: float) -> np.ndarray:
  """m_t = decay·m_{t−1} + (1 − decay)·x_t along axis 1, m_{−1} = 0."""
  x = np.asarray(x_BxTxN, np.float64)
  out = np.empty_like(x)
  m = np.zeros_like(x[:, 0])
  for t in range(x.shape[1]):
    m = decay * m + (1.0 - decay) * x[:, t]
    out[:, t] = m
  return out


def targets(grads_BxTxN, loss_BxT, curv_BxT, horizon: int, decays=DECAYS) -> dict:
  """Probe targets ``{name: [B, T, N]}`` from full-batch gradients, losses and curvatures."""
  g = np.asarray(grads_BxTxN, np.float64)
  b, t, n = g.shape
  bcast = lambda x: np.broadcast_to(np.asarray(x, np.float64)[:, :, None], (b, t, n))
  steps = np.broadcast_to(np.arange(t, dtype=np.float64)[None, :, None], (b, t, n))
  out = {"log_loss": bcast(np.log(np.maximum(loss_BxT, 1e-30))), "grad": g}
  for d in decays:
    out[f"ema_g@{d:g}"] = ema(g, d)
  for d in decays:
    out[f"ema_g2@{d:g}"] = ema(g * g, d)
  out["step"] = steps
  out["steps_remaining"] = horizon - steps
  out["curvature"] = bcast(curv_BxT)
  return out


def _folds(b: int, t: int) -> np.ndarray:
  """Fold id (0 train, 1 validation, 2 test) for each (task, step)."""
  if b >= 4:
    f = np.array([0, 0, 1, 2])[np.arange(b) % 4]
    return np.broadcast_to(f[:, None], (b, t))
  f = np.minimum(np.arange(t) * 3 // max(t, 1), 2)
  return np.broadcast_to(np.array([0, 1, 2])[f][None, :], (b, t))


def _ridge(x, y, lam):
  xtx = x.T @ x / x.shape[0]
  return np.linalg.solve(xtx + lam * np.eye(x.shape[1]), x.T @ y / x.shape[0])


def _stats(y, pred, groups, n_groups):
  """Per-group sufficient statistics (n, Σy, Σy², Σres²) for the pooled R²."""
  s = np.zeros((n_groups, 4))
  np.add.at(s, (groups, 0), 1.0)
  np.add.at(s, (groups, 1), y)
  np.add.at(s, (groups, 2), y * y)
  np.add.at(s, (groups, 3), (y - pred) ** 2)
  return s


def _r2(s):
  n, sy, syy, sres = s.sum(0) if s.ndim == 2 else s
  ss_tot = syy - sy * sy / max(n, 1.0)
  return 1.0 - sres / ss_tot if ss_tot > 0 else np.nan


def _probe(x_tr, y_tr, x_va, y_va, x_te, y_te, lambdas):
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-12
  ym, ys = y_tr.mean(), y_tr.std() + 1e-30
  z = lambda a: (a - mu) / sd
  best, best_err = None, np.inf
  for lam in lambdas:
    beta = _ridge(z(x_tr), (y_tr - ym) / ys, lam)
    err = np.mean((z(x_va) @ beta * ys + ym - y_va) ** 2)
    if err < best_err:
      best, best_err = beta, err
  return z(x_te) @ best * ys + ym


def probe_all(hidden_BxTxNxH, targets_dict: dict, seed: int = 0, n_boot: int = 1000,
              max_rows: int = 50000, lambdas=LAMBDAS) -> dict:
  """Fits one probe (and its control) per target. Returns ``{target: {"r2", "r2_lo", "r2_hi",
  "selectivity", "sel_lo", "sel_hi", "r2_control", "n"}}`` with ``n`` the number of test tasks
  (or 1 when folds are by step)."""
  h = np.asarray(hidden_BxTxNxH, np.float64)
  b, t, n, hd = h.shape
  rng = np.random.default_rng(seed)
  fold = np.broadcast_to(_folds(b, t)[:, :, None], (b, t, n)).reshape(-1)
  task = np.broadcast_to(np.arange(b)[:, None, None], (b, t, n)).reshape(-1)
  x = h.reshape(-1, hd)
  rows = np.flatnonzero(np.all(np.isfinite(x), axis=1))
  if rows.size > max_rows:
    rows = np.sort(rng.choice(rows, max_rows, replace=False))
  idx = {f: rows[fold[rows] == f] for f in range(3)}
  test_tasks = np.unique(task[idx[2]])
  gid = np.searchsorted(test_tasks, task[idx[2]]) if b >= 4 else np.zeros(idx[2].size, int)
  ng = test_tasks.size if b >= 4 else 1
  boot = rng.integers(0, ng, size=(n_boot, ng)) if ng > 1 else None
  out = {}
  for name, tgt in targets_dict.items():
    y = np.asarray(tgt, np.float64).reshape(-1)
    if not np.all(np.isfinite(y[rows])) or np.std(y[idx[0]]) == 0:
      continue
    perm = {f: rng.permutation(idx[f]) for f in range(3)}
    res = {}
    for kind, yy in (("probe", {f: y[idx[f]] for f in range(3)}),
                     ("control", {f: y[perm[f]] for f in range(3)})):
      pred = _probe(x[idx[0]], yy[0], x[idx[1]], yy[1], x[idx[2]], yy[2], lambdas)
      res[kind] = _stats(yy[2], pred, gid, ng)
    r2, r2c = _r2(res["probe"]), _r2(res["control"])
    sel = r2 - max(r2c, 0.0)
    entry = {"r2": r2, "r2_control": r2c, "selectivity": sel, "n": ng,
             "r2_lo": r2, "r2_hi": r2, "sel_lo": sel, "sel_hi": sel}
    if boot is not None:
      br = np.array([_r2(res["probe"][i]) for i in boot])
      bs = br - np.maximum(np.array([_r2(res["control"][i]) for i in boot]), 0.0)
      entry["r2_lo"], entry["r2_hi"] = np.nanpercentile(br, [2.5, 97.5])
      entry["sel_lo"], entry["sel_hi"] = np.nanpercentile(bs, [2.5, 97.5])
    out[name] = entry
  return out
