"""``compresskit inspect CKPT --plot removed.png``: which sublayers FinerCut removed, in which order;
for EvoPress (``plot_evopress``) the chosen level per unit and the fitness per generation.

Left: one row per original block, two columns (attention, MLP); a removed sublayer is coloured
by the step it went at and labelled with it. Right: the distance after each step. Drawn only
from the manifest (``details["per_layer"]`` and ``details["order"]``), never from weights.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..outputs import save_png
from .report import PARAM_BASIS, param_fraction


def plot_removed(details: dict, path: str | Path, title: str = "") -> Path:
    """Draw the removal record to the PNG ``path`` (checked first with ``OutputGuard.png``: it is
    written as compresskit's own plot, atomically, a write failure one ``OutputError`` line)."""
    rows = details.get("per_layer")
    order = details.get("order")
    if not isinstance(rows, list) or not isinstance(order, list):
        raise InputError("this checkpoint has no FinerCut removal record to plot (per_layer / order missing)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rows)
    steps = max([len(order), 1])
    grid = np.full((n, 2), np.nan)
    for r in rows:
        for j, key in enumerate(("attention", "mlp")):
            if r.get(key) is not None:
                grid[r["block"], j] = r[key]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, max(3.0, 0.22 * n + 1.5)),
                                  gridspec_kw={"width_ratios": [1, 1.6]})
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#eeeeee")
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=1, vmax=steps, interpolation="nearest")
    for i in range(n):
        for j in range(2):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, str(int(grid[i, j])), ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks([0, 1], ["attention", "MLP"])
    ax.set_yticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_ylabel("block (original index)")
    ax.set_title("removal step (grey: kept)", fontsize=9)
    xs = [o["step"] for o in order]
    ax2.plot(xs, [o["distance"] for o in order], marker="o", ms=3)
    for o in order:
        ax2.annotate(f"{o['type']}{o['block']}", (o["step"], o["distance"]), fontsize=6,
                     xytext=(2, 3), textcoords="offset points")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"{details.get('distance', 'distance')}" + (f" ({details['js_form']} form)" if details.get("js_form") else ""))
    ax2.set_title(f"{details.get('level')} level: {details.get('removed')} removed, "
                  f"{param_fraction(details):.1%} of {PARAM_BASIS}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return save_png(fig, Path(path), dpi=120, flag="--plot")
    finally:
        plt.close(fig)


def plot_evopress(details: dict, path: str | Path, title: str = "") -> Path:
    """``inspect --plot`` for an EvoPress checkpoint: the level chosen per unit and the fitness per
    generation, drawn from the manifest only.

    Left: a depth search (``details["search"] == "depth"``) shows one row per original block,
    attention and MLP columns, removed sublayers dark (a deleted block labelled so); a sparsity
    search shows the chosen sparsity of every matrix as a block × matrix heat map. Right: the
    parent's KL after every generation (log scale when positive), each seed's starting fitness as
    a dashed line, the winning seed named."""
    history = details.get("history", details.get("fitness_history"))  # depth / sparsity search
    if not isinstance(history, list):
        raise InputError("this checkpoint has no EvoPress search record to plot (history missing)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    depth = details.get("search") == "depth"
    if depth:
        rows = details.get("per_layer")
        if not isinstance(rows, list):
            raise InputError("this EvoPress checkpoint has no per-block removal record to plot (per_layer missing)")
        n = len(rows)
        grid = np.zeros((n, 2))
        for r in rows:
            for j, key in enumerate(("attention", "mlp")):
                if r.get(key) is not None:
                    grid[r["block"], j] = 1.0
                elif key in (r.get("removed_before") or []):
                    grid[r["block"], j] = 0.5
        cols, ylabels = ["attention", "MLP"], [str(i) for i in range(n)]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, max(3.0, 0.22 * n + 1.5)), gridspec_kw={"width_ratios": [1, 1.6]})
        ax.imshow(grid, aspect="auto", cmap=matplotlib.colormaps["Greys"], vmin=0, vmax=1.15, interpolation="nearest")
        for r in rows:
            for j, key in enumerate(("attention", "mlp")):
                if r.get(key) is not None:
                    ax.text(j, r["block"], "removed", ha="center", va="center", fontsize=6, color="white")
            if r.get("new_index") is None:
                ax.text(1.55, r["block"], "deleted", ha="left", va="center", fontsize=6, clip_on=False)
        ax.set_title(f"{details.get('level')} level: {details.get('attention_removed')} attention, "
                     f"{details.get('mlp_removed')} MLP removed", fontsize=9)
        ax.set_ylabel("block (original index)")
    else:
        per_matrix = details.get("sparsity_per_matrix")
        if not isinstance(per_matrix, dict) or not per_matrix:
            raise InputError("this EvoPress checkpoint has no per-matrix level record to plot (sparsity_per_matrix missing)")
        units, levels = list(per_matrix), list(per_matrix.values())
        blocks: dict[int, dict[str, float]] = {}
        cols = []
        for name, value in zip(units, levels):
            block, kind = _block_and_matrix(name)
            blocks.setdefault(block, {})[kind] = float(value)
            if kind not in cols:
                cols.append(kind)
        order = sorted(blocks)
        grid = np.full((len(order), len(cols)), np.nan)
        for i, b in enumerate(order):
            for j, kind in enumerate(cols):
                grid[i, j] = blocks[b].get(kind, np.nan)
        n, ylabels = len(order), [str(b) for b in order]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.22 * n + 1.5)), gridspec_kw={"width_ratios": [1.2, 1.6]})
        lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
        if hi - lo < 1e-6:  # one level everywhere: a band around it
            lo, hi = lo - 0.05, hi + 0.05
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=matplotlib.colormaps["magma_r"],
                          vmin=lo, vmax=hi, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="sparsity")
        achieved = details.get("achieved_sparsity")
        ax.set_title("chosen sparsity per matrix" + (f" (overall {achieved:.3f})" if isinstance(achieved, float) else ""),
                     fontsize=9)
        ax.set_ylabel("block")
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=45 if len(cols) > 2 else 0)
    ax.set_yticks(range(n), ylabels, fontsize=7)
    gens = [h["generation"] for h in history]
    values = [h["best_fitness"] for h in history]
    seeds = details.get("seed_fitness") or {}
    ax2.plot(gens, values, marker="o", ms=2, label="search (parent)")
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, value) in enumerate(sorted(seeds.items(), key=lambda kv: kv[1])[:6]):
        ax2.axhline(value, ls="--", lw=0.8, color=cycle[(i + 1) % len(cycle)], label=f"seed {name}: {value:.3g}")
    positive = [v for v in [*values, *seeds.values()] if v and v > 0]
    if positive and len(positive) == len([v for v in [*values, *seeds.values()] if v is not None]):
        ax2.set_yscale("log")
    ax2.set_xlabel("generation")
    ax2.set_ylabel("KL to dense (last stage)")
    ax2.set_title(f"final {details.get('final_fitness', float('nan')):.4g}, line of seed "
                  f"{details.get('seed_winner')!s}, {details.get('tokens_seen', 0):,} tokens scored", fontsize=9)
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return save_png(fig, Path(path), dpi=120, flag="--plot")
    finally:
        plt.close(fig)


def _block_and_matrix(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` → (3, ``q_proj``); a name without a block index → (-1, name)."""
    import re

    match = re.search(r"\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name.rsplit(".", 1)[-1])
