"""``analyze --metric experts``: per-layer expert usage, CD-MoE's avg_w and REAP's saliency.

One calibration pass (``stats.collect_expert_stats``) over the unmodified model. The report's
``per_block`` series (one value per decoder block, None for dense blocks) summarise each MoE
layer: the share of routed picks taken by its busiest expert, the number of experts never routed
to, and the mean avg_w / saliency; ``per_expert`` holds every (layer, expert) figure. The plot
shows three heat maps (token share, avg_w, saliency) of layer × expert.
"""

from __future__ import annotations

from pathlib import Path

from ..analyze import register_metric
from ..errors import InputError
from .stats import collect_expert_stats


@register_metric("experts", options=("plot",))
def expert_report(job, options: dict) -> dict:
    adapter = job.adapter
    if not any(adapter.is_moe(i) for i in range(adapter.num_blocks)):
        raise InputError(f"{adapter.family} model has no MoE layers; --metric experts needs a Mixture-of-Experts model")
    calib = job.calibration_data()
    stats = collect_expert_stats(adapter, calib.input_ids, calib.attention_mask, device=job.device,
                                 batch_size=job.batch_size)
    n = adapter.num_blocks
    busiest, unused, mean_w, mean_sal = ([None] * n for _ in range(4))
    per_expert = {}
    for i, s in stats.items():
        total = float(s.count.sum())
        busiest[i] = float(s.count.max()) / total if total else None
        unused[i] = int((s.count == 0).sum())
        routed = s.count > 0
        mean_w[i] = float(s.avg_w[routed].mean()) if routed.any() else None
        mean_sal[i] = float(s.saliency[routed].mean()) if routed.any() else None
        per_expert[str(i)] = s.to_dict()
    report = {
        "metric": "experts",
        "config": {"nsamples": int(calib.input_ids.shape[0]), "seqlen": int(calib.input_ids.shape[1])},
        "sparsity": None,
        "per_block": {"busiest_expert_share": busiest, "unused_experts": unused,
                      "mean_avg_w": mean_w, "mean_saliency": mean_sal},
        "per_expert": per_expert,
    }
    plot = options.get("plot")
    if plot is not None:
        plot_experts(report, Path(plot), getattr(job.model.config, "_name_or_path", ""))
        report["plot"] = str(plot)
    return report


def plot_experts(report: dict, path: Path, title: str = "") -> None:
    """Heat maps (MoE layer × expert) of token share, avg_w and REAP saliency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(report["per_expert"], key=int)
    panels = [("token share", lambda s: np.array(s["count"]) / max(1, sum(s["count"]))),
              ("avg_w", lambda s: np.array(s["avg_w"])), ("REAP saliency", lambda s: np.array(s["saliency"]))]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 + 0.45 * len(layers) * len(panels)), squeeze=False)
    for ax, (name, fn) in zip(axes[:, 0], panels):
        grid = np.stack([fn(report["per_expert"][k]) for k in layers])
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"block {k}" for k in layers])
        ax.set_xlabel("expert")
        ax.set_title(name)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"experts — {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from .. import analyze as analyze_module

    metadata = getattr(analyze_module, "PNG_METADATA", None)
    fig.savefig(path, dpi=110, **({"metadata": metadata} if metadata else {}))
    plt.close(fig)
