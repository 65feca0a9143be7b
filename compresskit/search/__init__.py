"""Measured searches over per-unit compression levels (EvoPress).

``evolution`` is the pure search (level vectors, mutation, multi-stage selection, resumable state);
``database`` / ``fitness`` / ``sparsity`` build and score sparsity levels on our engine;
``depth`` does the same for sublayer / block removal genes.
"""
