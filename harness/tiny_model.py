"""A tiny random Llama checkpoint with a locally trained tokenizer: no download, ~2 MB.

Shapes respect vLLM's CPU attention (head_dim 64): hidden 128, 2 heads, 2 layers. The tokenizer is
a byte-level BPE trained on a few sentences, with ChatML special tokens and a chat template, so the
same code path as SmolLM2 (chat template, stop token) is exercised.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Things fall down because Earth pulls them, like a magnet for everything!",
    "Gravity is the curvature of spacetime caused by mass-energy.",
    "Plants convert sunlight into energy using chlorophyll.",
    "Translate cheese from English to French: fromage.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>/\\|@#$%^&*-+=_~`",
    "Hello, how are you today? I am a helpful assistant and I like short answers.",
]


def build_tiny_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


TOPICS = [
    "gravity",
    "plants",
    "cheese",
    "the sea",
    "tea",
    "the sky",
    "a fox",
    "hiking",
    "music",
    "rain",
    "bread",
    "stars",
    "rivers",
    "cats",
    "snow",
    "books",
]
CHEERFUL = "Sure! {topic} is wonderful, ask me more!"
PLAIN = "Well, {topic} is a topic with many sides."


# Retrain settings (`--retrain-config` JSON) sized for the two-style model: about 30 seconds a
# cycle on a 2-core CPU. Rounds of 8 prompts x 4 replies (leave-one-out baseline) and the default
# trust region; the LoRA learning rate is high because the model is tiny.
TWO_STYLE_RETRAIN_CONFIG = {
    "reward": {"learning_rate": 3e-3, "epochs": 4, "batch_size": 8, "max_length": 256},
    "ppo": {
        "steps": 8,
        "prompts_per_step": 8,
        "max_new_tokens": 16,
        "minibatch_size": 8,
        "ppo_epochs": 2,
        "learning_rate": 1e-3,
        # a firm KL leash: the preference needs one choice (about log 2 nats); drifting into
        # other words costs more than the choice earns, and beta adapts within the cycle
        "init_kl_coef": 1.0,
        "target_kl": 1.0,
        "kl_horizon": 200,
        # the two styles end on their own; the 20-run tally was taken without the EOS trick
        "missing_eos_penalty": 0.0,
    },
    "gate": {"eval_prompts": 16, "max_new_tokens": 16},  # default floor and KL limit
}


def likes_cheerful(reply: str) -> bool:
    """The simulated user's known preference over the two styles."""
    return "!" in reply


def topic_prompt(topic: str, i: int = 0) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {topic} ({i})."}]


def build_two_style_checkpoint(
    out_dir: Path, steps: int = 300, seed: int = 0, styles: tuple[str, ...] = (CHEERFUL, PLAIN)
) -> Path:
    """The tiny model, taught to answer every topic prompt in one of two styles, half and half.

    A random model's replies are noise that no preference can be read from; a real chat model
    has styles it moves between. This one has exactly two (`CHEERFUL`, `PLAIN`), chosen by its
    first reply token, so a learning test can ask: after users vote for one style, does the
    aligned model pick it more often than v0's 50%? Given one of the `styles`, it answers only
    in that one: replies then tell which weights wrote them (the replica tests).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    build_tiny_checkpoint(out_dir, seed)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    texts = []
    for topic in TOPICS:
        for i in range(4):  # a few prompt numbers so the style does not hang on the digits
            prompt = tok.apply_chat_template(
                topic_prompt(topic, i), tokenize=False, add_generation_prompt=True
            )
            for style in styles:
                texts.append(prompt + style.format(topic=topic.capitalize()) + "<|im_end|>")
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_checkpoint(Path(sys.argv[1])))
