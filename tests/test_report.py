"""Report and figures generated from rows (mesajax/report/report.py, figures.py)."""
import json
import os
import types

import numpy as np
import pytest

from mesajax.report import figures, report
from mesajax.report.rows import append_rows, make_row


ROLE = {"quickstart": "learned", "sgd": "baseline", "sgdm": "baseline", "adam": "baseline"}


def synthetic_rows(learned_final=0.012345, adam_final=0.045678, learned_diverged=0.0):
  rows = []
  vals = {"quickstart": (learned_final, 0.2345, learned_diverged),
          "sgd": (0.1111, 0.3333, 0.0), "sgdm": (0.07777, 0.2222, 0.0),
          "adam": (adam_final, 0.19876, 1 / 64)}
  for split, scale, horizon in (("heldout", 1.0, 200), ("horizon_x10", 2.0, 2000)):
    for opt, (fin, mean, div) in vals.items():
      for metric, v in (("final_outer_loss", fin * scale), ("mean_outer_loss", mean * scale),
                        ("diverged_frac", div)):
        rows.append(make_row("eval", split, opt, metric, v, 0.9 * v, 1.1 * v + 1e-3, n=64,
                             horizon=horizon, role=ROLE[opt]))
      for step in range(0, horizon + 1, horizon // 10):
        v = fin * scale + np.exp(-step / horizon * 3)
        rows.append(make_row("eval_curve", split, opt, "outer_loss", v, 0.9 * v, 1.1 * v, n=64,
                             step=step, role=ROLE[opt]))
    rows.append(make_row("eval", split, "oracle", "final_outer_loss", 0.00321 * scale,
                         0.003 * scale, 0.0034 * scale, n=64, horizon=horizon, role="oracle"))
    gap = learned_final * scale - 0.00321 * scale
    rows.append(make_row("eval_paired", split, "quickstart", "gap_to_oracle", gap, 0.9 * gap,
                         1.1 * gap, n=64, baseline="oracle"))
    for b, lr in (("sgd", 0.31), ("sgdm", 0.031), ("adam", 0.0571)):
      rows.append(make_row("tuning", split, b, "best_lr", lr, n=32, lr_grid_min=1e-4, lr_grid_max=3.0,
                           lr_grid_size=15))
      rows.append(make_row("tuning", split, b, "at_grid_edge", float(b == "sgd"), n=32))
      rows.append(make_row("tuning", split, b, "all_failed", 0.0, n=32))
      d = vals["quickstart"][0] * scale - vals[b][0] * scale
      rows.append(make_row("eval_paired", split, "quickstart", "final_outer_loss_diff", d, d - 0.001,
                           d + 0.001, n=64, baseline=b))
      rows.append(make_row("eval_paired", split, "quickstart", "win_frac", 0.9375, 0.875, 1.0, n=64,
                           baseline=b))
  return rows


def write_run(tmp_path, rows, with_config=True):
  d = str(tmp_path)
  append_rows(os.path.join(d, "results.jsonl"), rows)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for s in range(0, 200, 20):
      f.write(json.dumps({"outer_step": s, "meta_loss": 1.0 / (1 + s), "grad_norm": 0.5,
                          "skipped": s == 40, "num_skipped": int(s >= 40) + int(s >= 100),
                          "time_s": 0.1 * s}) + "\n")
  if with_config:
    cfg = {"name": "quickstart", "seed": 0, "task": {"name": "quadratic", "kwargs": {"dim": 10}},
           "optimizer": {"name": "mlp_lopt", "kwargs": {}}, "meta": {"estimator": "tbptt"}}
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(cfg, f)
    with open(os.path.join(d, "meta.json"), "w") as f:  # the layout rundir.versions() writes
      json.dump({"jax": "0.10.2", "mesajax": "0.1.0", "git_commit": "abc123"}, f)
  return d


@pytest.fixture
def stub_analysis(monkeypatch):
  """Replace the analysis report section by a stub that records what it is given."""
  seen = {}

  def make_figures(rows, outdir):
    seen["n_rows"] = len(rows)
    os.makedirs(outdir, exist_ok=True)
    p = os.path.join(outdir, "nci.png")
    open(p, "wb").write(b"png")
    return [p]

  stub = types.SimpleNamespace(make_figures=make_figures,
                               report_section=lambda rows: "NCI of the learned optimizer: 0.123.")
  monkeypatch.setattr(report, "analysis_report", stub)
  return seen


def test_report_contains_row_numbers(tmp_path, stub_analysis):
  rows = synthetic_rows()
  d = write_run(tmp_path, rows)
  path = report.write_report(d)
  text = open(path).read()
  assert path == os.path.join(d, "report.md")
  assert "# mesajax report: quickstart" in text
  assert "`quadratic` (dim=10)" in text and "`mlp_lopt`" in text and "jax=0.10.2" in text
  assert "git_commit=abc123" in text
  # Every eval number (value and CI bounds) appears, formatted, in the tables.
  for r in rows:
    if r["analysis"] == "eval":
      cell = f"{r['value']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
      assert cell in text, cell
  assert "### Split `heldout` (horizon 200, 64 tasks)" in text
  assert "### Split `horizon_x10` (horizon 2000, 64 tasks)" in text
  assert "`quickstart` beats lr-tuned `adam`" in text
  assert "the intervals do not overlap" in text
  assert "0 of 64 held-out tasks diverge" in text
  for lr in ("0.31", "0.031", "0.0571"):
    assert f"| {lr} |" in text
  assert "| `heldout` | `sgd` | 0.31 | 0.0001 .. 3 (15 pts) | 32 | yes |" in text
  # Meta-training summary from metrics.jsonl.
  assert "10 logged outer steps up to step 180" in text
  assert "2 outer updates skipped" in text
  # Figures exist and are linked relatively.
  for rel in ("figures/meta_training.png", "figures/eval_curves_heldout.png",
              "figures/eval_curves_horizon_x10.png"):
    assert f"]({rel})" in text
    assert os.path.getsize(os.path.join(d, rel)) > 1000
  # Roles come from the rows: the oracle row and the learned optimizer's gap to it are shown.
  assert "| `oracle` (oracle) | 0.00321 [0.003, 0.0034]" in text
  assert "| `quickstart` (learned) |" in text and "| `adam` (tuned lr) |" in text
  assert "Gap of `quickstart` to the oracle" in text


def test_report_when_learned_loses_and_diverges(tmp_path, stub_analysis):
  rows = synthetic_rows(learned_final=0.5, adam_final=0.01, learned_diverged=3 / 64)
  text = open(report.write_report(write_run(tmp_path, rows, with_config=False))).read()
  assert "`quickstart` does not beat lr-tuned `adam`" in text
  assert "3 of 64 held-out tasks diverge" in text
  assert f"# mesajax report: {os.path.basename(str(tmp_path))}" in text  # no config: the dir name


def test_report_inf_and_duplicates(tmp_path, stub_analysis):
  rows = synthetic_rows()
  rows.append(make_row("eval", "heldout", "sgd", "final_outer_loss", float("inf"), 0.5,
                       float("inf"), n=64, horizon=200))  # re-run appended later: last one wins
  text = open(report.write_report(write_run(tmp_path, rows))).read()
  assert "inf [0.5, inf]" in text
  assert "| `sgd` (tuned lr) | 0.1111" not in text


def test_report_calls_analysis_section(tmp_path, stub_analysis):
  rows = synthetic_rows()
  text = open(report.write_report(write_run(tmp_path, rows))).read()
  assert "NCI of the learned optimizer: 0.123." in text
  assert "](figures/nci.png)" in text
  assert stub_analysis["n_rows"] == len(rows)


def test_figure_readable(tmp_path):
  rows = synthetic_rows()
  p = figures.eval_curves(rows, "heldout", str(tmp_path / "c.png"))
  import matplotlib.image
  img = matplotlib.image.imread(p)
  assert img.shape[0] > 300 and img.shape[1] > 500
  assert figures.eval_curves(rows, "nope", str(tmp_path / "x.png")) is None
  assert figures.meta_training_curve([], str(tmp_path / "m.png")) is None


def test_end_to_end_from_evaluate_rows(tmp_path, stub_analysis, monkeypatch):
  """Rows from the real evaluation code feed the report unchanged."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  import ml_collections
  from mesajax.eval import evaluate as ev
  from mesajax.optimizers.base import Optimizer
  from mesajax.optimizers.common import LogLearningRate
  from mesajax.splits import Split
  from mesajax.tasks.base import TaskFamily

  @dataclasses.dataclass(frozen=True)
  class Quad(TaskFamily):
    def sample(self, key):
      return {"s": jax.random.normal(key, (3,))}
    def init(self, key, task):
      return jnp.zeros(3)
    def train_loss_full(self, p, t):
      return 0.5 * jnp.sum((p - t["s"]) ** 2)
    def train_loss(self, p, t, k):
      return self.train_loss_full(p, t)
    def outer_loss_full(self, p, t):
      return self.train_loss_full(p, t)

  @dataclasses.dataclass(frozen=True)
  class GD(LogLearningRate, Optimizer):
    learning_rate: float = 0.1
    def init(self, phi, params):
      return ()
    def update(self, phi, state, g, p, ctx):
      return -jnp.exp(phi["log_lr"]) * g, state

  @dataclasses.dataclass(frozen=True)
  class LearnedGD(GD):
    learned = True

  cfg = ml_collections.ConfigDict(dict(num_tasks=8, num_tuning_tasks=4, baselines=("adam",),
                                       lr_grid_min=1e-2, lr_grid_max=1.0, lr_grid_size=5,
                                       curve_every=5, n_boot=50))
  monkeypatch.setattr(ev, "make_optimizer", lambda name, kw=None: GD())
  rows = ev.evaluate_all(LearnedGD(0.05), LearnedGD(0.05).init_phi(), "learned",
                         {"heldout": Split("heldout", Quad(), 20)}, cfg, 0)
  d = write_run(tmp_path, rows)
  text = open(report.write_report(d)).read()
  fin = [r for r in rows if r["analysis"] == "eval" and r["metric"] == "final_outer_loss"
         and r["optimizer"] == "learned"][0]
  assert f"{fin['value']:.4g} [{fin['ci_low']:.4g}, {fin['ci_high']:.4g}]" in text
  assert "`learned` does not beat lr-tuned `adam`" in text  # the tuned rate (1.0) solves it in 1 step
  assert {r["role"] for r in rows if r["analysis"] == "eval"} == {"learned", "baseline"}
