"""What the machine computes well, for choosing dtypes (kept apart so loading and quantization both read it)."""

from __future__ import annotations


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16, AMX); elsewhere bf16 runs several times slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
