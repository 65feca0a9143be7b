"""The choices of the output distances (``distances.py``), importable without torch for option checks."""

DISTANCES = ("js", "angular", "kl", "norm")
JS_FORMS = ("code", "textbook")
