"""Prove that an engine elsewhere can read the app's versions folder, before the first swap.

A deploy hands each engine a path inside the versions folder; an engine on another machine sees
it only if the folder is shared there (at the same path, or at `--engine-versions-dir`). Rather
than let the first swap fail halfway through a cycle, the app writes a probe into the folder at
start: a LoRA adapter of rank 1 whose weights are zero (it changes no output), which each engine
must load. An adapter is what an engine loads cheaply from a path (no pause, no reload), and the
canary needs adapter loading anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

PROBE_NAME = "versions-folder-probe"
# Architectures whose attention has its own `q_proj` (the module the probe adapts); for others
# the probe is skipped rather than refused for a module the model does not have.
SEPARATE_Q_PROJ = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
     "gemma3_text", "granite", "olmo", "olmo2", "starcoder2", "cohere"}
)  # fmt: skip


def write_probe_adapter(versions_dir: Path, checkpoint: Path) -> Path | None:
    """A zero LoRA adapter for `checkpoint`'s architecture under `versions_dir`; None when the
    checkpoint's config does not say the shapes (the probe is then skipped)."""
    import numpy as np
    from safetensors.numpy import save_file

    try:
        config = json.loads((checkpoint / "config.json").read_text())
        if config.get("model_type") not in SEPARATE_Q_PROJ:
            return None  # its attention projections may be fused (e.g. Phi-3's qkv_proj)
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = versions_dir / f".{PROBE_NAME}"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model.model.layers"
    tensors = {}
    for layer in range(layers):
        name = f"{prefix}.{layer}.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = np.zeros((1, hidden), dtype=np.float32)
        tensors[f"{name}.lora_B.weight"] = np.zeros((heads * head_dim, 1), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj"],
        "base_model_name_or_path": str(checkpoint),
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder
