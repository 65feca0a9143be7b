"""A tokenizer that emits ids past the model's embedding is refused in one line, before any work.

Without the check the embedding lookup fails deep in the forward with an ``IndexError`` traceback
(CPU) or a device-side assert (CUDA). The model here has 300 embedding rows and the real 8192-token
BPE of the tiny models, so ordinary English text gives ids past 300."""

from __future__ import annotations

import pytest
import torch
import transformers

from compresskit.errors import InputError
from compresskit.models.context import check_token_ids, embedding_rows

TEXT = "The quick brown fox jumps over the lazy dog while the committee discusses the annual budget. " * 20


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """(model dir with a 300-row embedding and an 8192-token tokenizer, a text file)."""
    from tiny_models import _BASE, tiny_tokenizer

    root = tmp_path_factory.mktemp("token-ids")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_BASE, "vocab_size": 300}))
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root / "model", root / "text.txt"


def test_check_names_the_largest_id_and_the_rows():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    assert embedding_rows(model) == 10
    check_token_ids(model, torch.tensor([[0, 9, 3]]))  # the last row is fine
    with pytest.raises(InputError, match=r"token id 12 for the text, but the model's embedding has only 10 rows"):
        check_token_ids(model, torch.tensor([[0, 12, 10]]))


def _one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # progress lines may precede it
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("method", ["wanda", "evopress"])
def test_prune_with_a_foreign_tokenizer_is_one_line_and_writes_nothing(cli, mismatched, tmp_path, method):
    model, text = mismatched
    extra = ["--pruner", "wanda", "--tokens", "16,32", "--generations", "1", "--offspring", "2"] if method == "evopress" else []
    result = cli("prune", "--model", model, "--method", method, "--sparsity", "0.5", "--calib", f"file:{text}",
                 "--nsamples", "4", "--seqlen", "8", "--device", "cpu", "--out", tmp_path / "out", *extra)
    line = _one_error_line(result)
    assert "but the model's embedding has only 300 rows: the tokenizer does not match the model" in line, line
    assert not (tmp_path / "out").exists()


def test_eval_with_a_foreign_tokenizer_is_one_line(cli, mismatched):
    model, text = mismatched
    line = _one_error_line(cli("eval", model, "--ppl-file", text, "--seqlen", "8", "--device", "cpu"))
    assert "for the perplexity text, but the model's embedding has only 300 rows" in line, line


def test_heal_with_a_foreign_tokenizer_is_one_line_and_writes_nothing(cli, mismatched, tmp_path):
    import compresskit

    model, text = mismatched
    ckpt = tmp_path / "mag"
    compresskit.prune(str(model), "magnitude", sparsity=0.5, out=ckpt, device="cpu")  # magnitude reads no text
    result = cli("heal", ckpt, "--data", f"file:{text}", "--steps", "1", "--batch-size", "1", "--seqlen", "8",
                 "--teacher", model, "--device", "cpu", "--out", tmp_path / "healed")
    line = _one_error_line(result)
    assert "for the training data, but the model's embedding has only 300 rows" in line, line
    assert not (tmp_path / "healed").exists()
