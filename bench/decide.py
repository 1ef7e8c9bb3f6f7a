"""Per-key decision cost of the compiled `vllm-ep-lora` ruleset against vLLM's own predicate, and a whole-mesh plan.

Builds a DeepSeek-V3-shaped per-expert adapter key list (about 90,000 keys), then in one process times:

1. `RankRules.decide(key)` for rank 3 of ep=8, over every key;
2. a plain re-implementation of vLLM's `_is_remote_expert_key` (PR #42737, from
   ../shared/reference/vllm-ep-lora.md) over the same keys;
3. a whole-mesh plan (`plan --all-ranks`) of those keys at ep=64.

Each figure is the best CPU time of several repeats, ours and vLLM's taking turns. Run: `.venv/bin/python bench/decide.py`.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from keys import deepseek_v3_adapter_keys

from ownership import load_ruleset


def vllm_is_remote_expert_key(key: str, ep_rank: int, local_num_experts: int) -> bool:
    """vLLM's LoRA expert filter, re-implemented from the measured reference."""
    idx = key.find(".experts.")
    if idx < 0:
        return False
    rest = key[idx + len(".experts.") :]
    dot = rest.find(".")
    if dot < 0:
        return False
    text = rest[:dot]
    if not text.isdigit():
        return False
    expert = int(text)
    start = ep_rank * local_num_experts
    return not (start <= expert < start + local_num_experts)


def best_of(*fns: Callable[[], object], repeats: int) -> list[float]:
    """Best CPU time of each function, the functions taking turns so that both see the same machine.

    CPU time of this process (not wall time): on a shared machine it leaves out time the process waited.
    """
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            gc.collect()
            start = time.process_time()
            fn()
            best[i] = min(best[i], time.process_time() - start)
    return best


def main() -> None:
    keys = deepseek_v3_adapter_keys()
    num_experts, ep_size, rank = 256, 8, 3
    ruleset = load_ruleset("vllm-ep-lora")
    rules = ruleset.compile(mesh=f"ep={ep_size}", rank=rank, params={"num_experts": num_experts})
    decide = rules.decide
    local = num_experts // ep_size

    def ours() -> None:
        for key in keys:
            decide(key)

    def vllm() -> None:
        for key in keys:
            vllm_is_remote_expert_key(key, rank, local)

    # Same answers first: a benchmark of two functions that disagree measures nothing.
    mismatches = sum(decide(k).owned == vllm_is_remote_expert_key(k, rank, local) for k in keys)
    assert mismatches == 0, f"{mismatches} keys decided differently from vLLM"

    t_ours, t_vllm = best_of(ours, vllm, repeats=7)
    per_ours = t_ours / len(keys) * 1e9
    per_vllm = t_vllm / len(keys) * 1e9

    plan_ep = 64
    (t_mesh,) = best_of(
        lambda: ruleset.plan(keys, mesh=f"ep={plan_ep}", params={"num_experts": num_experts}), repeats=3
    )

    print(f"keys: {len(keys)} (DeepSeek-V3-shaped per-expert adapter, {num_experts} experts)")
    print(f"{'measure':<44} {'value':>12}")
    print(f"{'ownership decide, ns/key (ep=8, rank 3)':<44} {per_ours:>12.0f}")
    print(f"{'vLLM _is_remote_expert_key, ns/key':<44} {per_vllm:>12.0f}")
    print(f"{'ratio ours / vLLM (target <= 1.5)':<44} {per_ours / per_vllm:>12.2f}")
    print(f"{f'whole-mesh plan, ep={plan_ep}, s (target < 2)':<44} {t_mesh:>12.3f}")


if __name__ == "__main__":
    main()
