"""``compresskit analyze --metric spectrum``: WeLore's view of a model, nothing modified.

For every matrix WeLore would target (methods.md §6.1-6.3): its singular values normalised to
[0, 1] (σ̂, sampled at evenly spaced rank positions), the ranks the global τ prunes at the given
rank reduction, whether it would become a low-rank component, and per block the fraction of
rank kept. ``--plot`` draws every matrix's σ̂ curve (coloured by kind: q_proj, down_proj, ...)
with τ as a horizontal line: matrices whose curve falls below τ early lose the most rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compresskit.analyze import register_metric
from compresskit.lowrank.plan import (
    DEFAULT_MIN_RATIO,
    WELORE_TAU_TABLE,
    WeLorePlan,
    _check_min_ratio,
    _matrix_plan,
    find_global_tau,
    normalised_spectrum,
    ranks_pruned,
)

DEFAULT_RANK_REDUCTION = 0.5
DEFAULT_PROFILE_POINTS = 33


def profile_positions(full_rank: int, points: int) -> list[int]:
    """``points`` rank indices spread evenly over [0, full_rank − 1], both ends included."""
    if full_rank == 1 or points <= 1:
        return [0]
    points = min(points, full_rank)
    return [round(j * (full_rank - 1) / (points - 1)) for j in range(points)]


def preview_plan(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], rank_reduction: float,
                 min_ratio: float) -> WeLorePlan:
    """The WeLore plan at ``rank_reduction``, also when no matrix qualifies (then all stay dense).

    ``plan_ranks`` refuses a plan that factorises nothing, since pruning with it would be a no-op;
    an analysis should still show the spectra and how far from the LRC rule they are.
    """
    _check_min_ratio(min_ratio)
    tau = find_global_tau(spectra, rank_reduction)
    matrices = [_matrix_plan(n, shapes[n], ranks_pruned(spectra[n], tau), min_ratio) for n in spectra]
    return WeLorePlan("welore", tau, rank_reduction, min_ratio, matrices)


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str, block_names: list[str]) -> int:
    for i, prefix in enumerate(block_names):
        if name.startswith(prefix + "."):
            return i
    raise ValueError(f"{name} is in no decoder block")


def per_block_fractions(plan: WeLorePlan, blocks: list[int], num_blocks: int) -> dict[str, list[float | None]]:
    """Σ kept / Σ full rank per block: applied (only LRCs lose rank) and planned (τ everywhere)."""
    kept, planned, full = [0] * num_blocks, [0] * num_blocks, [0] * num_blocks
    lowrank = [0] * num_blocks
    for p, b in zip(plan.matrices, blocks):
        kept[b] += p.kept_rank
        planned[b] += p.planned_rank
        full[b] += p.full_rank
        lowrank[b] += int(p.is_lowrank)
    return {
        "kept_rank_fraction": [k / f if f else None for k, f in zip(kept, full)],
        "planned_rank_fraction": [k / f if f else None for k, f in zip(planned, full)],
        "lowrank_matrices": [c if f else None for c, f in zip(lowrank, full)],
    }


def _validate(config_cls, rank_reduction: float, min_ratio: float) -> None:
    """The same checks (and one-line messages) as ``prune --method welore``."""
    from compresskit.methods import get_method

    get_method("welore").make_config({"rank_reduction": rank_reduction, "min_ratio": min_ratio},
                                     context="--metric spectrum")


@register_metric("spectrum", options=("rank_reduction", "min_ratio", "profile_points", "plot"))
def spectrum_metric(job, options: dict) -> dict:
    """Per-matrix normalised spectra and the WeLore rank plan they give (options: rank_reduction,
    min_ratio, profile_points, plot)."""
    from compresskit.methods.welore import WeLoreConfig, welore_spectra

    rank_reduction = options.get("rank_reduction")
    rank_reduction = DEFAULT_RANK_REDUCTION if rank_reduction is None else rank_reduction
    min_ratio = options.get("min_ratio")
    min_ratio = DEFAULT_MIN_RATIO if min_ratio is None else min_ratio
    _validate(WeLoreConfig, rank_reduction, min_ratio)
    points = int(options.get("profile_points") or DEFAULT_PROFILE_POINTS)

    spectra, shapes = welore_spectra(job)
    plan = preview_plan(spectra, shapes, rank_reduction, min_ratio)
    block_names = [job.adapter.block_name(i) for i in range(job.adapter.num_blocks)]
    blocks = [_block_of(p.name, block_names) for p in plan.matrices]
    per_matrix = {}
    for p, b in zip(plan.matrices, blocks):
        sigma = spectra[p.name]
        normalised = normalised_spectrum(sigma)
        positions = profile_positions(p.full_rank, points)
        per_matrix[p.name] = {
            "block": b,
            "kind": _kind(p.name),
            "shape": list(p.shape),
            "sigma_max": float(sigma.max()),
            "sigma_min": float(sigma.min()),
            "full_rank": p.full_rank,
            "pruned": p.pruned,
            "planned_rank": p.planned_rank,
            "kept_rank": p.kept_rank,
            "lowrank": p.is_lowrank,
            "profile_rank": positions,
            "profile": [float(normalised[i]) for i in positions],
        }
    summary = {k: v for k, v in plan.summary().items() if k != "matrices"}
    percent = round(rank_reduction * 100)
    report = {
        "metric": "spectrum",
        "config": {"rank_reduction": rank_reduction, "min_ratio": min_ratio, "profile_points": points},
        "tau": plan.tau,
        "tau_llama2_table": WELORE_TAU_TABLE.get(percent) if abs(percent - rank_reduction * 100) < 1e-9 else None,
        "plan": summary,
        "per_block": per_block_fractions(plan, blocks, len(block_names)),
        "per_matrix": per_matrix,
    }
    if options.get("plot"):
        title = getattr(getattr(job.model, "config", None), "_name_or_path", "")
        plot_spectra(spectra, report, Path(options["plot"]), title)
        report["plot"] = str(options["plot"])
    return report


def plot_spectra(spectra: dict[str, torch.Tensor], report: dict, path: Path, title: str = "") -> None:
    """σ̂ against relative rank position for every matrix (colour = kind, dashed line = τ), and the
    kept-rank fraction per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = sorted({m["kind"] for m in report["per_matrix"].values()})
    colours = {k: plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")(i) for i, k in enumerate(kinds)}
    fig, (curves, bars) = plt.subplots(2, 1, figsize=(9, 8), gridspec_kw={"height_ratios": [3, 1.3]})
    for name, sigma in spectra.items():
        s = normalised_spectrum(sigma)
        xs = torch.linspace(0, 1, s.numel()) if s.numel() > 1 else torch.zeros(1)
        curves.plot(xs.numpy(), s.numpy(), color=colours[report["per_matrix"][name]["kind"]], lw=0.8, alpha=0.45)
    for kind, colour in colours.items():
        curves.plot([], [], color=colour, label=kind)
    if report["tau"] is not None:
        curves.axhline(report["tau"], color="black", ls="--", lw=1, label=f"τ = {report['tau']:.4f}")
    curves.set_xlabel("rank position / (min(m, n) − 1)")
    curves.set_ylabel("normalised σ̂")
    curves.legend(fontsize=7, ncol=2)
    fractions = report["per_block"]
    xs = [i for i, v in enumerate(fractions["kept_rank_fraction"]) if v is not None]
    bars.bar(xs, [fractions["kept_rank_fraction"][i] for i in xs], color="tab:blue", label="kept (applied)")
    bars.plot(xs, [fractions["planned_rank_fraction"][i] for i in xs], "o-", color="tab:orange", ms=3,
              label="kept if every matrix were factorised")
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_xlabel("block")
    bars.set_ylabel("rank fraction")
    bars.legend(fontsize=7)
    config = report["config"]
    fig.suptitle(f"WeLore spectra — {title} (rank reduction {config['rank_reduction']:g}, "
                 f"min ratio {config['min_ratio']:g})")
    fig.tight_layout()
    from compresskit.analyze import save_figure  # marks the PNG as compresskit's, one-line errors

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
