"""The choices of CD-MoE's options, importable without torch for option checks (the maths modules
``condense``, ``stats`` and ``search`` use the same tuples)."""

#: how the condensed layer mixes the shared experts (methods.md §7.2)
SHARED_GATE_MODES = ("exact", "constant")
#: CD-MoE's constant per kept expert (methods.md §7.1): the paper's mean over the expert's own
#: tokens, or the mean over all tokens of the layer (an expert's weight counted as 0 where not routed)
EXPERT_WEIGHTS = ("routed", "unconditional")
#: when the greedy expert search stops: at the budget (the reference) or when D stops improving
EXPERT_STOPS = ("budget", "objective")
