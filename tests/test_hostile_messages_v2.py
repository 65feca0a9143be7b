"""Issue 17, processes and messages: one error line under torchrun, SIGTERM cleans up like SIGINT,
and the messages / refusals of the newer commands (table rows: exit code, exactly one ``error:``
line, inputs and bystanders unchanged)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import needs_shared, run_cli
from hostile_harness import Ctx, Row, make_inputs, run_row
from compresskit.paths import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


# ----------------------------------------------------------------------------- torchrun: one line, once
def test_torchrun_user_error_is_one_line_from_rank_0(tmp_path):
    """Every rank meets the same bad option; rank 0 prints it once, every rank exits 2 (torchrun then
    reports the failed ranks itself: that report is torchrun's, not a line per rank of ours)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "compresskit",
           "prune", "--model", "m", "--method", "wanda", "--sparsity", "0.5", "--owl-m", "3", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --owl-m does not apply to --method wanda"], proc.stderr[-3000:]
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr, proc.stderr[-3000:]
    assert "compresskit/cli.py" not in proc.stderr  # no traceback of ours
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_only_rank_0_prints_errors_and_warnings(monkeypatch, tiny_model_dir, tmp_path):
    """The rule itself, for errors and warnings: silent only on a torchrun rank other than 0 (all of
    torchrun's variables set); a stray RANK in the environment of a plain run silences nothing."""
    import io
    import warnings

    from compresskit import cli
    from compresskit.errors import CompressKitWarning

    args = ["prune", "--model", str(tiny_model_dir("llama")), "--method", "wanda", "--sparsity", "1.5",
            "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]
    cli._show_our_warnings_as_lines()

    def warn() -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            cli.err_console.file = err = io.StringIO()
            try:
                warnings.warn("a warning", CompressKitWarning)
            finally:
                cli.err_console.file = sys.stderr
        return err.getvalue()

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "RANK_ERROR_GRACE_S", 0.3)  # rank 1 waits for rank 0 to speak (10 s in use)
    t0 = time.monotonic()
    res = run_cli(*args)
    assert (res.exit_code, res.stderr) == (2, "") and warn() == ""
    assert time.monotonic() - t0 >= 0.3
    monkeypatch.setenv("RANK", "0")
    res = run_cli(*args)
    assert res.exit_code == 2 and res.stderr.startswith("error: --sparsity must be in [0, 1)"), res.stderr
    assert len(res.stderr.splitlines()) == 1 and warn() == "warning: a warning\n"
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")  # no torchrun: this process speaks
    res = run_cli(*args)
    assert res.exit_code == 2 and res.stderr.startswith("error: "), res.stderr
    assert warn() == "warning: a warning\n"


# ----------------------------------------------------------------------------- SIGTERM = SIGINT
def test_sigterm_during_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Mirror of test_cli_e2e.test_interrupted_save_leaves_nothing (Ctrl-C), with a real SIGTERM
    delivered to this process while the checkpoint is being written."""
    from compresskit.checkpoint.manifest import Manifest

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not stop the save")

    def default_handler(*_):  # what the default action (end the process, no clean-up) stands for here
        raise AssertionError("SIGTERM reached the handler the CLI should have replaced")

    monkeypatch.setattr(Manifest, "write", sigterm)
    before = signal.signal(signal.SIGTERM, default_handler)
    out = tmp_path / "o"
    try:
        res = run_cli("prune", "--model", str(tiny_model_dir("llama")), "--method", "magnitude", "--sparsity", "0.5",
                      "--out", str(out), "--device", "cpu", "--quiet")
        assert signal.getsignal(signal.SIGTERM) is default_handler  # the CLI restores the handler it replaced
    finally:
        signal.signal(signal.SIGTERM, before)
    assert res.exit_code == 143, res.stderr
    assert res.stderr.strip() == "terminated; nothing was written in place of the output"
    assert not out.exists() and os.listdir(tmp_path) == []


SPILL_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from compresskit.models import lazy_store
    from compresskit.cli import main
    spill = lazy_store.LazyStore._spill
    def spill_then_wait(self, items, done):
        spill(self, items, done)
        print("SPILLED", self.spill_dir, flush=True)
        time.sleep(120)
    lazy_store.LazyStore._spill = spill_then_wait
    sys.argv = ["compresskit", *sys.argv[1:]]
    main()
""")


def test_sigterm_during_a_lazy_prune_removes_spills_and_the_temporary_checkpoint(tiny_model_dir, tmp_path):
    """Mirror of test_lazy_spill's killed / failed prunes: SIGTERM (what torchrun sends the surviving
    ranks) runs the same clean-up as an error or Ctrl-C: no spill folder, no output, nothing in TMPDIR."""
    (tmp_path / "tmpdir").mkdir()
    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_model_dir("llama")), "--method", "wanda", "--sparsity", "0.5", "--calib", "demo",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmpdir"))
    proc = subprocess.Popen([sys.executable, "-c", SPILL_CHILD.format(tests=str(TESTS)), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, spill_dir = time.time() + 240, None
        while time.time() < deadline and spill_dir is None:
            line = proc.stdout.readline()
            if line.startswith("SPILLED"):
                spill_dir = Path(line.split(maxsplit=1)[1].strip())
            elif not line and proc.poll() is not None:
                break
        assert spill_dir is not None and spill_dir.is_dir(), proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip() == "terminated; nothing was written in place of the output"
    assert not spill_dir.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmpdir"] and list((tmp_path / "tmpdir").iterdir()) == []


# ----------------------------------------------------------------------------- messages and refusals (rows)
CPU = ["--device", "cpu", "--quiet"]
CALIB = ["--calib", "file:{calib}", "--nsamples", "2", "--seqlen", "16"]


@pytest.fixture(scope="module")
def shared_inputs(tmp_path_factory, tiny_model_dir) -> Ctx:
    import torch
    import transformers

    from tiny_models import tiny_tokenizer

    ctx = make_inputs(tmp_path_factory.mktemp("hostile-messages-v2"), tiny_model_dir("llama"))
    grouped = ctx.tmp / "deepseek-v3-grouped"  # a group-limited router: 8 experts in n_group 2, topk_group 1, top_k 2
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(grouped)
    tiny_tokenizer().save_pretrained(grouped)
    ctx.extra.update(grouped=grouped, deepseek=tiny_model_dir("deepseek_v2"), mixtral=tiny_model_dir("mixtral"))
    return ctx


@pytest.fixture
def ctx(shared_inputs, tmp_path) -> Ctx:
    return dataclasses.replace(shared_inputs, tmp=tmp_path, extra=dict(shared_inputs.extra))


def _no_calibration(monkeypatch, ctx) -> None:
    """An error that depends only on options (and the config) must come before the expensive pass."""
    def calibrate(*_a, **_k):
        raise AssertionError("calibration ran before an option-only check")

    monkeypatch.setattr("compresskit.methods.base.PruneJob.calibration_data", calibrate)


def _finercut(*options):
    return ["prune", "--model", "{model}", "--method", "finercut", *options, *CALIB, "--out", "{tmp}/o", *CPU]


def _moe(model, method, *options):
    return ["prune", "--model", model, "--method", method, *options, *CALIB, "--out", "{tmp}/o", *CPU]


ROWS = [
    # finetune trains WeLore's low-rank factors and CD-MoE's condensed layers: the refusal says both
    Row("finetune of a missing checkpoint names welore and cdmoe",
        ["finetune", "{tmp}/missing", "--data", "file:{calib}", "--steps", "1", "--out", "{tmp}/ft", *CPU],
        needle="written by compresskit prune --method welore (low-rank factors) or --method cdmoe (condensed layers)"),
    Row("finetune of a file names welore and cdmoe",
        ["finetune", "{calib}", "--data", "file:{calib}", "--steps", "1", "--out", "{tmp}/ft", *CPU],
        needle="is not a directory; give a directory written by compresskit prune --method welore (low-rank factors) "
               "or --method cdmoe"),

    # FinerCut --keep: a regex that matches nothing is refused (like --include), before calibration
    Row("finercut --keep matching nothing", _finercut("--remove", "0.25", "--keep", "nomatch"), patch=_no_calibration,
        needle="--keep 'nomatch' matches no candidate at --level sublayer; their names look like model.layers.0.self_attn"),
    Row("finercut --keep leaving too few candidates, before calibration",
        _finercut("--remove", "0.75", "--keep", r"layers\.0\."), patch=_no_calibration,
        needle="--remove 0.75 needs 3 removals but only 2 candidates are left after --keep"),

    # REAP on a group-limited router: the real constraint, found from the config before calibration
    Row("reap removal not a multiple of the router groups", _moe("{grouped}", "reap", "--remove-experts", "0.375"),
        patch=_no_calibration,
        needle="removing 3 of 8 experts per layer: the router scores 2 groups of 4 experts (n_group) and every group "
               "must lose the same number, so remove a multiple of 2; e.g. --remove-experts 0.25"),
    Row("reap leaving the picked groups too small", _moe("{grouped}", "reap", "--remove-experts", "0.75"),
        patch=_no_calibration,
        needle="removing 6 of 8 experts leaves 1 per group; the router picks its top_k = 2 experts only from the best "
               "topk_group = 1 of its 2 groups, which would then hold 1 < 2"),

    # options that do not apply are refused, not ignored
    Row("cdmoe --shared-gate constant on deepseek", _moe("{deepseek}", "cdmoe", "--shared-gate", "constant",
                                                         "--layers", "1", "--experts", "1"),
        patch=_no_calibration, needle="--shared-gate constant folds a gated shared expert (Qwen-MoE's); this deepseek"),
    Row("cdmoe --shared-gate constant on mixtral", _moe("{mixtral}", "cdmoe", "--shared-gate", "constant",
                                                        "--layers", "1", "--experts", "1"),
        patch=_no_calibration, needle="model has none, so it would change nothing: drop --shared-gate"),
    Row("analyze --metric experts --owl-m", ["analyze", "--model", "{deepseek}", "--metric", "experts", "--owl-m", "3",
                                             *CALIB, "--device", "cpu"],
        patch=_no_calibration, needle="--owl-m does not apply to --metric experts"),
    Row("analyze --metric alpha with two foreign options",
        ["analyze", "--model", "{model}", "--metric", "alpha", "--owl-lambda", "0.1", "--min-ratio", "0.2", "--device", "cpu"],
        needle="--owl-lambda, --min-ratio do not apply to --metric alpha"),

    # pydantic's wording never reaches the user
    Row("method option out of range names its flag", _finercut("--remove", "1.5"),
        needle="--method finercut: --remove must be less than 1 (got 1.5)"),
    Row("model-level method check has no empty option name", _finercut(),
        needle="error: --method finercut needs exactly one of --remove R or --remove-params P"),
    Row("analyze owl option out of range", ["analyze", "--model", "{model}", "--metric", "owl", "--owl-m", "-1",
                                            *CALIB, "--device", "cpu"],
        needle="--metric owl: --owl-m must be greater than 0 (got -1.0)"),
    Row("analyze spectrum option out of range", ["analyze", "--model", "{model}", "--metric", "spectrum",
                                                 "--rank-reduction", "1.5", "--device", "cpu"],
        needle="--metric spectrum: --rank-reduction must be in (0, 1), got 1.5; e.g. 0.5"),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_row(row, ctx, monkeypatch):
    res = run_row(row, ctx, monkeypatch)
    line = res.stderr.strip()
    assert "Value error" not in line and "Input should" not in line and "option :" not in line, line
    assert line.count("got ") <= 1, line  # never "got 1.5 (got 1.5)"


def test_recipe_value_is_named_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nstages:\n  - method: reap\n    remove_experts: 1.5\n")
    res = run_cli("run", str(recipe), "--dry-run")
    assert res.exit_code == 2 and res.stderr.count("got 1.5") == 1 and "(got" not in res.stderr, res.stderr
    assert "--remove-experts must be in (0, 1), got 1.5" in res.stderr


def test_finetune_help_speaks_of_welore_and_cdmoe():
    res = run_cli("finetune", "--help")
    text = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "WeLore's low-rank factors and CD-MoE's condensed layers" in text, res.stdout
    assert "(prune --method cdmoe)" in text


def test_eval_tasks_outside_a_git_checkout_is_quiet(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """lm-eval asked git for the current folder's commit ("fatal: not a git repository" on the real
    stderr) and drew its bars on a stderr that is not a terminal; neither reaches the user now."""
    needs_shared(shared_data_dir() / "piqa" / "valid.jsonl")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path is no checkout, whatever is above
    res = run_cli("eval", str(tiny_model_dir("llama")), "--tasks", "piqa_local", "--limit", "2", "--device", "cpu")
    fd = capfd.readouterr()
    assert res.exit_code == 0, res.stderr
    assert res.stderr == "", res.stderr[-2000:]  # no bars, no lm-eval log lines (stderr is not a terminal here)
    assert "fatal" not in fd.err and "not a git repository" not in fd.err, fd.err[-2000:]
    assert "piqa_local" in res.stdout
