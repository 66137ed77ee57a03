"""In-context learners as mesa-optimizers.

A sequence model trained on a distribution of regression tasks maps a context of (x, y) pairs to a
prediction for a query; its forward pass may implement an optimizer of an inner objective (von
Oswald et al. 2023, "Transformers learn in-context by gradient descent"; Akyürek et al. 2022, "What
learning algorithm is in-context learning?"; Garg et al. 2022, "What can transformers learn
in-context?"). This package trains such models (``models``, ``train``) on the task family in
``data``, holds them against the algorithms they may implement (``references``), and measures which
inner objective they solve (``analysis``: prediction/sensitivity agreement, SPD, ILWD, the implied
ridge λ̂, linear probes) in distribution and under shift (``shifts``). ``pipeline`` exposes the
run stages; ``report`` turns result rows into a markdown section and figures. See docs/icl.md.
"""
