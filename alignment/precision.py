"""Mixed precision for training and scoring: bf16 autocast where the hardware computes bf16
natively (CPUs with AVX-512-BF16 or AMX, CUDA GPUs that support it), fp32 elsewhere.

Weights, LoRA matrices and optimiser state stay fp32; only matmuls run in bf16, and log-probs
and losses are taken from fp32 logits, so PPO's ratios keep their precision. On this project's
2-core AVX-512-BF16 VM a SmolLM2-shaped MLP and vocabulary head ran 1.7x faster (bench/training.py
measures the whole steps).
"""

from __future__ import annotations

import contextlib

import torch

from alignment.config import ATTENTIONS, PRECISIONS
from engine.hardware import cpu_has_bf16


def use_bf16(precision: str, device: str) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def autocast(precision: str, device: str):
    """A context that runs matmuls in bf16 when `use_bf16`, else does nothing."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if use_bf16(precision, device):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_device() -> str:
    """Where a cycle trains: the GPU when there is one (the worker sees the GPUs its
    CUDA_VISIBLE_DEVICES gives it; a second GPU keeps training off the engine's)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_dtype(setting: str, device: str) -> torch.dtype:
    """The dtype the frozen base weights are held in. LoRA matrices, heads and optimiser state
    stay fp32 whatever this says (peft casts adapters up). 'auto': bf16 on a GPU, where a 7B
    policy is 14 GB instead of 28 and the reward models' copy as much again (the budget in
    docs/deployment.md); fp32 on the CPU, where the learning results in bench/RESULTS.md were
    measured (matmuls still run in bf16 there under `precision`)."""
    if setting not in PRECISIONS:
        raise ValueError(f"base_weights must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch.bfloat16 if setting == "bf16" else torch.float32


def attention_implementation(setting: str, device: str) -> str:
    """transformers' `attn_implementation` for training and scoring. 'auto': eager on the CPU,
    where torch's fused attention kernel takes about 4x its forward time in the backward pass
    and eager attention makes a SmolLM2 LoRA step about 1.2x faster (bench/training.py); sdpa on
    a GPU, where the fused kernel is the fast one."""
    if setting not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {setting!r}")
    if setting == "auto":
        return "sdpa" if device.startswith("cuda") else "eager"
    return setting
