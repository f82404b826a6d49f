"""The CPU LoRA ops against vLLM's own: the same products for tokens with an adapter, nothing
for tokens without one; and in the real engine, replies from an adapter change while the base
weights' stay the same."""

from __future__ import annotations

import pytest
import torch

from engine import vllm_cpu_lora as fast

reference = pytest.importorskip("vllm.lora.ops.torch_ops")


def _stacked(slots: int, out: int, inp: int) -> torch.Tensor:
    return torch.randn(slots, 1, out, inp, dtype=torch.bfloat16)  # vLLM's (slots, 1, out, in)


@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0], [1, 0, 1, 1, 0], [0, 1, 0, 1, 1]])
def test_shrink_and_expand_match_vllm_where_every_token_has_an_adapter(indices):
    torch.manual_seed(0)
    slots = torch.tensor(indices)
    x = torch.randn(len(indices), 32, dtype=torch.bfloat16)
    a = _stacked(2, 8, 32)
    ours, theirs = torch.zeros(len(indices), 8), torch.zeros(len(indices), 8)
    fast.bgmv_shrink(x, a, ours, slots, 0.5)
    reference.bgmv_shrink(x, a, theirs, slots, 0.5)
    torch.testing.assert_close(ours, theirs)

    b = _stacked(2, 48, 8)
    y0 = torch.randn(len(indices), 64, dtype=torch.bfloat16)
    ours_y, theirs_y = y0.clone(), y0.clone()
    fast.bgmv_expand_slice(ours, b, ours_y, slots, 16, 48, True)
    reference.bgmv_expand_slice(theirs, b, theirs_y, slots, 16, 48, True)
    torch.testing.assert_close(ours_y, theirs_y)
    ours_y, theirs_y = y0.clone(), y0.clone()
    fast.bgmv_expand(ours, b, ours_y, slots, True)
    reference.bgmv_expand(theirs, b, theirs_y, slots, True)
    torch.testing.assert_close(ours_y, theirs_y)


def test_prefill_ops_match_vllm_on_runs_of_requests():
    torch.manual_seed(1)
    run_slots, run_lengths = torch.tensor([1, 0, 1]), torch.tensor([3, 2, 4])
    rows = int(run_lengths.sum())
    x = torch.randn(rows, 32, dtype=torch.bfloat16)
    a = _stacked(2, 8, 32)
    meta = (torch.tensor([0, 3, 5]), run_lengths, run_slots, 3, 4, rows)
    ours, theirs = torch.zeros(rows, 8), torch.zeros(rows, 8)
    fast.sgmv_shrink(x, a, ours, *meta, 2.0)
    reference.sgmv_shrink(x, a, theirs, *meta, 2.0)
    torch.testing.assert_close(ours, theirs)
    b = _stacked(2, 40, 8)
    ours_y, theirs_y = torch.zeros(rows, 40), torch.zeros(rows, 40)
    fast.sgmv_expand(ours, b, ours_y, *meta, True)
    reference.sgmv_expand(theirs, b, theirs_y, *meta, True)
    torch.testing.assert_close(ours_y, theirs_y)


def test_tokens_without_an_adapter_get_no_adapter():
    """-1 is "no adapter" (vLLM's torch ops index the stacked weights with it: the last slot)."""
    torch.manual_seed(2)
    slots = torch.tensor([-1, 0, -1])
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    a, b = _stacked(2, 8, 32), _stacked(2, 16, 8)
    buffer = torch.zeros(3, 8)
    fast.bgmv_shrink(x, a, buffer, slots, 1.0)
    y = torch.zeros(3, 16, dtype=torch.bfloat16)
    fast.bgmv_expand(buffer, b, y, slots, True)
    assert torch.count_nonzero(y[[0, 2]]) == 0 and torch.count_nonzero(y[1]) > 0
    only_base = torch.zeros(3, 8)
    fast.bgmv_shrink(x, a, only_base, torch.tensor([-1, -1, -1]), 1.0)
    assert torch.count_nonzero(only_base) == 0


def test_the_plugin_is_installed_for_vllm():
    from importlib.metadata import entry_points

    names = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "engine.vllm_cpu_lora:register" in names


def _greedy(url: str, model: str) -> str:
    from engine.http import client

    with client(url, timeout=120) as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Say something about rain."}],
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


def test_engine_applies_adapters_and_leaves_the_base_weights_alone(
    tiny_engine_url, tiny_model_dir, tmp_path, tmp_path_factory
):
    """In the real engine, whose processes loaded the plugin (their log says so): an adapter
    with a large change changes the greedy reply; with two adapters in the slots, and after
    unloading them, the base weights answer exactly as before."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.http import client

    # conftest's engine log (pytest also links each numbered folder as "...current")
    (log,) = {p.resolve() for p in tmp_path_factory.getbasetemp().glob("logs*/tiny-engine.log")}
    assert "CPU LoRA ops from engine.vllm_cpu_lora" in log.read_text(errors="replace")
    base_before = _greedy(tiny_engine_url, "policy")
    names = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 1.0)
        path = tmp_path / f"adapter-{seed}"
        model.save_pretrained(path)
        names.append(f"plugin-test-{seed}")
        with client(tiny_engine_url, timeout=120) as http:
            http.post(
                "/v1/load_lora_adapter", json={"lora_name": names[-1], "lora_path": str(path)}
            ).raise_for_status()
    try:
        replies = [_greedy(tiny_engine_url, name) for name in names]
        assert all(reply != base_before for reply in replies)
        assert _greedy(tiny_engine_url, "policy") == base_before  # both slots in use
    finally:
        with client(tiny_engine_url, timeout=120) as http:
            for name in names:
                http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert _greedy(tiny_engine_url, "policy") == base_before
