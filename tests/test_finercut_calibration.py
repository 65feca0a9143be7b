"""FinerCut's reference calibration: the ``prefix`` format (the first nsamples·seqlen tokens of the
non-empty documents joined with " ", methods.md §8.2) and the per-method default format."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import _BASE, tiny_tokenizer

import compresskit
from compresskit import api
from compresskit.calibration import CalibrationSpec
from compresskit.calibration.corpus import Corpus
from compresskit.calibration.formats import first_tokens_of_join
from compresskit.calibration.loader import build_samples, load_calibration, samples_hash
from compresskit.calibration.registry import SourceDefinition
from compresskit.errors import CalibrationError
from compresskit.methods import get_method
from compresskit.paths import shared_data_dir

WIKI_TEST = shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
MOBY = shared_data_dir() / "corpora" / "moby_dick.txt"


def tokenize(text: str) -> list[int]:
    return list(tiny_tokenizer()(text, verbose=False)["input_ids"])


def wikitext_rows() -> list[str]:
    """Rows shaped like the Hub's WikiText-2 raw split: newline-terminated lines with empty rows
    between them (the shared copy is the test split; a stand-in for the train parquet)."""
    if not WIKI_TEST.exists():
        pytest.skip(f"shared data missing: {WIKI_TEST}")
    rows: list[str] = []
    for line in WIKI_TEST.read_text(encoding="utf-8").split("\n")[:1500]:
        rows += ["", line + "\n"] if line.strip() else ["", "   \n"]  # whitespace-only rows are dropped too
    return rows


def reference_samples(rows: list[str], nsamples: int = 10, seqlen: int = 256) -> torch.Tensor:
    """The reference's construction, literally: filter empty lines, join with a space, tokenize
    once (special tokens included), first nsamples·seqlen tokens, view(nsamples, seqlen)."""
    text = " ".join(row for row in rows if row.strip())
    ids = tiny_tokenizer()(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids[: nsamples * seqlen].view(nsamples, seqlen)


@pytest.fixture(scope="module")
def wikitext_train(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = wikitext_rows()
    path = tmp_path_factory.mktemp("wt2") / "train.parquet"
    pq.write_table(pa.table({"text": rows}), path)
    return path, rows


# ------------------------------------------------------------------ the prefix equals the whole join


@pytest.mark.parametrize("count", [1, 255, 2560, 20_000])
def test_prefix_tokens_equal_tokenizing_the_whole_join(count):
    if not MOBY.exists():
        pytest.skip(f"shared data missing: {MOBY}")
    for docs in (wikitext_rows(), MOBY.read_text(encoding="utf-8").split("\n")):
        full = tokenize(" ".join(d for d in docs if d.strip()))
        tokens, used = first_tokens_of_join(enumerate(docs), tokenize, count)
        assert tokens == full[:count]
        assert used and all(docs[i].strip() for i in used) and used == sorted(used)


def test_prefix_is_exact_for_pieces_longer_than_the_margin():
    # one "word" of thousands of tokens, CJK without spaces, long digit runs: the cut lands inside
    # a piece, the two cuts disagree, and the prefix grows until they agree (or is the whole join)
    import random

    r = random.Random(0)
    docs = ["".join(r.choice("abcdefghij") for _ in range(20_000)), "", " \n", "漢字かなカナ" * 2000, "1234567890" * 800]
    full = tokenize(" ".join(d for d in docs if d.strip()))
    for count in (1, 64, 700, 5000, len(full)):
        assert first_tokens_of_join(enumerate(docs), tokenize, count)[0] == full[:count]


def test_too_few_tokens_is_one_line():
    with pytest.raises(CalibrationError) as err:
        first_tokens_of_join(enumerate(["a b c", "", "d e"]), tokenize, 500, "file:x.txt", what="--nsamples 2 × --seqlen 250 = 500")
    msg = str(err.value)
    assert "\n" not in msg and "file:x.txt has only" in msg and "--nsamples 2 × --seqlen 250 = 500" in msg
    with pytest.raises(CalibrationError, match="has no non-empty document"):
        first_tokens_of_join(enumerate(["", "  \n"]), tokenize, 5, "file:y")


def test_prefix_through_load_calibration_too_short_file(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only a few words here")
    spec = CalibrationSpec(source=f"file:{path}", format="prefix", nsamples=10, seqlen=256)
    with pytest.raises(CalibrationError, match="needs --nsamples 10 × --seqlen 256 = 2560 tokens"):
        load_calibration(spec, tiny_tokenizer(), use_cache=False)


def test_prefix_ignores_a_sources_join_and_drops_empty_rows():
    # the registered wikitext2 source joins every row with " " for the window format (empty rows
    # included, as Wanda's get_wikitext2); prefix joins the non-empty rows itself, as FinerCut's reference
    rows = wikitext_rows()[:400]
    joined = Corpus(SourceDefinition(name="wikitext2", kind="hub", join=" ", text_field="text"),
                    [{"text": t} for t in rows])
    assert len(joined) == 1
    spec = CalibrationSpec(source="wikitext2", format="prefix", nsamples=4, seqlen=64)
    ids, mask, used = build_samples(spec, joined, tiny_tokenizer())
    assert mask is None and torch.equal(ids, reference_samples(rows, 4, 64))
    assert len(used) == 1 and all(rows[i].strip() for i in used[0])


def test_prefix_cache_key_ignores_seed_and_differs_from_window():
    a = CalibrationSpec(source="wikitext2", format="prefix", nsamples=10, seqlen=256, seed=0)
    b = CalibrationSpec(source="wikitext2", format="prefix", nsamples=10, seqlen=256, seed=7)
    w = CalibrationSpec(source="wikitext2", format="window", nsamples=10, seqlen=256, seed=0)
    assert a.key("t", "s") == b.key("t", "s") != w.key("t", "s")


# ------------------------------------------------------------------ golden: FinerCut's default calibration


def tiny_llama(layers: int = 2) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": layers})).eval()


def test_finercut_default_calibration_is_the_references_first_2560_tokens(wikitext_train):
    path, rows = wikitext_train
    expected = reference_samples(rows)  # [10, 256]
    data = load_calibration(CalibrationSpec(source=f"file:{path}", format="prefix", nsamples=10, seqlen=256),
                            tiny_tokenizer(), use_cache=False)
    assert torch.equal(data.input_ids, expected) and data.attention_mask is None
    # FinerCut with nothing but the source given: prefix, 10 × 256
    out = compresskit.prune(tiny_llama(), "finercut", tokenizer=tiny_tokenizer(), calib=f"file:{path}",
                            method_options={"remove": 0.5, "level": "block", "distance": "norm"},
                            device="cpu")  # one cheap step
    calib = out.manifest.calibration
    assert (calib["format"], calib["nsamples"], calib["seqlen"]) == ("prefix", 10, 256)
    assert calib["hash"] == samples_hash(expected)
    assert "format 'prefix'" in out.manifest.method_details["calibration_note"]


# ------------------------------------------------------------------ the format is a per-method default


def test_format_defaults_per_method():
    assert get_method("finercut").calibration_setting("format", None) == "prefix"
    for name in ("wanda", "sparsegpt", "owl", "cdmoe", "welore"):
        assert get_method(name).calibration_setting("format", None) == "window"
    assert get_method("finercut").calibration_setting("format", "window") == "window"


@pytest.mark.parametrize("method,options,given,resolved", [
    ("finercut", {"remove": 0.25}, None, "prefix"),
    ("finercut", {"remove": 0.25}, "window", "window"),
    ("wanda", {}, None, "window"),
    ("wanda", {}, "prefix", "prefix"),
])
def test_api_resolves_the_format(monkeypatch, method, options, given, resolved):
    seen = {}

    def fake_job_calibration(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(api, "job_calibration", fake_job_calibration)
    with pytest.raises(SystemExit):
        api.prune("smollm2-135m", method, sparsity=0.5 if method == "wanda" else None, calib_format=given,
                  method_options=options, device="cpu")
    assert seen["calib_format"] == resolved


@pytest.mark.parametrize("extra,resolved", [((), "prefix"), (("--calib-format", "window"), "window")])
def test_cli_records_the_resolved_format(cli, tiny_model_dir, tmp_path, extra, resolved):
    calib = tmp_path / "calib.txt"
    calib.write_text("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 60)
    out = tmp_path / "fc"
    res = cli("prune", "--model", tiny_model_dir("llama"), "--method", "finercut", "--remove", "0.25",
              "--calib", f"file:{calib}", "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", out,
              "--quiet", *extra)
    assert res.exit_code == 0, res.stderr
    recorded = json.loads((out / "compresskit.json").read_text())["calibration"]
    assert recorded["format"] == resolved
    if resolved == "prefix":
        words = tokenize(calib.read_text())[:32]
        assert recorded["hash"] == samples_hash(torch.tensor(words).view(2, 16))
    text = " ".join(cli("inspect", out).stdout.split())  # the console wraps long lines
    shown = text[text.index("calibration:"):text.index("(hash")]
    assert f" {resolved} 2×16" in shown
    assert ("seed" in shown) == (resolved == "window"), shown  # prefix takes no seed: none is shown


def test_cli_help_names_the_prefix_format(cli):
    res = cli("prune", "--help")
    assert res.exit_code == 0 and "prefix" in res.stdout


def test_recipe_calibration_format_is_unset_by_default():
    from compresskit.recipe import Calibration

    assert Calibration().format is None and Calibration(format="window").format == "window"
