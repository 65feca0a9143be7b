"""Mixture-of-Experts compression maths: routing statistics, CD-MoE condensation and search, REAP removal."""
