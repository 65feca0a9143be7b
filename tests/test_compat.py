"""compat.py holds every private name compresskit uses from another library, and says loudly when one
is gone; no other module imports one; the pinned environment and the versions compat names agree."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from compresskit import compat
from compresskit.compat import CompatError, internal

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compresskit"
LOCK = ROOT / "requirements" / "ci.txt"
OTHERS = ("transformers", "safetensors", "torch", "accelerate", "datasets", "lm_eval", "huggingface_hub", "typer",
          "click", "peft", "tokenizers", "rich", "pydantic", "gguf")


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = ver
    return pins


def test_every_internal_is_present_in_this_environment():
    assert compat.problems() == []


def test_checked_versions_are_the_pinned_ones():
    pins = _lock()
    for library, checked in compat.CHECKED_WITH.items():
        assert pins[re.sub(r"[-_.]+", "-", library).lower()] == checked, library
    assert {e.library for e in compat.INTERNALS.values()} <= set(compat.CHECKED_WITH)


def test_lock_pins_every_imported_library_exactly():
    pins = _lock()
    for name in ("torch", "transformers", "safetensors", "accelerate", "datasets", "lm-eval", "typer", "rich",
                 "pydantic", "numpy", "scipy", "pytest", "pytest-xdist", "setuptools", "pip"):
        assert re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", pins[name]), name


@pytest.mark.parametrize("name", sorted(compat.INTERNALS))
def test_a_missing_internal_fails_with_one_line_naming_the_versions(name, monkeypatch):
    entry = compat.INTERNALS[name]
    owner = importlib.import_module(entry.module)
    *path, last = entry.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    for holder in getattr(owner, "__mro__", (owner,)):  # a class attribute may be inherited: remove every copy
        if last in vars(holder):
            monkeypatch.delattr(holder, last)
    with pytest.raises(CompatError) as info:
        internal(name)
    text = str(info.value)
    assert "\n" not in text
    assert f"{entry.library} {compat.version(entry.library)} has no {entry.module}.{entry.attr}" in text
    assert f"checked with {entry.library} {compat.CHECKED_WITH[entry.library]}" in text
    assert any(name == p.split(" has no ")[1].split(" ")[0] for p in compat.problems() if " has no " in p)


def test_a_changed_signature_is_caught(monkeypatch):
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "_get_dtype", lambda config, dtype, *rest: None)
    with pytest.raises(CompatError, match=r"changed the parameters \(config, dtype, rest\) of transformers.modeling_utils._get_dtype"):
        internal("transformers.modeling_utils._get_dtype")


def test_lazy_loading_falls_back_with_the_compat_line(monkeypatch):
    import transformers.core_model_loading as cml

    from compresskit.models.lazy import LazyUnsupported, _require_transformers_loading_api

    monkeypatch.delattr(cml, "rename_source_key")
    with pytest.raises(LazyUnsupported, match=r"transformers \S+ has no transformers.core_model_loading.rename_source_key"):
        _require_transformers_loading_api()


def test_no_other_module_imports_a_private_name_of_another_library():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in OTHERS:
                private = [p for p in node.module.split(".") if p.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {private}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}" for a in node.names
                              if a.name.split(".")[0] in OTHERS and any(p.startswith("_") for p in a.name.split("."))]
            elif isinstance(node, ast.Attribute) and node.attr in {"_model_mapping", "_apply", "_version", "_click",
                                                                   "_get_dtype", "_getdtype", "_TYPES"}:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_removed_attention_no_longer_needs_transformers_dummy_layer():
    # It used transformers.cache_utils.DummyLayer, which lacks get_seq_length since 5.25 (issue 16).
    source = (PACKAGE / "depth" / "removal.py").read_text()
    assert "DummyLayer()" not in source and "import" not in source.split("DummyLayer")[0].splitlines()[-1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_safetensors_dtype_names_match_what_safetensors_writes(dtype, tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"t": torch.zeros(2, dtype=dtype)}, str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        written = f.get_slice("t").get_dtype()
    from compresskit.models.weight_files import safetensors_dtype, safetensors_dtype_name

    assert safetensors_dtype_name(dtype) == written
    assert safetensors_dtype(written) == dtype


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("10KB", 10**4), ("1.5GB", 15 * 10**8),
                                           ("2GiB", 2 * 2**30), ("123", 123), (4096, 4096)])
def test_parse_size(text, expected):
    assert compat.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "5XB", "abc"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="size"):
        compat.parse_size(text)
