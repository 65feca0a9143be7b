"""The one loading layer (issue 20): ``checkpoint.reader.open_model`` for every source and both ways,
and no module of the layer reaching into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.checkpoint.reader import LoadedModel, open_model
from compresskit.errors import ModelLoadError
from compresskit.models.lazy_store import lazy_ref
from compresskit.models.source import Source, resolve_source
from tiny_models import tiny_model, tiny_tokenizer

PACKAGE = Path(compresskit.__file__).parent
LAYER = ["models", "checkpoint", "engine", "api.py", "evaluate.py"]


def _private_imports(path: Path) -> list[str]:
    """``from <compresskit module> import _name`` in ``path`` (relative or absolute)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("compresskit")):
            if node.module == "__future__":
                continue
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_of_the_loading_layer_imports_another_modules_private_name():
    files = [f for part in LAYER for f in ([PACKAGE / part] if part.endswith(".py") else (PACKAGE / part).rglob("*.py"))]
    assert len(files) > 15
    offenders = [hit for f in files for hit in _private_imports(f)]
    assert offenders == []


def test_the_check_finds_a_private_import(tmp_path):
    (tmp_path / "m.py").write_text("from .loading import _auto_class\nfrom compresskit.x import public, _hidden\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert _private_imports(tmp_path / "m.py") == ["m.py:1 _auto_class", "m.py:2 _hidden"]
    finally:
        PACKAGE = saved


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_a_local_directory_resolves_once_and_loads_lazily_or_in_memory(llama_dir):
    source = resolve_source(str(llama_dir))
    assert (source.kind, source.directory, source.is_checkpoint) == ("local", llama_dir, False)
    lazy = open_model(str(llama_dir), lazy=True)
    memory = open_model(source)
    assert lazy.loading == "lazy" and memory.loading == "in-memory: --load in-memory"
    assert lazy.adapter.num_blocks == memory.adapter.num_blocks == 2
    assert lazy.tokenizer is not None and memory.tokenizer is not None
    assert all(lazy_ref(t) is not None for k, t in lazy.model.state_dict(keep_vars=True).items() if ".layers." in k)
    assert not any(t.is_meta for t in memory.model.state_dict().values())
    assert not lazy.model.config.use_cache and not lazy.model.training and lazy.model._compresskit_loading == "lazy"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(lazy.model(ids).logits, memory.model(ids).logits)
    assert lazy.provenance == str(llama_dir.resolve()) and lazy.stages() == [] and lazy.revision("r") == "r"


def test_a_checkpoint_brings_its_manifest_history_and_structure(llama_dir, tmp_path):
    out = compresskit.prune(str(llama_dir), "magnitude", sparsity=0.5, out=tmp_path / "ckpt", device="cpu")
    loaded = open_model(str(out.out), lazy=True)
    assert loaded.source.is_checkpoint and loaded.manifest is not None and loaded.loading == "lazy"
    assert loaded.provenance == str(llama_dir.resolve())  # the input checkpoint's base model
    (stage,) = loaded.stages()
    assert stage["method"] == "magnitude" and stage["path"] == str(out.out)
    again = compresskit.prune(str(out.out), "magnitude", sparsity=0.6, device="cpu")
    assert again.manifest.base_model == str(llama_dir.resolve()) and len(again.manifest.stages) == 1


def test_a_model_object_is_taken_as_it_is(llama_dir):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    loaded = open_model(model, tokenizer=tok)
    assert isinstance(loaded, LoadedModel) and loaded.model is model and loaded.tokenizer is tok
    assert loaded.source is None and loaded.loading == "in-memory: model object passed in"


def test_a_name_that_is_nothing_is_one_line():
    with pytest.raises(ModelLoadError, match="model path './nowhere' does not exist"):
        resolve_source("./nowhere")
    assert Source("org/m", "hub").pretrained_id == "org/m"
