"""Per-layer statistics without pruning: what OWL / AlphaPruning would see and allocate.

``analyze(model, "owl")`` runs OWL's first pass (dense model, Wanda statistics) and reports the
outlier ratio D per block plus the allocation it implies; ``"alpha"`` reports the Hill α of every
decoder linear, the block means and the AlphaPruning allocation. Other metrics register with
``register_metric`` (WeLore's singular-value profiles do).

``plot`` (and the spectrum metric's ``options["plot"]``) is a PNG file: a name without a suffix
gets ``.png`` (the report says the real path), a directory or another suffix is refused, and the
path is checked with ``outputs.OutputGuard`` (not an input, writable, not a foreign file) before
anything is loaded or computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import InputError
from .outputs import PNG_METADATA, OutputGuard, save_png  # noqa: F401 - PNG_METADATA: plotting modules read it here

_METRICS: dict[str, Callable[..., dict]] = {}

#: Every metric and the options it reads, declared here without torch so that ``--metric nope`` or an
#: option the metric does not read answers before anything heavy is imported. The modules that
#: register a metric (``register_metric``) must declare the same options (a test checks).
METRIC_OPTIONS: dict[str, tuple[str, ...]] = {
    "owl": ("owl_m", "owl_lambda"),
    "alpha": ("alpha_epsilon", "alpha_metric", "alpha_mapping"),
    "spectrum": ("rank_reduction", "min_ratio", "profile_points", "plot"),
    "experts": ("plot",),
}

#: The method whose config validates a metric's options before the model is loaded.
_METRIC_CONFIG = {"owl": "owl", "alpha": "alphapruning"}


def register_metric(name: str, options: tuple[str, ...] = ()):
    """Register ``fn(job, options)`` as ``--metric name``; ``options`` are the keys it reads (any other
    option given is refused before the model is loaded, never silently ignored)."""
    declared = METRIC_OPTIONS.setdefault(name, tuple(options))
    if set(declared) != set(options):  # a programming error: the torch-free declaration is stale
        raise RuntimeError(f"metric {name!r} reads {sorted(options)} but analyze.METRIC_OPTIONS declares {sorted(declared)}")

    def deco(fn):
        _METRICS[name] = fn
        return fn

    return deco


def available_metrics() -> list[str]:
    _load_metric_modules()
    return sorted(_METRICS)


def check_metric_options(metric: str, sparsity: float | None, options: dict) -> None:
    """Everything the option values alone decide, one line each, without torch: the metric, the
    preview sparsity, options the metric does not read, and their values (the method's config)."""
    if metric not in METRIC_OPTIONS:
        raise InputError(f"unknown metric '{metric}'; choose one of: {', '.join(sorted(METRIC_OPTIONS))}")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise InputError(f"--sparsity must be in [0, 1), got {sparsity}")
    stray = [k for k, v in options.items() if v is not None and k not in METRIC_OPTIONS[metric]]
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise InputError(f"{flags} {'does' if len(stray) == 1 else 'do'} not apply to --metric {metric}")
    if metric in _METRIC_CONFIG:
        from .methods import get_method  # pydantic configs only (methods/*.py import no torch)

        get_method(_METRIC_CONFIG[metric]).make_config(options, context=f"--metric {metric}")


def _load_metric_modules() -> None:
    import importlib

    for module in ("compresskit.lowrank.analyze", "compresskit.moe.analyze"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            pass


@register_metric("owl", options=("owl_m", "owl_lambda"))
def _owl(job, options: dict) -> dict:
    from .allocation.owl import allocate_owl
    from .methods import get_method
    from .methods.owl import block_params, outlier_ratios

    cfg = get_method("owl").make_config(options, context="--metric owl")
    D = outlier_ratios(job, cfg.owl_m)
    active = [d for d in D if d is not None]
    sizes = [n for d, n in zip(D, block_params(job)) if d is not None]  # weighted as --method owl weights them
    ratios = allocate_owl(active, job.sparsity, cfg.owl_lambda, sizes) if job.sparsity is not None else None
    return {
        "metric": "owl",
        "config": cfg.model_dump(),
        "sparsity": job.sparsity,
        "per_block": {"outlier_ratio_D": D, "owl_sparsity": ratios},
    }


@register_metric("alpha", options=("alpha_epsilon", "alpha_metric", "alpha_mapping"))
def _alpha(job, options: dict) -> dict:
    from .allocation.alpha import allocate_alpha
    from .methods import get_method
    from .methods.alphapruning import matrix_alphas

    cfg = get_method("alphapruning").make_config(options, context="--metric alpha")
    names, blocks, numels, alphas = matrix_alphas(job, cfg.alpha_metric)
    n = job.adapter.num_blocks
    block_alpha = []
    for b in range(n):
        vals = [a for a, bb in zip(alphas, blocks) if bb == b]
        block_alpha.append(sum(vals) / len(vals) if vals else None)
    ratios = None
    if job.sparsity is not None:
        per_matrix = allocate_alpha(alphas, blocks, numels, job.sparsity, cfg.alpha_epsilon, cfg.alpha_mapping)
        ratios = []
        for b in range(n):
            pairs = [(s, r) for s, r, bb in zip(numels, per_matrix, blocks) if bb == b]
            ratios.append(sum(s * r for s, r in pairs) / sum(s for s, _ in pairs) if pairs else None)
    return {
        "metric": "alpha",
        "config": cfg.model_dump(),
        "sparsity": job.sparsity,
        "per_block": {"alpha_mean": block_alpha, "alphapruning_sparsity": ratios},
        "per_matrix": {"alpha": dict(zip(names, alphas))},
    }


def analyze(model: str | Any, metric: str, *, sparsity: float | None = 0.7, options: dict | None = None,
            plot: str | Path | None = None, tokenizer=None, **job_kwargs) -> dict:
    """Compute a per-layer metric of ``model`` (nothing is modified) and optionally plot it."""
    options = dict(options or {})
    check_metric_options(metric, sparsity, options)
    inputs = [model if isinstance(model, str) else None, job_kwargs.get("calib")]
    if plot is not None:
        plot = check_plot_path(plot, inputs)
    if options.get("plot") is not None:
        options["plot"] = check_plot_path(options["plot"], inputs)
    from .api import build_job  # torch and transformers: after every check of the options

    _load_metric_modules()
    job = build_job(model, tokenizer=tokenizer, sparsity=sparsity, **job_kwargs)
    report = _METRICS[metric](job, options)
    if job._calibration_fitted:  # the calibration length used (an unset --seqlen fitted to the model)
        report["calibration_seqlen"] = job.calibration.seqlen
        if job.seqlen_default is not None:
            report["calibration_seqlen_default"] = job.seqlen_default
    report["model"] = model if isinstance(model, str) else getattr(job.model.config, "_name_or_path", "in-memory")
    report["blocks"] = [job.adapter.block_name(i) for i in range(job.adapter.num_blocks)]
    if plot is not None:
        plot_report(report, plot)
        report["plot"] = str(plot)
    return report


def check_plot_path(plot: str | Path, inputs=()) -> Path:
    """The PNG file ``--plot`` will write, refused with one line before any compute when it is a
    directory, not a PNG name, an input, a file compresskit did not write, or not writable
    (``OutputGuard.png``, the guard ``inspect --plot`` uses too)."""
    return OutputGuard(inputs).png(plot, flag="--plot")


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG marked as compresskit's; a write failure is one ``OutputError`` line."""
    save_png(fig, path, dpi=110, flag="--plot")


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in report["per_block"].items() if v is not None}
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.6 * len(series)), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [values[i] for i in xs], color="tab:blue")
        ax.set_ylabel(name)
        ax.set_xlabel("block")
    fig.suptitle(f"{report['metric']} — {report.get('model', '')}")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
