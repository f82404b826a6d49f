"""Merge the policy's LoRA adapter into a full checkpoint: a new numbered version with a manifest.

The result is an ordinary checkpoint (bf16 safetensors + tokenizer) that vLLM reloads in place.
Written to a `.partial` folder and renamed, so a crash never leaves a half version behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def merge_to_checkpoint(policy, tokenizer, out_dir: Path, manifest: dict) -> Path:
    merged = policy.lm.merge_and_unload()  # W' = W + (alpha/r) BA; the policy is spent after
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
