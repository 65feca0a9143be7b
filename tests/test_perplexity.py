"""The papers' windowed perplexity, checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from compresskit.errors import EvaluationError
from compresskit.evaluation.perplexity import perplexity, perplexity_tokens, windowed_perplexity
from compresskit.paths import shared_data_dir


@pytest.fixture(scope="module")
def tiny():
    from tiny_models import tiny_model, tiny_tokenizer

    return tiny_model("llama").eval(), tiny_tokenizer()


def _manual_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """Sum of per-token NLL over each window's seqlen-1 predictions, as the references do it:
    mean loss × seqlen, summed, over windows·seqlen — written out with log_softmax by hand."""
    n = ids.numel() // seqlen
    total = 0.0
    for w in range(n):
        window = ids[0, w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
        nll = -logp[torch.arange(seqlen - 1), window[1:]].mean().item()
        total += nll * seqlen
    return math.exp(total / (n * seqlen))


def test_windowed_perplexity_matches_manual(tiny):
    model, _ = tiny
    ids = torch.randint(0, 8192, (1, 5 * 32 + 7), generator=torch.Generator().manual_seed(1))
    r = windowed_perplexity(model, ids, seqlen=32)
    assert r["n_windows"] == 5 and r["tokens"] == 160 and r["total_tokens"] == 167  # remainder dropped
    assert r["value"] == pytest.approx(_manual_ppl(model, ids, 32), rel=1e-5)
    # batching windows changes nothing
    assert windowed_perplexity(model, ids, seqlen=32, batch_size=3)["value"] == pytest.approx(r["value"], rel=1e-5)
    # max_windows evaluates a prefix
    r2 = windowed_perplexity(model, ids, seqlen=32, max_windows=2)
    assert r2["n_windows"] == 2 and r2["value"] == pytest.approx(_manual_ppl(model, ids[:, :64], 32), rel=1e-5)


def test_uniform_model_has_vocab_perplexity():
    """A model that predicts the uniform distribution has perplexity exactly |V|."""

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 100)})()

    ids = torch.randint(0, 100, (1, 300))
    assert windowed_perplexity(Uniform(), ids, seqlen=50)["value"] == pytest.approx(100.0, rel=1e-6)  # fp32 cross-entropy


def test_wikitext2_local_file_and_join_recorded(tiny, monkeypatch):
    _, tok = tiny
    path = shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.exists():
        pytest.skip("shared WikiText-2 copy missing")
    ids, info = perplexity_tokens(tok, "wikitext2", 2048)
    assert info["source"] == str(path) and "as-is" in info["join"]
    assert ids.numel() == tok(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids.numel()
    monkeypatch.setenv("COMPRESSKIT_WIKITEXT2_FILE", "/nonexistent/wiki.raw")
    with pytest.raises(EvaluationError, match="COMPRESSKIT_WIKITEXT2_FILE"):
        perplexity_tokens(tok, "wikitext2", 2048)


def test_file_sources_and_errors(tiny, tmp_path):
    model, tok = tiny
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "alpha beta"}\n{"text": "gamma delta"}\n')
    ids, info = perplexity_tokens(tok, f"file:{jl}", 8)
    assert torch.equal(ids, tok("alpha beta\n\ngamma delta", return_tensors="pt").input_ids)
    assert "\\n\\n" in info["join"]
    with pytest.raises(EvaluationError, match="fewer than one window"):
        perplexity(model, tok, f"file:{jl}", seqlen=4096)
    with pytest.raises(EvaluationError, match="does not exist"):
        perplexity_tokens(tok, f"file:{tmp_path / 'missing.txt'}", 8)
    with pytest.raises(EvaluationError, match="unknown perplexity dataset"):
        perplexity_tokens(tok, "ptb-bogus", 8)
    with pytest.raises(EvaluationError, match="Hub"):
        perplexity_tokens(tok, "c4", 8)  # HF_HUB_OFFLINE=1 in the test environment


def test_python_api_fits_an_unset_seqlen_to_the_model_context(tiny, tmp_path):
    """``compresskit.evaluate_perplexity`` without ``seqlen`` uses 2048, or the model's context when
    shorter (256 here), with a note, as ``eval`` does; a given length above the context is an error."""
    from compresskit import api
    from compresskit.errors import CompressKitNote, InputError

    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    with pytest.warns(CompressKitNote, match="using 256, the model's max_position_embeddings"):
        result = api.evaluate_perplexity(model, f"file:{text}", tokenizer=tok, device="cpu", max_windows=1)
    assert result["seqlen"] == 256 and math.isfinite(result["value"])
    with pytest.raises(InputError, match="above the model's max_position_embeddings 256"):
        api.evaluate_perplexity(model, f"file:{text}", tokenizer=tok, device="cpu", seqlen=4096)
