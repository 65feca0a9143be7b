"""Evaluation: perplexity (papers' protocol), sparsity, lm-eval, efficiency, results and comparisons."""
