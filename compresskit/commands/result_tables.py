"""Terminal tables shared by ``eval``, ``compare`` and ``run`` (not a command module itself)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from compresskit.evaluation.checks import CheckOutcome
from compresskit.evaluation.compare import compare, format_value
from compresskit.evaluation.results import EvalResult


def result_table(result: EvalResult, title: str | None = None) -> Table:
    """One result: metric | value | protocol notes (seqlen, windows, metric key, timing device)."""
    table = Table(title=title or f"evaluation of {result.model.path or result.label}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("details")
    for row in compare(result).rows:
        table.add_row(row.label, format_value(row.kind, row.baseline), _details(result, row.key))
    return table


def _details(result: EvalResult, key: str) -> str:
    kind, _, name = key.partition(":")
    if kind == "ppl":
        p = result.perplexity[name]
        return f"{p.n_windows} windows × {p.seqlen}, join {p.join}"
    if kind == "task":
        t = result.tasks[name]
        return f"v{t.version} · {t.fewshot}-shot · n={t.n} · limit {t.limit}"
    if kind == "set":
        s = result.task_sets[name]
        return "complete" if s.complete else f"incomplete: {len(s.tasks)} tasks"
    if kind == "eff" and result.efficiency is not None and key.endswith("tokens_per_s"):
        return f"{result.efficiency.timing_device} timing"
    if key == "eff:peak_memory_bytes" and result.efficiency is not None:
        return result.efficiency.peak_memory_kind or ""
    return ""


def checks_table(checks: list[CheckOutcome]) -> Table:
    table = Table(title="checks")
    for name, justify in (("metric", "left"), ("rule", "left"), ("threshold", "right"), ("observed", "right"),
                          ("result", "left")):
        table.add_column(name, justify=justify)
    for c in checks:
        observed = f"{c.observed:.6g}" + (f" ({c.value:.6g} / {c.baseline:.6g})" if c.baseline is not None else "")
        table.add_row(c.metric, c.rule, f"{c.threshold:g}", observed,
                      Text("pass", style="green") if c.passed else Text("FAIL", style="bold red"))
    return table
