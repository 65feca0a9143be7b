"""Depth pruning (FinerCut, EvoPress's depth search): candidate sublayers, the greedy search,
physical removal of sublayers and blocks, their checkpoint form (``finish.py``, shared by both
methods), and the removal plot. Math and modules only; the registered methods are
``methods/finercut.py`` and ``methods/evopress.py`` (whose depth search is ``search/depth.py``)."""
