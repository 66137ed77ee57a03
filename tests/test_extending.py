"""docs/extending.md, executed: a task family and an optimizer written in one file each
(``examples/extending/``) are picked up by the shared registry-driven tests with one registry line,
match an independent reference, and run end to end through ``run.py`` with no other edit."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_optimizers
import test_tasks
from examples.extending.lion import Lion
from examples.extending.rosenbrock import Rosenbrock
from helpers import ROOT, run_cli
from mesajax import registry
from mesajax.optimizers.base import make_context

ROSENBROCK = "examples.extending.rosenbrock:Rosenbrock"
LION = "examples.extending.lion:Lion"


@pytest.fixture
def registered(monkeypatch):
  """The one registry line each example needs."""
  monkeypatch.setitem(registry.TASKS, "rosenbrock", ROSENBROCK)
  monkeypatch.setitem(registry.OPTIMIZERS, "lion", LION)


def test_family_passes_the_shared_task_tests(registered):
  test_tasks.test_family_smoke("rosenbrock")
  test_tasks.test_non_finite_knobs_are_refused("rosenbrock")
  fam = registry.make_task_family("rosenbrock", {"dim": 3})
  task = fam.sample(jax.random.PRNGKey(0))
  assert float(fam.outer_loss_full(fam.oracle(task), task)) == pytest.approx(0.0, abs=1e-8)
  assert registry.task_kwargs("rosenbrock")["dim"] == 4  # config defaults come from the class


def test_optimizer_passes_the_shared_optimizer_tests(registered):
  opt = registry.make_optimizer("lion", {"learning_rate": 0.01})
  test_optimizers.test_as_optax_in_a_plain_optax_loop(opt)
  test_optimizers.test_no_recompile(opt)
  test_optimizers.test_learning_rate_contract(opt)
  test_optimizers.test_non_finite_options_are_refused("lion")


def test_lion_matches_optax():
  opt, ref = Lion(learning_rate=3e-3, b1=0.8, b2=0.95, weight_decay=0.1), None
  ref = optax.lion(3e-3, b1=0.8, b2=0.95, weight_decay=0.1)
  phi = opt.init_phi()
  p_ours = p_ref = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(4)}
  s_ours, s_ref = opt.init(phi, p_ours), ref.init(p_ref)
  for t in range(10):
    g = jax.tree.map(lambda x: jnp.cos(3.0 * x + t), p_ours)
    u_ours, s_ours = opt.update(phi, s_ours, g, p_ours, make_context(t, 10))
    u_ref, s_ref = ref.update(g, s_ref, p_ref)
    chex.assert_trees_all_close(u_ours, u_ref, rtol=1e-5, atol=1e-8)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)


def test_end_to_end_through_run_py(tmp_path):
  """Choosing the example family and optimizer by name brings their own defaults; train,
  evaluate, analyse and report run with no edit outside the two files."""
  workdir = str(tmp_path / "run")
  proc = run_cli("--config", os.path.join(ROOT, "configs", "quickstart.py") + ":smoke",
                 f"--config.task.name={ROSENBROCK}", f"--config.optimizer.name={LION}",
                 f"--config.eval.baselines=('{LION}',)", "--config.name=lion_meta",
                 # no shift and no controls: the main job's smoke test runs those paths
                 "--config.shifts={}", "--config.analysis.controls=()",
                 "--workdir", workdir, "--noprogress", timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]
  evals = {(r["optimizer"], r.get("role")) for r in rows if r["analysis"] == "eval"}
  assert ("lion_meta", "learned") in evals  # the run's meta-trained optimizer (its learning rate)
  assert (LION, "baseline") in evals and ("oracle", "oracle") in evals
  assert {"nci", "objective_fit"} <= {r["analysis"] for r in rows}
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["task"]["kwargs"]["dim"] == 4 and "noise" in config["task"]["kwargs"]
  assert os.path.exists(os.path.join(workdir, "report.md"))


def test_analysis_example_through_the_suite(monkeypatch):
  """The example analysis, registered with its one line, runs in the suite: plain gradient
  descent with rate η has effective step η and no variation."""
  import ml_collections
  from mesajax.analysis import suite
  from mesajax.splits import Split
  monkeypatch.setitem(registry.ANALYSES, "step_size", "examples.extending.step_size:step_size_stage")
  fam = registry.make_task_family("quadratic", {"dim": 4})
  opt = registry.make_optimizer("sgd", {"learning_rate": 0.1})
  acfg = ml_collections.ConfigDict({**suite.DEFAULTS, "num_tasks": 4, "num_steps": 8,
                                    "controls": (), "n_boot": 50})
  rows = suite.run_analyses(opt, opt.init_phi(), "sgd", {"heldout": Split("heldout", fam, 8)},
                            acfg, 0, stages=("step_size",))
  by = {r["metric"]: r for r in rows if r["analysis"] == "step_size"}
  assert by["effective_step"]["value"] == pytest.approx(0.1, rel=1e-5)
  assert by["effective_step_cv"]["value"] == pytest.approx(0.0, abs=1e-5)
