"""Depth pruning (FinerCut): candidate sublayers, the greedy search, physical removal of
sublayers and blocks, their checkpoint form, and the removal plot. Math and modules only; the
registered method is ``methods/finercut.py``."""
