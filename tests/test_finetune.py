"""``compresskit finetune``: only the low-rank factors change, loss falls, resume is exact, output reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.errors import InputError
from compresskit.heal.finetune import FinetuneSettings, finetune
from compresskit.paths import shared_data_dir
from compresskit.heal.state import state_dir_for


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores shared with other test runs: one intra-op thread avoids oversubscription stalls
    and keeps CPU results bit-reproducible between the runs a test compares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def welore_ckpt(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("ft") / "welore"
    compresskit.prune(str(tiny_model_dir("llama")), "welore", out=out, device="cpu",
                      method_options={"rank_reduction": 0.5, "min_ratio": 0.3})
    return out


def _moby() -> str:
    path = shared_data_dir() / "corpora" / "moby_dick.txt"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return f"file:{path}"


def _settings(sotu: Path, **kw) -> FinetuneSettings:
    base = dict(data=(f"file:{sotu}",), steps=12, lr=2e-3, batch_size=2, seqlen=32, warmup=2, save_every=4,
                eval_every=100)
    return FinetuneSettings(**{**base, **kw})


def _state(directory: Path) -> dict[str, torch.Tensor]:
    return compresskit.load(directory).state_dict()


def test_only_factors_change_loss_falls_and_the_output_reloads(cli, welore_ckpt, sotu_jsonl, tmp_path):
    out = tmp_path / "ft"
    res = cli("finetune", welore_ckpt, "--data", f"file:{sotu_jsonl}", "--steps", "30", "--lr", "2e-3",
              "--warmup", "3", "--batch-size", "4", "--seqlen", "32", "--eval-data", _moby(), "--eval-every", "10",
              "--eval-windows", "4", "--compare-full", "--compare-steps", "2", "--out", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)

    before, after = _state(welore_ckpt), _state(out)
    assert before.keys() == after.keys()
    factor_keys = {k for k in before if k.endswith((".U.weight", ".V.weight"))}
    ranks = json.loads((welore_ckpt / MANIFEST_NAME).read_text())["structure"][0]["ranks"]
    assert factor_keys == {f"{n}.{p}.weight" for n in ranks for p in "UV"}
    for key in before:
        if key in factor_keys:
            assert not torch.equal(before[key], after[key]), key
        else:  # frozen: embeddings, norms, head, dense (N-LRC) matrices
            assert torch.equal(before[key], after[key]), key

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    details = manifest["method_details"]
    trainable = sum(before[f"{n}.U.weight"].numel() + before[f"{n}.V.weight"].numel() for n in ranks)
    total = sum(t.numel() for t in before.values())  # llama tiny: untied head, all tensors are parameters
    assert details["trainable_params"] == summary["trainable_params"] == trainable
    assert details["total_params"] == total and manifest["parameters"]["trainable"] == trainable
    assert details["memory_estimate_bytes"] == {"lowrank_only": 12 * trainable, "full": 12 * total}
    assert details["full_finetune_comparison"]["trainable_params"] == total
    assert details["full_finetune_comparison"]["steps"] == 2
    assert details["peak_memory"]["kind"].startswith("cpu_rss_peak") and details["peak_memory"]["peak_bytes"] > 0

    losses = details["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    evals = details["evals"]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert evals[-1]["ppl"] < evals[0]["ppl"]

    assert manifest["method"] == "finetune" and manifest["structure"][0]["ranks"] == ranks
    assert manifest["loadable_with_transformers"] is False
    assert manifest["stages"][-1]["method"] == "welore" and manifest["stages"][-1]["path"] == str(welore_ckpt)
    assert manifest["hyperparameters"]["steps"] == 30 and manifest["hyperparameters"]["lr"] == 2e-3
    assert not state_dir_for(out).exists()  # the resumable state is removed once the output exists


def test_resume_after_a_crash_gives_the_uninterrupted_weights(welore_ckpt, sotu_jsonl, tmp_path):
    settings = _settings(sotu_jsonl)
    straight = finetune(welore_ckpt, tmp_path / "a", settings, device="cpu")

    def crash(phase, step, total, label):
        if step == 10:  # the last saved state is step 8
            raise RuntimeError("simulated crash")

    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(welore_ckpt, out, settings, device="cpu", progress=crash)
    assert state_dir_for(out).is_dir() and not out.exists()
    with pytest.raises(InputError, match="--resume"):
        finetune(welore_ckpt, out, settings, device="cpu")
    with pytest.raises(InputError, match="--lr"):
        finetune(welore_ckpt, out, _settings(sotu_jsonl, lr=1e-3), device="cpu", resume=True)

    resumed = finetune(welore_ckpt, out, settings, device="cpu", resume=True)
    assert resumed.manifest.method_details["resumed_from_step"] == 8
    assert resumed.losses == straight.losses and len(straight.losses) == 12
    a, b = _state(tmp_path / "a"), _state(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(compresskit.load(out)(input_ids=ids).logits, resumed.model(input_ids=ids).logits)


def test_a_checkpoint_without_factors_has_nothing_to_finetune(cli, tiny_model_dir, sotu_jsonl, tmp_path):
    merged = tmp_path / "merged"
    assert cli("prune", "--model", tiny_model_dir("llama"), "--method", "welore", "--rank-reduction", "0.5",
               "--merge", "--out", merged, "--device", "cpu", "--quiet").exit_code == 0
    out = tmp_path / "never"
    res = cli("finetune", merged, "--data", f"file:{sotu_jsonl}", "--steps", "2", "--warmup", "0", "--out", out)
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "error: nothing to fine-tune: the checkpoint has no low-rank factors or condensed experts; "
        "compress it with --method welore (without --merge) or --method cdmoe first"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "10", "--warmup", "11"], "--warmup must be in [0, --steps 10]"),
        (["--steps", "0", "--warmup", "0"], "--steps must be an integer >= 1"),
        (["--steps", "5", "--warmup", "0", "--lr", "0"], "--lr must be > 0"),
    ],
)
def test_bad_training_settings_fail_before_loading(cli, welore_ckpt, sotu_jsonl, tmp_path, args, message):
    out = tmp_path / "never"
    res = cli("finetune", welore_ckpt, "--data", f"file:{sotu_jsonl}", *args, "--out", out)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not out.exists() and not state_dir_for(out).exists()


def test_gradient_checkpointing_trains_the_same_weights(welore_ckpt, sotu_jsonl, tmp_path):
    plain = finetune(welore_ckpt, tmp_path / "plain", _settings(sotu_jsonl, steps=3), device="cpu")
    ckpt = finetune(welore_ckpt, tmp_path / "gc", _settings(sotu_jsonl, steps=3, grad_checkpointing=True), device="cpu")
    assert ckpt.manifest.hyperparameters["grad_checkpointing"] is True
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), ckpt.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
