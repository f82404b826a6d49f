"""What the CPU computes natively, read without importing torch (the app's engine start needs it).

bf16 pays only where the CPU has bf16 instructions (AVX-512-BF16 or AMX): elsewhere (AVX2) both
PyTorch and vLLM emulate it, slower than fp32. On a 2-core AMD EPYC with AVX2 only, vLLM served
SmolLM2 at 16-17 tokens/s in bf16 and 47-59 in fp32 (8 prompts x 2 replies; bench.engine_dtype).
"""

from __future__ import annotations

from functools import cache


@cache
def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()  # noqa: SIM115 - read once, cached
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
