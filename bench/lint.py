"""Whole-mesh lint of a DeepSeek-V3-shaped adapter key list (about 90,000 keys) at ep=64.

Times `ownership.lint.lint("vllm-ep-lora", keys, mesh="ep=64")` end to end (rule file, static checks, binding,
the key and whole-mesh checks), with dtypes and shapes so that byte balance is computed too. Target (issue #4):
under 2 s on this machine. Run: `.venv/bin/python bench/lint.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from keys import deepseek_v3_adapter_keys

from ownership.lint import lint


def main() -> None:
    keys = deepseek_v3_adapter_keys()
    # Shapes of DeepSeek-V3's expert LoRA (hidden 7168, expert intermediate 2048, r = 16), BF16.
    entries = []
    for key in keys:
        out, inp = (2048, 7168) if "down_proj" not in key else (7168, 2048)
        shape = [16, inp] if "lora_A" in key else [out, 16]
        entries.append((key, "BF16", shape))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        report = lint("vllm-ep-lora", entries, mesh="ep=64", params={"num_experts": 256})
        times.append(time.perf_counter() - start)
    print(f"keys: {len(keys)} (DeepSeek-V3-shaped per-expert adapter, 256 experts), mesh ep=64")
    print(f"findings: {sorted({f.check for f in report.findings})}, errors: {report.num_errors}")
    print(f"{'whole-mesh lint, s (best of 3; target < 2)':<44} {min(times):>8.3f}")


if __name__ == "__main__":
    main()
