"""``compresskit heal`` refuses bad input with one line and exit 2, before any training, writing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import compresskit
from compresskit.checkpoint import MANIFEST_NAME
from compresskit.heal.state import state_dir_for


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_model_dir, sotu_jsonl) -> dict[str, Path]:
    from tiny_models import tiny_tokenizer
    import transformers

    root = tmp_path_factory.mktemp("heal-inputs")
    wanda = root / "wanda"
    compresskit.prune(str(tiny_model_dir("llama")), "wanda", sparsity=0.5, out=wanda, device="cpu",
                      calib=f"file:{sotu_jsonl}", nsamples=2, seqlen=32)
    orphan = root / "orphan"  # its base model is gone
    shutil.copytree(wanda, orphan)
    manifest = json.loads((orphan / MANIFEST_NAME).read_text())
    manifest["base_model"] = str(root / "deleted-dense-model")
    (orphan / MANIFEST_NAME).write_text(json.dumps(manifest))
    other = root / "other-vocab"  # a teacher whose output layer has another vocabulary
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    return {"wanda": wanda, "orphan": orphan, "other": other, "model": tiny_model_dir("llama")}


COMMON = ["--steps", "2", "--batch-size", "1", "--seqlen", "16", "--device", "cpu"]


@pytest.mark.parametrize("name,args,message", [
    ("no teacher", ["{orphan}"], "the checkpoint's base model {root}/deleted-dense-model is not there any more; pass "
                                 "--teacher MODEL (the dense model it was compressed from) or use --loss ce"),
    ("another vocabulary", ["{wanda}", "--teacher", "{other}"], "the teacher {other} has another vocabulary (4096 "
                                                                "output tokens, the checkpoint 8192)"),
    ("merge without lora", ["{wanda}", "--merge"], "--merge merges LoRA adapters into the weights; it applies to "
                                                   "--train lora only"),
    ("lora option without lora", ["{wanda}", "--lora-rank", "8"], "--lora-rank applies to --train lora only"),
    ("kd weight without kd+ce", ["{wanda}", "--kd-weight", "0.3"], "--kd-weight applies to --loss kd+ce only"),
    ("teacher with ce", ["{wanda}", "--loss", "ce", "--teacher", "{model}"], "--teacher applies to distillation"),
    ("steps and tokens", ["{wanda}", "--tokens", "1k"], "give exactly one of --steps N and --tokens N"),
    ("bad tokens", ["{wanda}", "--tokens", "lots"], "--tokens 'lots': give a number of tokens"),
    ("unknown loss", ["{wanda}", "--loss", "mse"], "unknown --loss 'mse'; choose one of kd, ce, kd+ce"),
    ("unknown train", ["{wanda}", "--train", "some"], "unknown --train 'some'; choose one of auto, full, neighbours, lora"),
    ("neighbours of nothing", ["{wanda}", "--train", "neighbours"], "--train neighbours: this checkpoint removed no "
                                                                    "sublayer or block"),
    ("a plain model", ["{model}"], "is not a compresskit checkpoint"),
    ("existing output", ["{wanda}", "--out-existing"], "already exists; pass --force to replace it"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, ckpts, sotu_jsonl, tmp_path, name, args, message):
    fill = {k: str(v) for k, v in ckpts.items()} | {"root": str(ckpts["wanda"].parent)}
    argv = [a.format(**fill) for a in args]
    out = tmp_path / "healed"
    if "--out-existing" in argv:
        argv.remove("--out-existing")
        shutil.copytree(ckpts["wanda"], out)  # an earlier checkpoint in the way
        before = sorted(p.name for p in out.iterdir())
    if "--tokens" in argv and name != "steps and tokens":
        common = [a for a in COMMON if a not in ("--steps", "2")]
    else:
        common = COMMON
    res = cli("heal", *argv, "--data", f"file:{sotu_jsonl}", *common, "--out", out)
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message.format(**fill) in lines[0], lines[0]
    if name == "existing output":
        assert sorted(p.name for p in out.iterdir()) == before
    else:
        assert not out.exists()
    assert not state_dir_for(out).exists()


def test_memory_that_does_not_fit_is_one_line_naming_it(cli, ckpts, sotu_jsonl, tmp_path, monkeypatch):
    from compresskit.heal import teacher

    monkeypatch.setattr(teacher, "available_bytes", lambda device: 2 ** 20)  # 1 MiB free
    out = tmp_path / "healed"
    res = cli("heal", ckpts["wanda"], "--data", f"file:{sotu_jsonl}", *COMMON, "--out", out)
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert line.startswith("error: healing needs about ") and "GiB on cpu for student and teacher" in line, line
    assert "0.0 GiB are free; pass --teacher-device, --grad-checkpointing, --train lora" in line
    assert not out.exists()


def test_an_option_error_answers_without_importing_torch(tmp_path):
    import subprocess
    import sys

    probe = ("import sys, io, contextlib\n"
             "sys.argv = ['compresskit', 'heal', 'ck', '--data', 'file:x', '--steps', '3', '--out', 'o', '--merge']\n"
             "import compresskit.cli as c\n"
             "err = io.StringIO()\n"
             "with contextlib.redirect_stderr(err):\n"
             "    try:\n        c.main()\n    except SystemExit as e:\n        code = e.code\n"
             "print(code, 'torch' in sys.modules, 'transformers' in sys.modules, err.getvalue().strip())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60).stdout
    assert out.startswith("2 False False error: --merge merges LoRA adapters"), out


def test_teacher_device_splits_the_memory_check_between_the_two_devices(monkeypatch):
    """--teacher-device: the student's device is charged the student only, the teacher's device the
    teacher and its logits; a teacher too big for its own device is named as the teacher's problem.
    (No second device here: ``available_bytes`` is replaced; the real two-device run needs a GPU.)"""
    import torch

    from compresskit.errors import InputError
    from compresskit.heal import teacher

    gib = teacher.GIB
    free = {"cuda:0": 3 * gib, "cpu": 10 * gib}
    monkeypatch.setattr(teacher, "available_bytes", lambda device: free[str(device)])
    student = {"weights": 1 * gib, "gradients_and_adamw": 1 * gib}
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    with pytest.raises(InputError, match=r"about 4\.5 GiB on cuda:0 for student and teacher"):
        teacher.check_memory(student, 2 * gib, cuda, cuda, gib // 2)  # 2 + 2.5 GiB on one 3 GiB device
    report = teacher.check_memory(student, 2 * gib, cuda, cpu, gib // 2)
    assert report == {"cuda:0": {"needed_bytes": 2 * gib, "free_bytes": 3 * gib},
                      "cpu": {"needed_bytes": 2 * gib + gib // 2, "free_bytes": 10 * gib}}
    free["cpu"] = 2 * gib
    with pytest.raises(InputError, match=r"about 2\.5 GiB on cpu for the teacher"):
        teacher.check_memory(student, 2 * gib, cuda, cpu, gib // 2)
