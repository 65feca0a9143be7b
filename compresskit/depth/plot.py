"""``compresskit inspect CKPT --plot removed.png``: which sublayers FinerCut removed, in which order.

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
