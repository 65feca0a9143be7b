"""compresskit.calibration: sources x formats x seeded sampler x cache, with a real tokenizer.

Expectations are built by hand: the reference's sampling loop re-written here with its own RNG,
prompt strings typed out, token windows searched in the documents' tokenizations.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from types import SimpleNamespace

import pytest
import torch

from compresskit.calibration import (
    CalibrationData,
    CalibrationSpec,
    available_sources,
    load_calibration,
    parse_source,
)
from compresskit.calibration.cache import cache_path, tokenizer_identity
from compresskit.calibration.corpus import Corpus
from compresskit.calibration.formats import (
    fit_to_length,
    pad_token_id,
    sample_document_windows,
    stack_padded,
)
from compresskit.errors import CalibrationError, CompressKitError, InputError
from compresskit.paths import shared_data_dir, shared_models_dir

GSM8K_TRAIN = shared_data_dir() / "gsm8k" / "train.jsonl"
SOTU = shared_data_dir() / "corpora" / "sotu.jsonl"
MOBY = shared_data_dir() / "corpora" / "moby_dick.txt"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    path = shared_models_dir() / "deepseek-v2-moe-25m"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"shared tokenizer missing: {path}")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def ids(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return f"file:{path}"


def real_tokens(data: CalibrationData, row: int) -> list[int]:
    if data.attention_mask is None:
        return data.input_ids[row].tolist()
    return data.input_ids[row][data.attention_mask[row].bool()].tolist()


def contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


# ---------------------------------------------------------------- spec


def test_spec_defaults_are_the_papers_protocol():
    spec = CalibrationSpec()
    assert (spec.source, spec.format, spec.nsamples, spec.seqlen, spec.seed) == ("c4", "window", 128, 2048, 0)
    assert (spec.num_incontext, spec.pad_side) == (5, "left")
    assert CalibrationSpec.from_dict(spec.to_dict()) == spec


def test_spec_key_tracks_exactly_the_sample_changing_fields():
    base = CalibrationSpec(nsamples=8, seqlen=64)
    assert base.key("tok") == CalibrationSpec(nsamples=8, seqlen=64).key("tok")
    assert len(base.key()) == 16
    assert base.key("tok") != CalibrationSpec(nsamples=8, seqlen=64, seed=1).key("tok")
    assert base.key("tok") != base.key("other-tokenizer")
    assert base.key("tok", "src-a") != base.key("tok", "src-b")
    # pad_side / num_incontext do nothing for windows: the cache is shared
    assert base.key("tok") == CalibrationSpec(nsamples=8, seqlen=64, pad_side="right", num_incontext=2).key("tok")
    icl = CalibrationSpec(format="icl", nsamples=8, seqlen=64)
    assert icl.key("tok") != CalibrationSpec(format="icl", nsamples=8, seqlen=64, pad_side="right").key("tok")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"nsamples": 0}, "nsamples"),
        ({"seqlen": 0}, "seqlen"),
        ({"format": "fewshot"}, "window, prefix, icl, cot, single, zero"),
        ({"pad_side": "middle"}, "pad_side"),
        ({"num_incontext": -1}, "num_incontext"),
    ],
)
def test_invalid_spec_values_are_input_errors(kwargs, words):
    with pytest.raises(InputError, match=words) as info:
        CalibrationSpec(**kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- registry / parse_source


def test_registered_sources_cover_the_study():
    names = set(available_sources())
    expected = {
        "c4",
        "wikitext2",
        "pile",
        "redpajama",
        "oscar",
        "gsm8k",
        "svamp",
        "esnli",
        "anli",
        "commonsense_qa",
        "race",
        "winogrande",
    }
    assert expected <= names
    c4 = parse_source("c4")
    assert c4.dataset == "allenai/c4" and c4.config is None
    assert c4.revision == "607bd4c8450a42878aa9ddc051a65a055450ef87"
    assert c4.data_files == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert (c4.split, c4.text_field) == ("train", "text")
    assert parse_source("csqa").name == "commonsense_qa"


def test_parse_hf_source_strings():
    d = parse_source("hf:allenai/c4:en:train:text")
    assert (d.kind, d.dataset, d.config, d.split, d.text_field) == ("hub", "allenai/c4", "en", "train", "text")
    d = parse_source("hf:monology/pile-uncopyrighted:train[:5000]:text")
    assert (d.dataset, d.config, d.split) == ("monology/pile-uncopyrighted", None, "train[:5000]")
    with pytest.raises(CalibrationError, match="hf:<dataset>"):
        parse_source("hf:allenai/c4:text")


def test_parse_file_source_resolves_path_without_reading(tmp_path):
    d = parse_source(f"file:{tmp_path}/nothing-here.jsonl")
    assert d.kind == "file" and d.path == str(tmp_path / "nothing-here.jsonl")


def test_unknown_source_lists_known_ones():
    with pytest.raises(CalibrationError, match="unknown calibration source 'c5'.*c4.*gsm8k.*file:<path>"):
        parse_source("c5")


def test_adding_a_yaml_file_adds_a_source(tmp_path, monkeypatch, tok):
    """A new dataset is a YAML file: fields + a frame override, applied to a file via schema."""
    defs = tmp_path / "defs"
    (defs / "sources").mkdir(parents=True)
    (defs / "formats.yaml").write_text(
        'qa: "Q: {{ question }}\\nA: {{ answer }}"\ncot: "x"\nzero: "Q: {{ question }}\\nA:"\n'
    )
    (defs / "sources" / "trivia.yaml").write_text(
        'dataset: someone/trivia\nfields:\n  question: "{{ q | upper }}"\n  answer: "{{ a }}"\n'
    )
    monkeypatch.setenv("COMPRESSKIT_CALIBRATION_DIR", str(defs))
    assert available_sources() == ["trivia"]
    src = write_jsonl(tmp_path / "t.jsonl", [{"q": "capital of france?", "a": "Paris"}])
    spec = CalibrationSpec(source=src, schema="trivia", format="single", nsamples=1, seqlen=32)
    data = load_calibration(spec, tok)
    assert real_tokens(data, 0) == ids(tok, "Q: CAPITAL OF FRANCE?\nA: Paris")


# ---------------------------------------------------------------- window format


def reference_windows(tok, docs: list[str], nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """The Wanda/SparseGPT ``get_c4`` loop, written out independently."""
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            enc = ids(tok, docs[i])
            if len(enc) > seqlen:
                break
        start = rng.randint(0, len(enc) - seqlen - 1)
        out.append(enc[start : start + seqlen])
    return out


def test_window_reproduces_the_reference_sampler(tmp_path, tok):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[(i + j) % 10] for j in range(n)) for i, n in enumerate([3, 80, 5, 120, 60, 2, 90])]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    data = load_calibration(CalibrationSpec(source=src, nsamples=6, seqlen=40, seed=3), tok)
    assert data.input_ids.dtype == torch.long and data.input_ids.shape == (6, 40)
    assert data.attention_mask is None
    assert data.input_ids.tolist() == reference_windows(tok, docs, 6, 40, 3)
    assert data.source_info["num_documents"] == 7


def test_same_seed_same_samples_other_seed_different(tok):
    spec = CalibrationSpec(source=f"file:{SOTU}", nsamples=4, seqlen=256, seed=0)
    a = load_calibration(spec, tok, use_cache=False)
    b = load_calibration(spec, tok, use_cache=False)
    c = load_calibration(CalibrationSpec(source=f"file:{SOTU}", nsamples=4, seqlen=256, seed=1), tok, use_cache=False)
    assert torch.equal(a.input_ids, b.input_ids) and a.hash == b.hash
    assert not torch.equal(a.input_ids, c.input_ids) and a.hash != c.hash
    assert a.hash == hashlib.sha256(a.input_ids.numpy().tobytes()).hexdigest()[:16]


def test_windows_are_token_windows_of_their_documents(tok):
    data = load_calibration(CalibrationSpec(source=f"file:{SOTU}", nsamples=6, seqlen=300, seed=7), tok)
    records = [json.loads(line) for line in SOTU.read_text(encoding="utf-8").splitlines()]
    assert data.source_info["num_documents"] == len(records) == 233
    for row, (index,) in enumerate(data.source_info["sample_documents"]):
        doc_tokens = ids(tok, records[index]["text"])
        assert len(doc_tokens) > 300
        assert contains(doc_tokens, data.input_ids[row].tolist())


def test_one_document_txt_draws_only_the_window_start(tmp_path, tok):
    """A .txt file is one document; like the reference WikiText-2 sampler no document index is drawn."""
    chapters = MOBY.read_text(encoding="utf-8")[:150_000]  # the opening chapters keep the test fast
    (tmp_path / "moby.txt").write_text(chapters, encoding="utf-8")
    data = load_calibration(CalibrationSpec(source=f"file:{tmp_path}/moby.txt", nsamples=3, seqlen=128), tok)
    book = ids(tok, chapters)
    assert len(book) > 20_000 and data.source_info["sample_documents"] == [[0], [0], [0]]
    rng = random.Random(0)
    for row in range(3):
        start = rng.randint(0, len(book) - 128 - 1)
        assert data.input_ids[row].tolist() == book[start : start + 128]


def test_local_file_kinds_give_the_same_samples(tmp_path, tok):
    docs = [f"Document {i}. " + "The whale swam far beyond the harbour lights. " * (10 + 7 * i) for i in range(4)]
    spec = dict(nsamples=5, seqlen=48, seed=2)
    jsonl = load_calibration(
        CalibrationSpec(source=write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs]), **spec), tok
    )
    (tmp_path / "list.json").write_text(json.dumps([{"text": d} for d in docs]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": d, "id": i} for i, d in enumerate(docs)]}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    for source, extra in [
        (f"file:{tmp_path}/list.json", {}),
        (f"file:{tmp_path}/wrapped.json", {}),
        (f"file:{tmp_path}/d.parquet", {"text_field": "body"}),
    ]:
        other = load_calibration(CalibrationSpec(source=source, **spec, **extra), tok)
        assert torch.equal(other.input_ids, jsonl.input_ids), source
    # a .txt file is one document: same as a one-record jsonl of its text
    (tmp_path / "one.txt").write_text(docs[3], encoding="utf-8")
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": docs[3]}])
    a = load_calibration(CalibrationSpec(source=f"file:{tmp_path}/one.txt", **spec), tok)
    b = load_calibration(CalibrationSpec(source=one, **spec), tok)
    assert torch.equal(a.input_ids, b.input_ids)


# ---------------------------------------------------------------- question-answer formats


QA = [
    {"question": "What is 2+3?", "answer": "5", "rationale": "2 plus 3 makes 5"},
    {"question": "Name a red fruit.", "answer": "apple", "rationale": "apples are often red"},
]


@pytest.mark.parametrize(
    "fmt, text",
    [
        ("single", "Question: What is 2+3?\nAnswer: 5"),
        ("zero", "Question: What is 2+3?\nAnswer: "),
        ("icl", "Question: What is 2+3?\nAnswer: 5"),
        ("cot", "Question: What is 2+3?\nAnswer: 2 plus 3 makes 5. So the answer is 5."),
    ],
)
def test_each_format_renders_its_prompt_exactly(tmp_path, tok, fmt, text):
    src = write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    data = load_calibration(CalibrationSpec(source=src, format=fmt, nsamples=2, seqlen=64, num_incontext=1), tok)
    expected = ids(tok, text)
    for row in range(2):
        assert real_tokens(data, row) == expected
        assert tok.decode(real_tokens(data, row)) == text
    # left padding: the pads come first and the mask marks exactly them
    n_pad = 64 - len(expected)
    assert data.attention_mask[0].tolist() == [0] * n_pad + [1] * len(expected)
    assert data.input_ids[0, :n_pad].tolist() == [tok.pad_token_id] * n_pad


def test_icl_concatenates_separately_tokenized_pairs(tmp_path, tok):
    src = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = load_calibration(
        CalibrationSpec(source=src, format="icl", num_incontext=3, nsamples=4, seqlen=128, seed=5), tok
    )
    pairs = [ids(tok, f"Question: {r['question']}\nAnswer: {r['answer']}") for r in QA]
    rng = random.Random(5)
    for row in range(4):
        picks = [rng.randint(0, 1) for _ in range(3)]
        assert data.source_info["sample_documents"][row] == picks
        assert real_tokens(data, row) == pairs[picks[0]] + pairs[picks[1]] + pairs[picks[2]]


def test_icl_fill_mode_takes_a_window_of_pairs(tmp_path, tok):
    """num_incontext=0 is the reference's concat default: pairs until > seqlen, then a window."""
    src = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = load_calibration(
        CalibrationSpec(source=src, format="icl", num_incontext=0, nsamples=3, seqlen=40, seed=1), tok
    )
    assert data.attention_mask is None
    pairs = [ids(tok, f"Question: {r['question']}\nAnswer: {r['answer']}") for r in QA]
    rng = random.Random(1)
    for row in range(3):
        stream: list[int] = []
        while len(stream) <= 40:
            stream += pairs[rng.randint(0, 1)]
        start = rng.randint(0, len(stream) - 40 - 1)
        assert data.input_ids[row].tolist() == stream[start : start + 40]


def test_gsm8k_cot_from_the_shared_train_file(tok):
    if not GSM8K_TRAIN.exists():
        pytest.skip("shared GSM8K missing")
    corpus = Corpus(parse_source(f"file:{GSM8K_TRAIN}"), [json.loads(GSM8K_TRAIN.open().readline())])
    assert corpus.prompt(0, "cot") == (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?\n"
        "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.. So the answer is 72."
    )
    assert corpus.prompt(0, "icl").endswith("April and May?\nAnswer: 72")
    spec = CalibrationSpec(source=f"file:{GSM8K_TRAIN}", format="cot", num_incontext=1, nsamples=3, seqlen=512)
    data = load_calibration(spec, tok)
    lines = GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()
    assert data.source_info["num_documents"] == len(lines) == 7473
    for row, (index,) in enumerate(data.source_info["sample_documents"]):
        record = json.loads(lines[index])
        rationale, number = (part.strip() for part in record["answer"].split("####"))
        text = f"Question: {record['question']}\nAnswer: {rationale}. So the answer is {number}."
        assert real_tokens(data, row) == ids(tok, text)
    # the registered gsm8k mapping applied as a schema gives the same samples
    schema = load_calibration(CalibrationSpec(**{**spec.to_dict(), "schema": "gsm8k"}), tok)
    assert torch.equal(schema.input_ids, data.input_ids)


def test_registered_prompt_templates_match_the_reference():
    csqa = Corpus(
        parse_source("commonsense_qa"),
        [{"question": "Where?", "choices": {"label": ["A", "B"], "text": ["here", "there"]}, "answerKey": "B"}],
    )
    assert csqa.prompt(0, "icl") == "Question: Where?\nChoices:\nA. here\nB. there\nAnswer: B"
    esnli = Corpus(
        parse_source("esnli"), [{"premise": "P.", "hypothesis": "H.", "label": 2, "explanation_1": "Because."}]
    )
    assert esnli.prompt(0, "cot") == "Premise: P.\nHypothesis: H.\nLabel: Because. So the answer is contradiction."
    race = Corpus(parse_source("race"), [{"article": "Art.", "question": "Q?", "options": ["x", "y"], "answer": "B"}])
    assert race.prompt(0, "zero") == "Article: Art.\nQuestion: Q?\nOptions:\nA. x\nB. y\n\nAnswer: "


def test_right_padding_and_cutting(tmp_path, tok):
    src = write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    text = ids(tok, "Question: What is 2+3?\nAnswer: 5")
    right = load_calibration(CalibrationSpec(source=src, format="single", nsamples=1, seqlen=20, pad_side="right"), tok)
    assert right.input_ids[0].tolist() == text + [tok.pad_token_id] * (20 - len(text))
    assert right.attention_mask[0].tolist() == [1] * len(text) + [0] * (20 - len(text))
    short = load_calibration(CalibrationSpec(source=src, format="single", nsamples=1, seqlen=4), tok)
    assert short.attention_mask is None and short.input_ids[0].tolist() == text[-4:]


def test_padding_never_grows_the_vocabulary(tmp_path, tok):
    before = len(tok)
    src = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = load_calibration(CalibrationSpec(source=src, format="zero", nsamples=8, seqlen=64), tok)
    assert len(tok) == before
    assert int(data.input_ids.max()) < len(tok)
    assert data.attention_mask.dtype == torch.long
    assert int((data.attention_mask == 0).sum()) == int((64 - data.attention_mask.sum(1)).sum()) > 0


def test_pad_token_fallback_order():
    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=7, unk_token_id=3)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7, unk_token_id=3)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None, unk_token_id=3)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None, unk_token_id=None)) == 0


def test_fit_and_stack_pure_functions():
    assert fit_to_length([1, 2, 3], 5, 0, "left") == ([0, 0, 1, 2, 3], 2)
    assert fit_to_length([1, 2, 3], 5, 9, "right") == ([1, 2, 3, 9, 9], 2)
    assert fit_to_length([1, 2, 3, 4], 2, 0, "left") == ([3, 4], 0)
    assert fit_to_length([1, 2, 3, 4], 2, 0, "right") == ([1, 2], 0)
    ids_, mask = stack_padded([[1, 2], [3, 4]], 2, 0, "left")
    assert mask is None and ids_.tolist() == [[1, 2], [3, 4]]
    ids_, mask = stack_padded([[1], [3, 4]], 2, 0, "left")
    assert ids_.tolist() == [[0, 1], [3, 4]] and mask.tolist() == [[0, 1], [1, 1]]


# ---------------------------------------------------------------- cache


def test_cache_hit_does_not_read_the_source(tmp_path, tok, own_cache):
    docs = [{"text": "Whales and ships and the open sea. " * 40}, {"text": "Tiny."}]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    spec = CalibrationSpec(source=src, nsamples=3, seqlen=64)
    first = load_calibration(spec, tok)
    assert not first.from_cache
    key = spec.key(tokenizer_identity(tok), parse_source(src).fingerprint())
    assert cache_path(key) == own_cache / "calibration" / f"{key}.pt" and cache_path(key).is_file()
    (tmp_path / "docs.jsonl").rename(tmp_path / "moved.jsonl")
    second = load_calibration(spec, tok)
    assert second.from_cache and torch.equal(second.input_ids, first.input_ids) and second.hash == first.hash
    assert second.source_info == first.source_info
    with pytest.raises(CalibrationError, match="not found"):  # another seed is a miss: needs the file
        load_calibration(CalibrationSpec(source=src, nsamples=3, seqlen=64, seed=1), tok)
    with pytest.raises(CalibrationError, match="not found"):  # use_cache=False never reads the cache
        load_calibration(spec, tok, use_cache=False)


def test_changed_file_invalidates_its_cache_entry(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    src = write_jsonl(path, [{"text": "Call me Ishmael. " * 60}])
    spec = CalibrationSpec(source=src, nsamples=2, seqlen=32)
    first = load_calibration(spec, tok)
    write_jsonl(path, [{"text": "Some years ago, never mind how long precisely. " * 40}])
    second = load_calibration(spec, tok)
    assert not second.from_cache and not torch.equal(first.input_ids, second.input_ids)
    assert load_calibration(spec, tok).from_cache


# ---------------------------------------------------------------- errors


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and isinstance(exc_info.value, CompressKitError)
    return message


def test_missing_and_unreadable_files(tmp_path, tok):
    with pytest.raises(CalibrationError, match="calibration file not found") as info:
        load_calibration(CalibrationSpec(source=f"file:{tmp_path}/absent.jsonl", nsamples=1, seqlen=8), tok)
    one_line(info)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CalibrationError, match="line 2 is not valid JSON"):
        load_calibration(CalibrationSpec(source=f"file:{tmp_path}/bad.jsonl", nsamples=1, seqlen=8), tok)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CalibrationError, match="unsupported extension .csv"):
        load_calibration(CalibrationSpec(source=f"file:{tmp_path}/data.csv", nsamples=1, seqlen=8), tok)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 10)
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        load_calibration(CalibrationSpec(source=f"file:{tmp_path}/latin1.txt", nsamples=1, seqlen=8), tok)


def test_too_short_documents_say_how_long_the_longest_is(tmp_path, tok):
    docs = [{"text": "one two three"}, {"text": "a somewhat longer document of words"}]
    longest = max(len(ids(tok, d["text"])) for d in docs)
    src = write_jsonl(tmp_path / "short.jsonl", docs)
    with pytest.raises(CalibrationError):  # first call: imports and caches, untimed (a loaded machine)
        load_calibration(CalibrationSpec(source=src, nsamples=2, seqlen=2048), tok)
    start = time.perf_counter()
    with pytest.raises(CalibrationError) as info:
        load_calibration(CalibrationSpec(source=src, nsamples=2, seqlen=2048), tok)
    assert time.perf_counter() - start < 5
    message = one_line(info)
    assert f"at most {longest} tokens" in message and f"--seqlen {longest - 1}" in message


def test_bounded_redraws_in_the_pure_sampler():
    calls = []

    def tokens_of(i):
        calls.append(i)
        return [0] * (10 if i == 0 else 100)

    with pytest.raises(CalibrationError, match="its one document has at most 10 tokens.*--seqlen 9"):
        sample_document_windows(random.Random(0), 1, tokens_of, 1, 50)
    calls.clear()
    samples, used = sample_document_windows(random.Random(0), 2, tokens_of, 4, 50)
    assert [u[0] for u in used] == [1, 1, 1, 1] and all(len(s) == 50 for s in samples)
    assert calls.count(0) <= 1  # a document known to be short is never tokenized again
    # many documents, all short: gives up after max_draws instead of looping forever
    with pytest.raises(CalibrationError, match="the documents of 200 draws have at most 3 tokens"):
        sample_document_windows(random.Random(0), 10**6, lambda i: [0] * 3, 1, 50, max_draws=200)


def test_missing_text_field_names_the_fields(tmp_path, tok):
    src = write_jsonl(tmp_path / "rows.jsonl", [{"title": "x", "body": "y"}])
    with pytest.raises(CalibrationError, match=r"no field 'text' \(its records have: title, body\)") as info:
        load_calibration(CalibrationSpec(source=src, nsamples=1, seqlen=8), tok)
    one_line(info)
    with pytest.raises(CalibrationError, match="no field 'content'"):
        load_calibration(CalibrationSpec(source=src, nsamples=1, seqlen=8, text_field="content"), tok)
    with pytest.raises(CalibrationError, match="no question/answer fields.*title, body"):
        load_calibration(CalibrationSpec(source=src, format="icl", nsamples=1, seqlen=8), tok)


def test_format_source_mismatches(tmp_path, tok):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(CalibrationError, match="question-answer records.*icl, cot, single or zero"):
        load_calibration(CalibrationSpec(source=src, nsamples=1, seqlen=8), tok)
    with pytest.raises(CalibrationError, match="no rationales.*use format icl"):
        load_calibration(CalibrationSpec(source=src, format="cot", nsamples=1, seqlen=8), tok)


def test_hub_sources_fail_fast_offline(monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError):  # first call: imports (datasets), untimed (a loaded machine)
        load_calibration(CalibrationSpec(source="c4", nsamples=2, seqlen=16), tok)
    start = time.perf_counter()
    with pytest.raises(CalibrationError) as info:
        load_calibration(CalibrationSpec(source="c4", nsamples=2, seqlen=16), tok)
    assert time.perf_counter() - start < 5
    message = one_line(info)
    assert "'c4' needs the Hugging Face Hub, which is unreachable" in message and "file:PATH" in message
    with pytest.raises(CalibrationError, match="unreachable"):
        load_calibration(CalibrationSpec(source="hf:allenai/c4:en:train:text", nsamples=2, seqlen=16), tok)
    with pytest.raises(CalibrationError, match="file:PATH with schema gsm8k"):
        load_calibration(CalibrationSpec(source="gsm8k", format="cot", nsamples=2, seqlen=16), tok)


def test_yaml_source_through_datasets_join_and_max_documents(tmp_path, monkeypatch, tok):
    """The `datasets` path of a registered source, offline through the local json builder:
    the first `max_documents` records joined with `join` into one document (WikiText-2 protocol)."""
    from compresskit.paths import calibration_defs_dir

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    texts = [f"Paragraph {i} about the sea and the {i}th whale." for i in range(6)]
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    defs = tmp_path / "defs"
    (defs / "sources").mkdir(parents=True)
    (defs / "formats.yaml").write_text((calibration_defs_dir() / "formats.yaml").read_text())
    (defs / "sources" / "joined.yaml").write_text(
        f"dataset: json\ndata_files: {{train: {tmp_path / 'corpus.jsonl'}}}\nsplit: train\n"
        'max_documents: 4\njoin: " "\ntext_field: text\n'
    )
    (defs / "sources" / "streamed.yaml").write_text(
        f"dataset: json\ndata_files: {{train: {GSM8K_TRAIN}}}\nsplit: train\nstreaming: true\nmax_documents: 3\n"
        + (calibration_defs_dir() / "sources" / "gsm8k.yaml").read_text().split("split: train\n", 1)[1]
    )
    monkeypatch.setenv("COMPRESSKIT_CALIBRATION_DIR", str(defs))
    data = load_calibration(CalibrationSpec(source="joined", nsamples=3, seqlen=16, seed=4), tok)
    assert data.source_info["num_documents"] == 1 and data.source_info["dataset"] == "json"
    stream = ids(tok, " ".join(texts[:4]))
    rng = random.Random(4)
    for row in range(3):
        start = rng.randint(0, len(stream) - 16 - 1)
        assert data.input_ids[row].tolist() == stream[start : start + 16]
    qa = load_calibration(CalibrationSpec(source="streamed", format="zero", nsamples=6, seqlen=128), tok)
    assert qa.source_info["num_documents"] == 3
    first3 = [json.loads(line) for line in GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[:3]]
    for row, (index,) in enumerate(qa.source_info["sample_documents"]):
        assert real_tokens(qa, row) == ids(tok, f"Question: {first3[index]['question']}\nAnswer: ")
