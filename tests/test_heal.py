"""``compresskit heal``: the KD loss, masks kept to the entry, structure kept (stock stays stock),
a constructed case where distillation recovers the teacher, resume bit-identical, the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.analysis.distances import token_kl, top_k_logits
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.heal.losses import kd_loss
from compresskit.heal.workflow import HealSettings, heal
from compresskit.heal.state import state_dir_for


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible CPU runs, no oversubscription beside other test workers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wanda_ckpt(tmp_path_factory, tiny_model_dir, sotu_jsonl) -> Path:
    out = tmp_path_factory.mktemp("heal") / "wanda50"
    compresskit.prune(str(tiny_model_dir("llama")), "wanda", sparsity=0.5, out=out, device="cpu",
                      calib=f"file:{sotu_jsonl}", nsamples=4, seqlen=32)
    return out


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory, tiny_model_dir, sotu_jsonl) -> Path:
    out = tmp_path_factory.mktemp("heal") / "blk"
    compresskit.prune(str(tiny_model_dir("llama")), "finercut", out=out, device="cpu", calib=f"file:{sotu_jsonl}",
                      nsamples=4, seqlen=32, method_options={"remove": 0.5, "level": "block"})
    return out


def _settings(sotu: Path, **kw) -> HealSettings:
    base = dict(data=(f"file:{sotu}",), steps=6, lr=1e-3, batch_size=2, seqlen=32, warmup=1, save_every=2,
                eval_every=100)
    return HealSettings(**{**base, **kw})


def _ids() -> torch.Tensor:
    return torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- the loss
def test_kd_loss_is_zero_for_identical_models_and_its_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for temperature in (1.0, 2.0):
        assert float(kd_loss(teacher, teacher.clone(), mask, temperature)) == pytest.approx(0.0, abs=1e-7)
        assert float(kd_loss(top_k_logits(teacher, 4), teacher.clone(), mask, temperature)) == pytest.approx(0.0, abs=1e-7)
    # the loss is T² · mean(token_kl(..., float32, T)) — the toolkit's one KL, not another
    student = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    expected = 4.0 * token_kl(teacher, student, mask, dtype=torch.float32, temperature=2.0).mean()
    assert torch.equal(kd_loss(teacher, student, mask, 2.0), expected)
    # gradient against central finite differences of the same function in float64
    student32 = student.float().requires_grad_(True)
    kd_loss(teacher.float(), student32, mask, 2.0).backward()

    def f(x: torch.Tensor) -> float:
        return float(4.0 * token_kl(teacher, x, mask, dtype=torch.float64, temperature=2.0).mean())

    eps = 1e-6
    for index in [(0, 0, 0), (0, 2, 7), (1, 4, 10), (1, 1, 3)]:
        plus, minus = student.clone(), student.clone()
        plus[index] += eps
        minus[index] -= eps
        numeric = (f(plus) - f(minus)) / (2 * eps)
        assert float(student32.grad[index]) == pytest.approx(numeric, rel=1e-3, abs=1e-6), index
    assert float(student32.grad[0, 3].abs().sum()) == 0.0  # a masked token contributes nothing


# --------------------------------------------------------------------------- sparse: masks kept
def test_healing_a_sparse_checkpoint_keeps_every_pruned_entry_exactly_zero(cli, wanda_ckpt, sotu_jsonl, tmp_path):
    out = tmp_path / "healed"
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("Call me Ishmael. Some years ago, never mind how long precisely, having little money. " * 8)
    res = cli("heal", wanda_ckpt, "--data", f"file:{sotu_jsonl}", "--steps", "5", "--lr", "1e-2", "--warmup", "0",
              "--batch-size", "2", "--seqlen", "32", "--loss", "kd+ce", "--kd-weight", "0.7",
              "--eval-data", f"file:{heldout}", "--eval-every", "5", "--eval-windows", "2",
              "--out", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    before, after = compresskit.load(wanda_ckpt).state_dict(), compresskit.load(out).state_dict()
    assert before.keys() == after.keys()
    pruned_linears = [k for k in before if ".layers." in k and k.endswith("proj.weight")]
    assert len(pruned_linears) == 14
    for key in pruned_linears:
        zeros = before[key] == 0
        assert 0.45 < float(zeros.float().mean()) < 0.55, key
        assert torch.equal(after[key] == 0, zeros), key  # the same entries, to the entry
        assert not torch.equal(after[key], before[key]), key  # and the kept ones trained
    for key in set(before) - set(pruned_linears):  # embeddings, norms, head: not trained
        assert torch.equal(before[key], after[key]), key
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    details = manifest["method_details"]
    assert manifest["method"] == "heal" and manifest["structure"] == []
    assert manifest["stages"][-1]["method"] == "wanda" and manifest["stages"][-1]["path"] == str(wanda_ckpt)
    assert details["trained"]["kinds"] == ["sparse"] and details["trained"]["trained"] == ["sparse"]
    assert details["sparsity_kept"] == {"tensors": 14, "pruned_entries": sum(int((before[k] == 0).sum()) for k in pruned_linears),
                                        "unchanged_per_tensor": True}
    assert manifest["sparsity"]["overall"] == pytest.approx(json.loads((wanda_ckpt / MANIFEST_NAME).read_text())["sparsity"]["overall"])
    assert details["teacher"]["model"] == manifest["base_model"] and details["teacher"]["from"] == "the manifest's base_model"
    assert details["loss"]["kind"] == "kd+ce" and details["loss"]["kd_weight"] == 0.7
    assert details["tokens"] == 5 * 2 * 32 and details["steps"] == 5 and len(details["losses"]) == 5
    assert all(set(p) == {"kd", "ce"} for p in details["loss_parts"])
    assert [(e["step"], e["train_tokens"]) for e in details["evals"]] == [(0, 0), (5, 320)]
    assert manifest["calibration"]["training_data"][0]["source"] == f"file:{sotu_jsonl}"


# --------------------------------------------------------------------------- structure: stock stays stock
def test_a_healed_block_removed_checkpoint_stays_stock(block_ckpt, sotu_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    source = json.loads((block_ckpt / MANIFEST_NAME).read_text())
    assert source["structure"] == [] and source["method_details"]["blocks_deleted"] == 1
    outcome = heal(block_ckpt, tmp_path / "healed", _settings(sotu_jsonl, steps=3), device="cpu")
    trained = outcome.record["method_details"]["trained"]
    assert trained["kinds"] == ["removed"] and trained["trained"] == ["neighbours"] and trained["neighbour_blocks"] == [0]
    plain = AutoModelForCausalLM.from_pretrained(outcome.out).eval()
    ours = compresskit.load(outcome.out)
    assert plain.config.num_hidden_layers == 1 and outcome.record["structure"] == []
    with torch.no_grad():
        assert torch.equal(plain(input_ids=_ids()).logits, ours(input_ids=_ids()).logits)
        assert torch.equal(ours(input_ids=_ids()).logits, outcome.model(input_ids=_ids()).logits)
        assert not torch.equal(ours(input_ids=_ids()).logits, compresskit.load(block_ckpt)(input_ids=_ids()).logits)


def test_removed_sublayers_train_their_neighbours_and_reload(tiny_model_dir, sotu_jsonl, tmp_path):
    fc = tmp_path / "fc"
    compresskit.prune(str(tiny_model_dir("llama")), "finercut", out=fc, device="cpu", calib=f"file:{sotu_jsonl}",
                      nsamples=4, seqlen=32, method_options={"remove": 0.25})
    structure = json.loads((fc / MANIFEST_NAME).read_text())["structure"]
    assert structure and structure[0]["kind"] == "removed_sublayers"
    outcome = heal(fc, tmp_path / "healed", _settings(sotu_jsonl, steps=2, loss="ce"), device="cpu")
    assert outcome.record["structure"] == structure and outcome.record["method_details"]["teacher"] is None
    with torch.no_grad():
        assert torch.equal(compresskit.load(outcome.out)(input_ids=_ids()).logits, outcome.model(input_ids=_ids()).logits)


# --------------------------------------------------------------------------- KD recovers the teacher
def test_distillation_recovers_the_teachers_output_on_the_training_text(tmp_path):
    """A teacher with peaked next-token distributions (head × 20), magnitude-pruned at 50 %: healing
    the masked weights with KD on a short text brings KL(teacher ‖ student) on that text below a
    fifth of its value (measured: 0.20 → 0.03 on the text's first line; the training loss 0.30 →
    ~0.02 in 80 steps, bound: a tenth)."""
    from tiny_models import tiny_model, tiny_tokenizer

    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    tdir = tmp_path / "teacher"
    teacher.save_pretrained(tdir)
    tiny_tokenizer().save_pretrained(tdir)
    text = tmp_path / "train.txt"
    text.write_text(("The committee met on Tuesday to discuss the harbour, the new school and the budget of the "
                     "town. " * 3 + "\n") * 4)
    student = tmp_path / "mag50"
    compresskit.prune(str(tdir), "magnitude", sparsity=0.5, out=student, device="cpu")
    settings = HealSettings(data=(f"file:{text}",), steps=80, lr=1e-3, batch_size=2, seqlen=32, warmup=5, save_every=1000)
    outcome = heal(student, tmp_path / "healed", settings, device="cpu")

    ids = tiny_tokenizer()(text.read_text().split("\n")[0], return_tensors="pt").input_ids[:, :64]

    def kl(model) -> float:
        with torch.no_grad():
            return float(token_kl(teacher(input_ids=ids).logits, model(input_ids=ids).logits).mean())

    before, after = kl(compresskit.load(student)), kl(compresskit.load(outcome.out))
    assert before > 0.1
    assert after < 0.2 * before, (before, after)
    assert sum(outcome.losses[-5:]) / 5 < 0.1 * outcome.losses[0]


# --------------------------------------------------------------------------- resume
def test_resume_after_a_crash_gives_the_uninterrupted_weights(wanda_ckpt, sotu_jsonl, tmp_path):
    settings = _settings(sotu_jsonl)
    straight = heal(wanda_ckpt, tmp_path / "a", settings, device="cpu")

    def crash(phase, step, total, label):
        if step == 5:  # the last saved state is step 4
            raise RuntimeError("simulated crash")

    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        heal(wanda_ckpt, out, settings, device="cpu", progress=crash)
    assert state_dir_for(out).is_dir() and not out.exists()
    resumed = heal(wanda_ckpt, out, settings, device="cpu", resume=True)
    assert resumed.record["method_details"]["resumed_from_step"] == 4
    assert resumed.losses == straight.losses and len(straight.losses) == 6
    assert resumed.record["method_details"]["loss_parts"] == straight.record["method_details"]["loss_parts"]
    a, b = compresskit.load(tmp_path / "a").state_dict(), compresskit.load(out).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not state_dir_for(out).exists()


def test_tokens_set_the_steps_and_finetune_is_the_same_trainer(wanda_ckpt, sotu_jsonl, tmp_path):
    from compresskit.heal.finetune import train_loop
    from compresskit.heal.loop import train_loop as shared

    assert train_loop is shared
    outcome = heal(wanda_ckpt, tmp_path / "t", _settings(sotu_jsonl, steps=None, tokens=150, loss="ce"), device="cpu")
    # 150 tokens at 2 × 32 per step: 3 steps (rounded up), 192 tokens
    assert outcome.record["method_details"]["steps"] == 3 and outcome.record["method_details"]["tokens"] == 192


def test_reap_heals_its_remaining_experts_and_routers_only(tiny_model_dir, sotu_jsonl, tmp_path):
    reap = tmp_path / "reap"
    compresskit.prune(str(tiny_model_dir("qwen2_moe")), "reap", out=reap, device="cpu", calib=f"file:{sotu_jsonl}",
                      nsamples=2, seqlen=32, method_options={"remove_experts": 0.25})
    outcome = heal(reap, tmp_path / "healed", _settings(sotu_jsonl, steps=2, loss="ce", lr=1e-2), device="cpu")
    trained = outcome.record["method_details"]["trained"]
    assert trained["kinds"] == ["reap"] and trained["trained"] == ["reap"]
    before, after = compresskit.load(reap).state_dict(), compresskit.load(outcome.out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.experts." in k or k.endswith(".mlp.gate.weight") for k in changed), sorted(changed)
    assert any(k.endswith(".mlp.gate.weight") for k in changed) and any(".mlp.experts." in k for k in changed)
    assert not any("shared_expert" in k or "self_attn" in k or "embed" in k for k in changed)
