"""The shift suite: named task-knob overrides evaluated beside the training distribution.

Each shift changes one property of the test tasks (Garg et al. 2022, §4; Akyürek et al. 2022);
references stay fitted on the training distribution, like the model:

===================  =========================================================================
shift                test tasks
===================  =========================================================================
noise_x2             label noise σ doubled (σ = 0.5 when training was noiseless); λ* moves
input_scale_x3       every input scaled by 3 (Garg et al.: transformers fail badly)
weight_scale_x2      prior scale τ doubled (larger weights); λ* = σ²/τ² moves
skewed_cov           input covariance eigenvalues log-spaced in [1, 100] (mean 1)
context_x2           twice the training context length N
orthant              every input in the positive orthant (|x|)
short_context        N = ⌊d/2⌋: the companion of query_orthogonal (same N, iid query)
query_orthogonal     N = ⌊d/2⌋ and x_q orthogonal to every context input (the context says
                     nothing about wᵀx_q: the Bayes prediction is 0)
query_in_context     x_q equal to a context input (fresh label noise)
===================  =========================================================================
"""
from __future__ import annotations


def suite(task: dict) -> dict:
  """``{shift: {knob: value}}`` for a training task's knobs ``task`` (a dict)."""
  d, n = int(task["d"]), int(task["N"])
  sigma, tau = float(task["sigma"]), float(task["tau"])
  short = max(1, d // 2)
  return {
      "noise_x2": {"sigma": 2 * sigma if sigma > 0 else 0.5},
      "input_scale_x3": {"input_scale": 3.0 * float(task["input_scale"])},
      "weight_scale_x2": {"tau": 2 * tau},
      "skewed_cov": {"input_cond": 100.0},
      "context_x2": {"N": 2 * n},
      "orthant": {"orthant": True},
      "short_context": {"N": short},
      "query_orthogonal": {"N": short, "query": "orthogonal"},
      "query_in_context": {"query": "context_point"},
  }
