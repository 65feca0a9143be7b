"""Progress when stderr is not a terminal: plain lines, at most ~1 per second per phase, first and
last always; nothing with --quiet."""

from __future__ import annotations

import io
import re

from compresskit.commands.progress import PhaseProgress

CALIB = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--device", "cpu"]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(items: int, step_s: float, **kw) -> list[str]:
    stream, clock = io.StringIO(), _Clock()
    with PhaseProgress(True, stream=stream, clock=clock, **kw) as progress:
        for i in range(1, items + 1):
            clock.now += step_s
            progress("prune (wanda)", i, items, f"model.layers.{i - 1}")
    return stream.getvalue().splitlines()


def test_every_item_when_items_are_slow():
    lines = _run(5, 2.0)
    assert lines == [f"prune (wanda): {i}/5 model.layers.{i - 1} · {2.0 * (i - 1):.1f}s" for i in range(1, 6)]


def test_rate_limited_to_about_one_line_per_second_and_the_last_is_always_shown():
    lines = _run(100, 0.05)  # 5 s of work, 20 items a second
    assert lines[0].startswith("prune (wanda): 1/100 ")
    assert lines[-1].startswith("prune (wanda): 100/100 model.layers.99 ")
    assert 5 <= len(lines) <= 7


def test_a_phase_run_again_starts_over():
    stream, clock = io.StringIO(), _Clock()
    with PhaseProgress(True, stream=stream, clock=clock) as progress:
        for _ in range(2):  # the baseline's perplexity, then the checkpoint's
            for i in (1, 2):
                clock.now += 0.1
                progress("ppl wikitext2", i, 2, "")
    assert stream.getvalue().splitlines() == [
        "ppl wikitext2: 1/2 · 0.0s", "ppl wikitext2: 2/2 · 0.1s",
        "ppl wikitext2: 1/2 · 0.0s", "ppl wikitext2: 2/2 · 0.1s",
    ]


def test_eta_and_disabled():
    lines = _run(4, 10.0, eta=True)
    assert lines[1] == "prune (wanda): 2/4 model.layers.1 · 10.0s, eta 10s"
    stream = io.StringIO()
    with PhaseProgress(False, stream=stream) as progress:
        progress("prune", 1, 1, "")
    assert stream.getvalue() == ""


def test_user_text_in_labels_is_not_markup():
    stream = io.StringIO()
    with PhaseProgress(True, stream=stream) as progress:
        progress("ppl [bold]x", 1, 1, ":smile:")
    assert stream.getvalue().startswith("ppl [bold]x: 1/1 :smile: · ")


def test_prune_and_eval_print_lines_to_a_pipe_and_nothing_with_quiet(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    model = tiny_model_dir("llama")
    res = cli("prune", "--model", model, "--method", "wanda", "--sparsity", "0.5", "--calib", f"file:{sotu_jsonl}",
              *CALIB, "--out", tmp_path / "ck")
    assert res.exit_code == 0, res.stderr
    progress = [line for line in res.stderr.splitlines() if re.match(r"^prune \(wanda\): \d+/2 ", line)]
    assert progress and progress[-1].startswith("prune (wanda): 2/2 model.layers.1 · ")

    text = tmp_path / "val.txt"
    text.write_text("The harbour was quiet that morning, and the boats lay still. " * 60)
    res = cli("eval", tmp_path / "ck", "--ppl-file", text, "--seqlen", "32", "--max-windows", "3", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert re.search(r"^ppl val: 3/3 · \d+\.\ds$", res.stderr, re.M), res.stderr

    quiet = cli("eval", tmp_path / "ck", "--ppl-file", text, "--seqlen", "32", "--max-windows", "3", "--device", "cpu",
                "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
