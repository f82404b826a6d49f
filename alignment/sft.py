"""Supervised fine-tuning on constitutional revisions: (prompt, final revision) pairs.

TRL's `SFTTrainer` on the prompt-completion conversational format, with completion-only loss
(loss on the revision's tokens, not the prompt's) and a LoRA adapter, merged into a checkpoint that
then serves as the base (and KL reference) of the reward model and PPO in the same cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from alignment.adapters import peft_config
from alignment.config import SFTConfig
from alignment.precision import attention_implementation, base_dtype, train_device
from alignment.tracking import trainer_relay


def sft_records(examples: list[dict], demonstration_weight: int = 1) -> list[dict]:
    """TRL's prompt-completion records. `examples` are constitutional revisions (`source`
    "ai" or absent) and human demonstrations (`source` "human"); each demonstration is
    repeated `demonstration_weight` times: a person wrote exactly the reply they wanted, which
    is worth more than the model's own rewrite."""
    records = []
    for r in examples:
        if not r["revision"].strip():
            continue
        record = {
            "prompt": r["prompt"],
            "completion": [{"role": "assistant", "content": r["revision"]}],
        }
        copies = demonstration_weight if r.get("source") == "human" else 1
        records.extend([record] * copies)
    return records


def completion_loss(model, tokenizer, records: list[dict]) -> float:
    """Mean token cross-entropy of the completions given their prompts (for before/after)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in records:
            prompt_ids = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)
            full_ids = tokenizer.apply_chat_template(r["prompt"] + r["completion"])
            if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
                prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
            ids = torch.tensor([full_ids], device=device)
            labels = ids.clone()
            labels[:, : len(prompt_ids)] = -100  # loss on the completion only
            out = model(input_ids=ids, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += out.loss.item() * n
            count += n
    return total / max(count, 1) if count else math.nan


def train_sft(
    base_model: str,
    records: list[dict],
    out_dir: Path,
    config: SFTConfig,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    """Train, merge and save; returns the merged checkpoint path and before/after losses.
    `on_log` receives the trainer's logs with their step (the cycle's progress and trackers)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    if not records:
        raise ValueError("no revisions to fine-tune on")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        dtype=base_dtype(config.base_weights, train_device()),
        attn_implementation=attention_implementation(config.attention, train_device()),
    )
    before = completion_loss(model, tokenizer, records)
    args = TRLSFTConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",  # its logs reach the cycle's trackers through `on_log`
        gradient_checkpointing=config.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config(config.adapter, "CAUSAL_LM", config.lora_rank, config.lora_alpha),
        callbacks=[trainer_relay(on_log)] if on_log else None,
    )
    output = trainer.train()
    after = completion_loss(trainer.model, tokenizer, records)
    merged = trainer.model.merge_and_unload()
    checkpoint = out_dir / "merged"
    merged.to(torch.bfloat16).save_pretrained(checkpoint, safe_serialization=True)
    tokenizer.save_pretrained(checkpoint)
    return {
        "path": str(checkpoint),
        "loss_before": before,
        "loss_after": after,
        "train_loss": output.training_loss,
        "steps": output.global_step,
        "examples": len(records),
    }
