"""CUDA path: the same code on the GPU gives the CPU's result (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

import compresskit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method,kwargs", [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"}),
                                           ("owl", {"sparsity": 0.6})])
def test_cuda_prune_matches_cpu(tiny_model_dir, sotu_jsonl, method, kwargs):
    common = dict(calib=f"file:{sotu_jsonl}", nsamples=8, seqlen=32, batch_size=4, **kwargs)
    cpu = compresskit.prune(str(tiny_model_dir("llama")), method, device="cpu", **common).model
    gpu = compresskit.prune(str(tiny_model_dir("llama")), method, device="cuda", **common).model
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back to where they were loaded
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        # same masks up to a handful of near-tied scores; weights equal where both kept them
        agree = ((a == 0) == (b == 0)).float().mean().item()
        assert agree > 0.995, name
