"""Start-up time of the command line (issue 17): ``--help``, every ``COMMAND --help``, ``inspect`` and
errors in options answer without importing torch or transformers (only the commands that compute
import them; docs/architecture.md lists those function-local imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "lm_eval", "safetensors", "datasets", "matplotlib")

#: ``compresskit --help`` may take this many times an interpreter that imports what a CLI legitimately
#: needs (typer, rich, pydantic, yaml), best of 3 each, same run. A reference doing comparable work
#: slows down alike when the machine is loaded (``python -c pass`` did not: its ratio to --help rose
#: from 10x to past 40x under load). Measured at load 7 on 2 cores: --help 0.70 s, reference 0.67 s
#: (1x); the old eager imports of torch and transformers alone took 9.3 s (14x).
HELP_RATIO_BUDGET = 4
REFERENCE = "import typer, rich, pydantic, yaml"

_PROBE = """
import json, sys
from compresskit.cli import main
heavy, argvs, names = {}, json.loads(sys.argv[1]), json.loads(sys.argv[2])
for argv in argvs:
    sys.argv = ["compresskit", *argv]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    heavy[" ".join(argv)] = [code, sorted(m for m in names if m in sys.modules)]
print(json.dumps(heavy))
"""


def _probe(argvs: list[list[str]]) -> dict:
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs), json.dumps(HEAVY)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_help_inspect_and_option_errors_import_no_heavy_library(tmp_path):
    from compresskit.checkpoint.manifest import Manifest

    ckpt = tmp_path / "ckpt"  # inspect reads only the manifest
    ckpt.mkdir()
    Manifest(method="magnitude", base_model="tiny").write(ckpt)
    argvs = [["--help"], *([c, "--help"] for c in ("prune", "eval", "inspect", "analyze", "finetune", "heal", "compare", "run")),
             ["inspect", str(ckpt)], ["inspect", str(ckpt), "--json"],
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "nope"],  # unknown method
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "wanda", "--owl-m", "3"],
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "finercut", "--remove", "1.5"],
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "wanda", "--sparsity", "1.5"],
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "wanda", "--pattern", "3:2"],
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "welore", "--sparsity", "0.5"],
             *(["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "cdmoe", flag, "x"]
               for flag in ("--shared-gate", "--distance", "--expert-weight", "--expert-stop")),
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "evopress", "--sparsity", "0.7",
              "--seed-from", "nope"],
             ["prune", "--model", "m", "--out", str(tmp_path / "o"), "--method", "evopress", "--level", "sublayer",
              "--remove", "0.25", "--pruner", "wanda"],
             ["heal", str(ckpt), "--data", "demo", "--out", str(tmp_path / "o"), "--loss", "nope"],
             ["prune", "--model", "m", "--method", "wanda"],  # missing --out: a usage error
             ["eval", "--seqlen", "many"],  # a usage error
             ["eval", str(ckpt), "--limit", "many"], ["eval"]]  # checked by the command before it imports
    report = _probe([list(a) for a in argvs])
    for argv, (code, heavy) in report.items():
        assert code in (0, 2), (argv, code)
        assert heavy == [], f"compresskit {argv} imported {heavy}"
    assert not (tmp_path / "o").exists()


def _best_of(cmd: list[str], n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, timeout=120)
        best = min(best, time.perf_counter() - t0)
    return best


def test_help_time_is_a_small_multiple_of_a_cli_interpreter():
    bare = _best_of([sys.executable, "-c", REFERENCE])
    helped = _best_of([sys.executable, "-m", "compresskit", "--help"])
    assert helped < HELP_RATIO_BUDGET * bare, (
        f"compresskit --help took {helped:.2f} s = {helped / bare:.1f}x python -c '{REFERENCE}' ({bare:.3f} s); "
        f"budget {HELP_RATIO_BUDGET}x")


def test_welore_default_min_ratio_is_the_plans():
    """The WeLore config holds the default itself (its module must import without torch)."""
    from compresskit.lowrank.plan import DEFAULT_MIN_RATIO
    from compresskit.methods.welore import WeLoreConfig

    assert WeLoreConfig.model_fields["min_ratio"].default == DEFAULT_MIN_RATIO


def test_analyze_and_eval_option_errors_answer_in_one_line_without_torch(tmp_path):
    """``analyze --metric nope``, an option the metric does not read, a bad OWL value, and eval's
    ``--max-windows`` / ``--seqlen`` / ``--ppl-batch-size`` / ``--batch-size`` checks: exit 2, one
    ``error:`` line, torch never imported (issue 17)."""
    from compresskit.checkpoint.manifest import Manifest

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    Manifest(method="magnitude", base_model="tiny").write(ckpt)
    cases = {
        ("analyze", "--model", "m", "--metric", "nope"): "unknown metric 'nope'; choose one of: alpha, experts, owl, spectrum",
        ("analyze", "--model", "m", "--metric", "owl", "--alpha-epsilon", "0.3"): "--alpha-epsilon does not apply to --metric owl",
        ("analyze", "--model", "m", "--metric", "experts", "--owl-m", "3"): "--owl-m does not apply to --metric experts",
        ("analyze", "--model", "m", "--metric", "owl", "--sparsity", "1.5"): "--sparsity must be in [0, 1), got 1.5",
        ("analyze", "--model", "m", "--metric", "owl", "--owl-lambda", "-1"): "--metric owl",
        ("eval", str(ckpt), "--max-windows", "0"): "--max-windows must be at least 1 (omit it for all windows), got 0",
        ("eval", str(ckpt), "--seqlen", "0"): "--seqlen must be at least 1, got 0",
        ("eval", "--model", "m", "--seqlen", "-5"): "--seqlen must be at least 1, got -5",
        ("eval", str(ckpt), "--ppl-batch-size", "0"): "--ppl-batch-size must be at least 1, got 0",
        ("eval", str(ckpt), "--batch-size", "many"): "--batch-size must be 'auto' or a positive integer, got 'many'",
    }
    report = _probe([list(argv) for argv in cases])
    for argv, message in cases.items():
        code, heavy = report[" ".join(argv)]
        assert (code, heavy) == (2, []), (argv, code, heavy)
        res = subprocess.run([sys.executable, "-m", "compresskit", *argv], capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, res.stderr)


def test_analyze_declares_every_registered_metric_without_torch():
    """``analyze.METRIC_OPTIONS`` (torch-free) names each registered metric with the options it reads."""
    from compresskit import analyze

    declared = dict(analyze.METRIC_OPTIONS)
    assert sorted(analyze.available_metrics()) == sorted(declared)  # imports the registering modules
    assert analyze.METRIC_OPTIONS == declared


def test_help_texts_keep_their_bracketed_defaults_and_merge_shared_method_flags(cli):
    """typer reads help as rich markup: a ``[default: 16]`` in our text was silently dropped as a tag.
    A method flag that several methods declare shows each method's text and default."""
    def text(command: str) -> str:  # the help without its box and spacing (rich wraps it in a table)
        return "".join(cli(command, "--help").stdout.replace("│", "").split())

    assert "adapterrank[default:16]" in text("heal")
    prune = text("prune")
    assert "[methoddefault:evopressmatrix,finercutsublayer]" in prune, prune
    assert "cdmoe:Greedy-searchdistance" in prune and "finercut:Distancebetweentheunpruned" in prune, prune
