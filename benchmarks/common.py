"""What several benchmarks share: the machine's description and the demo-model texts (serve.py, summarize.py)."""

from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# /proc/cpuinfo flag -> the name printed; what decides which fast paths a CPU has.
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, ISA extensions that matter here) from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return name, [label for flag, label in ISA_FLAGS.items() if flag in flags]


def describe_cpu() -> str:
    """The CPU's model name and ISA, for a benchmark's header line."""
    name, isa = cpu_info()
    return f"{name} ({' '.join(isa) or 'none of ' + ', '.join(ISA_FLAGS.values())})"


def sample_windows(count: int, most_words: int) -> list[str]:
    """``count`` different texts of 30 to ``most_words`` words: windows of the sample document at varied offsets."""
    words = (ROOT / "examples" / "sample.txt").read_text().split()
    return [" ".join(words[(11 * i) % 80:][:30 + (37 * i) % (most_words - 29)]) for i in range(count)]
