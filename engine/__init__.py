"""Everything that starts vLLM or talks to it, between storage (below) and the alignment loop
and the app (above): the `Engine` protocol the chat service depends on (`engine.protocol`), the
client over vLLM's OpenAI-compatible server (`engine.vllm_client`), the embedded server's
process (`engine.vllm_server`), its settings (`engine.config`), the HTTP clients for a URL or a
Unix socket (`engine.http`), the watcher that restarts a dead engine (`engine.watch`), the
embedded model's provisioning (`engine.provision`), the CPU LoRA kernels vLLM loads as a plugin
(`engine.vllm_cpu_lora`), and what the hardware computes (`engine.hardware`).

It imports nothing from `alignment`, `assistant` or `ui`: the replica work builds here.
"""
