"""CLI commands beyond prune / eval / inspect, one module each.

Each module defines ``register(app)`` adding its Typer command(s); ``compresskit.cli`` calls it
for every name listed here, so adding a command never edits another command's code.
"""

COMMAND_MODULES: list[str] = ["analyze", "finetune", "compare", "run", "heal"]
