"""Run the reference pruning code (locuslab/wanda ``prune_wanda``, luuyin/OWL ``prune_wanda_outlier``)
on the benchmark's model and calibration tokens, for speed ratios measured in the same job.

We may not commit their code. Fetch it once into one directory and pass ``--reference-dir``:

    cd benchmarks && mkdir -p refs     # benchmarks/refs/ is git-ignored
    git clone https://github.com/locuslab/wanda refs/wanda && git -C refs/wanda checkout 8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6
    git clone https://github.com/luuyin/OWL refs/OWL && git -C refs/OWL checkout dddb7a4bffe27c73e4c8cf692b3a5e36401532c8
    cd .. && python benchmarks/speed_llama7b.py --reference-dir benchmarks/refs

Only ``lib/`` of each checkout is used (a GPU machine without network can be handed just
``benchmarks/refs/wanda/lib`` and ``benchmarks/refs/OWL/lib``, a few hundred KB).

Each repository's ``lib/`` (no ``__init__.py``) is imported as its own package (``ref_wanda``,
``ref_owl``: both call it ``lib``). Only what the references cannot do on transformers ≥ 5 or
offline is adapted, the pruning code itself runs unchanged:

* ``get_loaders("c4", ...)`` is replaced by the benchmark's token tensor (same samples as ours);
* ``model.hf_device_map = {}`` and ``model.seqlen`` are set as their ``main.py`` does (the whole
  model sits on the GPU, as with ``device_map="auto"`` on one GPU);
* decoder layers called without rotary ``position_embeddings`` (the reference passes only
  ``attention_mask`` / ``position_ids``, wanda issue #87) get them computed from ``position_ids``
  by a forward pre-hook, the way the model itself computes them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

REPOSITORIES = {"wanda": ("wanda", "prune"), "owl": ("OWL", "prune_all")}


def missing(reference_dir: str | Path | None) -> str | None:
    """Why the reference columns cannot be produced, or None when both checkouts are there."""
    if reference_dir is None:
        return "no --reference-dir given: reference columns skipped (see benchmarks/reference_code.py to fetch them)"
    for repo, module in REPOSITORIES.values():
        path = Path(reference_dir) / repo / "lib" / f"{module}.py"
        if not path.is_file():
            return f"{path} not found: reference columns skipped (see benchmarks/reference_code.py to fetch them)"
    return None


def _import_lib(reference_dir: Path, key: str) -> ModuleType:
    repo, module = REPOSITORIES[key]
    package = f"ref_{key}"
    if f"{package}.{module}" in sys.modules:
        return sys.modules[f"{package}.{module}"]
    lib = reference_dir / repo / "lib"
    spec = importlib.util.spec_from_loader(package, loader=None, is_package=True)
    pkg = importlib.util.module_from_spec(spec)
    pkg.__path__ = [str(lib)]
    sys.modules[package] = pkg
    return importlib.import_module(f"{package}.{module}")


def _add_rotary(model) -> list:
    """Pre-hooks giving each decoder layer the rotary embeddings the reference does not pass."""
    rotary = model.model.rotary_emb

    def hook(module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            kwargs["position_embeddings"] = rotary(hidden, position_ids=position_ids)
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]


def run_reference(reference_dir: str | Path, key: str, model, input_ids: torch.Tensor, device: torch.device,
                  sparsity: float, owl_m: float = 5.0, owl_lambda: float = 0.08) -> None:
    """Prune ``model`` (already on ``device``) in place with the reference function ``key``."""
    module = _import_lib(Path(reference_dir), key)
    nsamples, seqlen = input_ids.shape
    loader = [(input_ids[j : j + 1], None) for j in range(nsamples)]
    module.get_loaders = lambda *a, **k: (loader, None)
    args = SimpleNamespace(nsamples=nsamples, seed=0, sparsity_ratio=sparsity, use_variant=False, model="llama",
                           Hyper_m=owl_m, Lamda=owl_lambda)
    model.seqlen = seqlen
    model.hf_device_map = {}
    hooks = _add_rotary(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the references print every layer name
            if key == "wanda":
                module.prune_wanda(args, model, None, device)
            else:
                module.prune_wanda_outlier(args, model, None, device)
    finally:
        for h in hooks:
            h.remove()
        del model.hf_device_map
