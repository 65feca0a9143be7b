"""Before/after tables: every metric of one or more compressed models against the dense baseline.

For each metric: absolute delta (compressed − dense), relative delta (delta / |dense|) and, for
accuracy-type scores only, **retention** = compressed / dense × 100 %. FinerCut and CD-MoE report
retention of the average accuracy ("keeps 90 % of the accuracy"); nobody reports a "retention" of
perplexity, size or speed, and a ratio there reads the wrong way round (lower perplexity is
better), so those rows show the deltas only — a relative delta of +26 % tokens/s is a 1.26×
speed-up, −50 % disk bytes halves the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from compresskit.evaluation.results import EvalResult
from compresskit.evaluation.task_sets import higher_is_better

RETENTION_NOTE = (
    "Retention = compressed / dense × 100, for accuracy-type metrics only (as FinerCut and CD-MoE "
    "report retention of average accuracy); perplexity, size and speed rows show Δ and relative Δ."
)

# Efficiency fields: (label, kind, higher is better)
_EFFICIENCY = {
    "params_total": ("parameters", "count", False),
    "params_decoder_linear": ("decoder-linear parameters", "count", False),
    "nonzeros_total": ("nonzero parameters", "count", False),
    "nonzeros_decoder_linear": ("decoder-linear nonzeros", "count", False),
    "disk_bytes": ("disk size", "bytes", False),
    "peak_memory_bytes": ("peak memory", "bytes", False),
    "prefill_tokens_per_s": ("prefill tokens/s", "speed", True),
    "decode_tokens_per_s": ("decode tokens/s", "speed", True),
}


@dataclass(frozen=True)
class Delta:
    """One compressed value against the baseline."""

    value: float | None
    delta: float | None = None
    rel_delta: float | None = None  # fraction: -0.10 is -10 %
    retention: float | None = None  # percent: 90.0 is 90 %


def delta(baseline: float | None, value: float | None, *, with_retention: bool) -> Delta:
    if value is None or baseline is None:
        return Delta(value)
    diff = value - baseline
    rel = diff / abs(baseline) if baseline != 0 else None
    retention = 100.0 * value / baseline if with_retention and baseline != 0 else None
    return Delta(value, diff, rel, retention)


@dataclass(frozen=True)
class MetricRow:
    key: str  # "ppl:wikitext2", "set:zeroshot7", "task:boolq", "eff:disk_bytes"
    label: str
    kind: str  # "perplexity" | "accuracy" | "lower-score" | "count" | "bytes" | "speed"
    higher_is_better: bool
    baseline: float | None
    others: tuple[Delta, ...]
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    baseline_label: str
    labels: tuple[str, ...]
    rows: tuple[MetricRow, ...]

    def row(self, key: str) -> MetricRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(key)


def _keys(results: tuple[EvalResult, ...], attr: str) -> list[str]:
    return list(dict.fromkeys(k for r in results for k in getattr(r, attr)))


def _row(key, label, kind, hib, base, values, *, retention, note="") -> MetricRow:
    others = tuple(delta(base, v, with_retention=retention) for v in values)
    return MetricRow(key, label, kind, hib, base, others, note)


def compare(baseline: EvalResult, *others: EvalResult) -> Comparison:
    """Rows for every metric any of the results has: perplexity, set means, tasks, efficiency."""
    everyone = (baseline, *others)
    rows: list[MetricRow] = []

    for ds in _keys(everyone, "perplexity"):
        runs = [r.perplexity.get(ds) for r in everyone]
        seqlens = {p.seqlen for p in runs if p is not None}
        note = "seqlen differs" if len(seqlens) > 1 else ""
        label = f"{ds} ppl" + (f" (seqlen {seqlens.pop()})" if len(seqlens) == 1 else "")
        values = [p.value if p else None for p in runs]
        rows.append(_row(f"ppl:{ds}", label, "perplexity", False, values[0], values[1:], retention=False, note=note))

    for name in _keys(everyone, "task_sets"):
        runs = [r.task_sets.get(name) for r in everyone]
        note = "" if all(s is not None and s.complete for s in runs) else "incomplete set"
        if not note and len({tuple(s.tasks) for s in runs}) > 1:
            note = "different tasks"
        values = [s.mean if s else None for s in runs]
        rows.append(
            _row(f"set:{name}", f"{name} mean", "accuracy", True, values[0], values[1:], retention=True, note=note)
        )

    for name in _keys(everyone, "tasks"):
        runs = [r.tasks.get(name) for r in everyone]
        metric = next(t.metric for t in runs if t is not None)
        hib = higher_is_better(metric)
        values = [t.metric_value(metric) if t else None for t in runs]
        protocols = {(t.fewshot, t.limit) for t in runs if t is not None}
        note = "fewshot/limit differ" if len(protocols) > 1 else ""
        kind = "accuracy" if hib else "lower-score"
        rows.append(
            _row(f"task:{name}", f"{name} {metric}", kind, hib, values[0], values[1:], retention=hib, note=note)
        )

    for field, (label, kind, hib) in _EFFICIENCY.items():
        values = [getattr(r.efficiency, field) if r.efficiency else None for r in everyone]
        if all(v is None for v in values):
            continue
        note = ""
        if kind == "speed":
            devices = {r.efficiency.timing_device for r in everyone if r.efficiency and r.efficiency.timing_device}
            note = "timed on different devices" if len(devices) > 1 else ""
        rows.append(_row(f"eff:{field}", label, kind, hib, values[0], values[1:], retention=False, note=note))

    return Comparison(baseline.label, tuple(o.label for o in others), tuple(rows))


# ----------------------------------------------------------------------------- formatting
def _scaled(v: float, units: tuple[str, ...], base: float) -> tuple[float, str]:
    for unit in units[:-1]:
        if v < base:
            return v, unit
        v /= base
    return v, units[-1]


def format_value(kind: str, v: float | None, *, signed: bool = False) -> str:
    if v is None:
        return "–"
    sign = "+" if signed else ""
    if kind == "accuracy":
        return f"{v:{sign}.4f}"
    if kind in ("perplexity", "lower-score"):
        return f"{v:{sign}.3f}"
    if kind == "speed":
        return f"{v:{sign}.1f}"
    if kind == "bytes":
        mag, unit = _scaled(abs(v), ("B", "KiB", "MiB", "GiB", "TiB"), 1024.0)
        text = f"{int(mag)} B" if unit == "B" else f"{mag:.2f} {unit}"
    else:  # count
        mag, unit = _scaled(abs(v), ("", "K", "M", "B"), 1000.0)
        text = f"{int(mag)}" if unit == "" else f"{mag:.2f}{unit}"
    return ("-" if v < 0 else "+" if signed and v > 0 else "") + text


def format_percent(v: float | None, *, signed: bool) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%" if signed else f"{v:.1f}%"


def _cells(row: MetricRow) -> list[str]:
    cells = [row.label + (f" ({row.note})" if row.note else ""), format_value(row.kind, row.baseline)]
    for d in row.others:
        cells += [
            format_value(row.kind, d.value),
            format_value(row.kind, d.delta, signed=True),
            format_percent(d.rel_delta, signed=True),
            format_percent(d.retention, signed=False),
        ]
    return cells


def _header(comparison: Comparison) -> list[str]:
    head = ["metric", f"{comparison.baseline_label} (baseline)"]
    for label in comparison.labels:
        head += [label, "Δ", "Δ rel", "retention"]
    return head


def render_markdown(comparison: Comparison) -> str:
    head = _header(comparison)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in comparison.rows]
    return "\n".join(lines) + f"\n\n{RETENTION_NOTE}\n"


def render_table(comparison: Comparison):
    """The same table as a ``rich.table.Table`` for the terminal."""
    from rich.table import Table

    table = Table(title="compresskit comparison", caption=RETENTION_NOTE)
    for i, name in enumerate(_header(comparison)):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in comparison.rows:
        table.add_row(*_cells(row))
    return table
